"""``bilinearpool-bench``: parameters, speed and saved memory of bilinear pooling, as tables.

Subcommands:

- ``layers``: forward+backward time and saved-for-backward bytes of every pooling path in
  :data:`bilinearpool.bench.LAYER_CASES` against the naive op-by-op chain and the bare
  batched matrix product, at the shapes of the benchmark protocol;
- ``models``: exact (and analytic) parameter counts and images/s (inference and one
  training step) of backbone x head x resolution, relative to the plain backbone;
- ``demo``: ``layers --quick`` and ``models --quick`` (what ``make demo`` runs);
- ``report``: one Markdown file from the results of ``layers`` and ``models`` in a folder.

Every run prints a Markdown table, and with ``--out DIR`` writes ``<name>.csv``,
``<name>.json`` (rows, raw timings, settings, environment), ``<name>.md`` and, when
matplotlib is installed, ``<name>.png``. Ratios measured side by side in one run are the
headline; absolute times on a shared CPU are not comparable between runs.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import bench

__all__ = ["BenchResult", "build_parser", "main", "run_layers", "run_models", "write_result"]

#: Shapes of the protocol (B, C, H, W): ResNet50/InceptionV3 at 224, InceptionResNetV2,
#: VGG-style, reduced-dimension covariance.
LAYER_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (8, 2048, 7, 7),
    (8, 1536, 5, 5),
    (16, 512, 28, 28),
    (32, 256, 14, 14),
)
PAPER_BACKBONES = ("resnet50", "inception_v3", "inception_resnet_v2")
PAPER_HEADS = ("plain", "se", "bcnn", "fast-bcnn")
PAPER_RESOLUTIONS = (197, 224, 448)
#: Goals of issue 4, checked in the tables.
TIME_GOAL = 0.5  # fused pooling fwd+bwd / naive chain
MEMORY_GOAL = 1.1  # fused pooling saved bytes / input map bytes
THROUGHPUT_GOAL = 0.85  # Fast BCNN inference images/s / plain backbone's, at 224
GOAL_RESOLUTION = 224
MIB = 2**20


@dataclass
class BenchResult:
    """What one subcommand measured: rows for the table and files, and their context.

    Attributes:
        name: ``"layers"`` or ``"models"``; the stem of the files written.
        title: heading of the Markdown section.
        columns: column order of the table and the CSV.
        rows: one dict per row.
        meta: command, environment, settings and goal summary (saved in the JSON).
        raw: per-row raw timings (saved in the JSON only).
    """

    name: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    raw: list[dict[str, Any]] = field(default_factory=list)

    def markdown(self) -> str:
        """The Markdown report: command, environment, settings, table, goals, notes."""
        env = self.meta["environment"]
        settings = self.meta["settings"]
        lines = [
            f"## {self.title}",
            "",
            f"Command: `{self.meta['command']}`",
            "",
            f"Environment: {_describe_environment(env)}",
            "",
            "Settings: " + "; ".join(f"{k}={v}" for k, v in settings.items()),
            "",
            markdown_table(self.rows, self.columns),
        ]
        summary = self.meta.get("summary")
        if summary and summary.get("rows"):
            lines += ["", f"### {summary['title']}", ""]
            if summary.get("text"):
                lines += [summary["text"], ""]
            lines.append(markdown_table(summary["rows"], summary["columns"]))
        if self.meta.get("goals"):
            lines += ["", "Goals:", ""] + [f"- {g}" for g in self.meta["goals"]]
        if self.meta.get("notes"):
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.meta["notes"]]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Formatting and files
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` (missing values blank, ints with separators).

    Examples:
        >>> print(markdown_table([{"a": 1, "b": 0.5}], ["a", "b"]))
        | a | b |
        |---|---|
        | 1 | 0.50 |
    """
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _describe_environment(env: dict[str, Any]) -> str:
    parts = [
        f"torch {env.get('torch')}",
        f"{env.get('device_type')} ({env.get('device')})",
        f"{env.get('threads')} threads of {env.get('cpu_count')} CPUs",
    ]
    for key in ("torchvision", "timm"):
        if env.get(key):
            parts.append(f"{key} {env[key]}")
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}, cuDNN {env.get('cudnn')}")
    if env.get("load_average_at_start") is not None:
        parts.append(f"load average at start {env['load_average_at_start']}")
    if env.get("load_average_at_end") is not None:
        parts.append(f"at end {env['load_average_at_end']}")
    parts.append(f"python {env.get('python')}, {env.get('platform')}, {env.get('date')}")
    return "; ".join(parts)


def _plot(result: BenchResult, path: Path) -> Path | None:
    """PNG of the result when matplotlib is installed; ``None`` (and nothing written) otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if result.name == "models":
        fig = _plot_models(plt, result.rows)
    elif result.name == "layers":
        fig = _plot_layers(plt, result.rows)
    else:
        return None
    if fig is None:
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_models(plt: Any, rows: list[dict[str, Any]]) -> Any:
    models = list(dict.fromkeys(f"{r['backbone']}\n{r['head']}" for r in rows))
    resolutions = sorted({r["resolution"] for r in rows if r.get("infer_img_s") is not None})
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(models) + 4), 5))
    width = 0.8 / max(1, len(resolutions))
    for i, res in enumerate(resolutions):
        values = {
            f"{r['backbone']}\n{r['head']}": r["infer_img_s"]
            for r in rows
            if r["resolution"] == res
        }
        xs = [j + i * width for j in range(len(models))]
        ax_t.bar(xs, [values.get(m) or 0.0 for m in models], width=width, label=f"{res}px")
    ax_t.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(models))], models, rotation=90, fontsize=7
    )
    ax_t.set_ylabel("inference images/s")
    ax_t.set_title("Throughput (higher is better)")
    if resolutions:
        ax_t.legend(fontsize=7)
    params = {f"{r['backbone']}\n{r['head']}": r["params"] / 1e6 for r in rows}
    ax_p.bar(range(len(models)), [params[m] for m in models], color="tab:gray")
    ax_p.set_xticks(range(len(models)), models, rotation=90, fontsize=7)
    ax_p.set_ylabel("parameters (millions)")
    ax_p.set_title("Parameters (8 classes)")
    return fig


def _plot_layers(plt: Any, rows: list[dict[str, Any]]) -> Any:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    if not shapes or not cases:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(10, 0.5 * len(shapes) * len(cases)), 4.8))
    width = 0.8 / len(cases)
    panels = (
        (ax_t, "vs_naive", "fwd+bwd time / naive chain (log)", TIME_GOAL, "time"),
        (ax_m, "saved_vs_input", "saved-for-backward bytes / input (log)", MEMORY_GOAL, "memory"),
    )
    for ax, key, ylabel, goal, what in panels:
        for i, case in enumerate(cases):
            values = {r["shape"]: r[key] for r in rows if r["case"] == case}
            xs = [j + i * width for j in range(len(shapes))]
            ax.bar(xs, [values.get(sh) or float("nan") for sh in shapes], width=width, label=case)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(
            goal, color="tab:red", linestyle="--", linewidth=0.8, label=f"{what} goal {goal}x"
        )
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=8)
        ax.set_xlabel("B x C x H x W")
        ax.set_ylabel(ylabel)
    ax_t.set_title("Time relative to the naive chain (lower is better)")
    ax_m.set_title("Memory kept for backward (lower is better)")
    ax_t.legend(fontsize=7, ncol=2)
    return fig


def write_result(result: BenchResult, out: Path) -> list[Path]:
    """Write ``<name>.csv``, ``<name>.json``, ``<name>.md`` (and ``<name>.png``) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    csv_path = out / f"{result.name}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=result.columns, extrasaction="ignore")
        writer.writeheader()
        for row in result.rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in result.columns})
    paths.append(csv_path)
    json_path = out / f"{result.name}.json"
    payload = {
        "benchmark": result.name,
        "title": result.title,
        **result.meta,
        "columns": result.columns,
        "rows": result.rows,
        "raw": result.raw,
        "markdown": result.markdown(),
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    paths.append(json_path)
    md_path = out / f"{result.name}.md"
    md_path.write_text(result.markdown(), encoding="utf-8")
    paths.append(md_path)
    png = _plot(result, out / f"{result.name}.png")
    if png is not None:
        paths.append(png)
    return paths


class _NoBar:
    """Stands in for a tqdm bar when tqdm is missing or the bar is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


# ---------------------------------------------------------------------------------------------
# Shared settings
# ---------------------------------------------------------------------------------------------


@dataclass
class _Settings:
    device: torch.device
    warmup: int
    repeats: int
    amp_dtype: torch.dtype | None
    channels_last: bool
    progress: bool
    seed: int

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "warmup_rounds": self.warmup,
            "timed_rounds": self.repeats,
            "statistic": "median of the timed rounds, candidates interleaved, in a new balanced order each round",
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "channels_last": self.channels_last,
            "seed": self.seed,
        }


def _settings(args: argparse.Namespace, kind: str) -> _Settings:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: --device cuda was asked for, but torch.cuda.is_available() is False"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.quick:
        warmup, repeats = 1, 2
    elif device.type == "cuda":
        warmup, repeats = 5, 20
    else:
        warmup, repeats = 1, (5 if kind == "layers" else 3)
    amp_dtype = None
    if args.amp:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return _Settings(
        device=device,
        warmup=args.warmup if args.warmup is not None else warmup,
        repeats=args.repeats if args.repeats is not None else repeats,
        amp_dtype=amp_dtype,
        channels_last=args.channels_last,
        progress=not args.no_progress,
        seed=args.seed,
    )


def _peak_mib(step: Callable[[], object], device: torch.device) -> float | None:
    """CUDA: peak memory of one (warm) call of ``step`` above what was allocated before; else None."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MIB


def _drop_out_of_memory(
    steps: dict[str, Callable[[], object]], notes: dict[str, list[str]], what: str
) -> dict[str, Callable[[], object]]:
    """Run each step once (a warm-up); leave out, with a note, those that run out of memory."""
    kept = {}
    for name, step in steps.items():
        try:
            step()
        except torch.OutOfMemoryError:
            notes[name].append(f"{what}: out of memory at this batch size")
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        kept[name] = step
    return kept


def _load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _ratio_range(a: Sequence[float] | None, b: Sequence[float] | None) -> str | None:
    """Smallest and largest per-round ratio a[i] / b[i] (rounds are interleaved, so paired)."""
    if not a or not b or len(a) != len(b):
        return None
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else None


def _rates(times: Sequence[float] | None) -> list[float] | None:
    """Per-round speeds (1 / seconds), so that ratios of them read like throughput ratios."""
    return None if times is None else [1.0 / t for t in times if t > 0]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = re.split(r"[x,]", text.lower())
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"a shape is BxCxHxW with positive ints, e.g. 8x2048x7x7, but got {text!r}"
        )
    b, c, h, w = (int(p) for p in parts)
    return b, c, h, w


def _fwd_bwd(
    fn: bench.LayerFn, inputs: Sequence[Tensor], grad: Tensor, amp_dtype: torch.dtype | None
) -> Callable[[], None]:
    params = list(fn.parameters()) if isinstance(fn, nn.Module) else []

    def step() -> None:
        for p in params:
            p.grad = None
        leaves = [x.detach().requires_grad_() for x in inputs]
        with bench.autocast_context(grad.device, amp_dtype):
            out = fn(*leaves)
        out.backward(grad)

    return step


def _saved_with_linear(fn: bench.LayerFn, inputs: Sequence[Tensor], dim: int, s: Any) -> int:
    """Saved-for-backward bytes of ``fn`` followed by a linear classifier on its output
    (:data:`bench.CLASSIFIER_CLASSES` classes; its weight is not counted)."""
    weight = torch.zeros(bench.CLASSIFIER_CLASSES, dim, device=s.device, requires_grad=True)
    leaves = [x.detach().requires_grad_() for x in inputs]
    with (
        bench.SavedTensorCounter(exclude=[weight]) as saved,
        bench.autocast_context(s.device, s.amp_dtype),
    ):
        F.linear(fn(*leaves).flatten(1), weight)
    return saved.nbytes


def run_layers(args: argparse.Namespace, *, command: str) -> BenchResult:
    """Measure every selected layer case at every shape (see ``bilinearpool-bench layers --help``)."""
    s = _settings(args, "layers")
    env = bench.environment(s.device)
    shapes = [tuple(sh) for sh in (args.shapes or LAYER_SHAPES)]
    if args.batch_size is not None:
        shapes = [(args.batch_size, c, h, w) for _, c, h, w in shapes]
    names = args.cases or list(bench.LAYER_CASES)
    unknown = [n for n in names if n not in bench.LAYER_CASES]
    if unknown:
        raise SystemExit(
            f"error: unknown layer case(s) {unknown}; known: {list(bench.LAYER_CASES)}"
        )
    # The ratios need both references; they lead the table.
    names = [n for n in ("naive", "matmul-floor") if n not in names] + list(names)
    cases = [bench.LAYER_CASES[n] for n in names]
    plan = [(shape, [c for c in cases if c.applies(shape[1])]) for shape in shapes]
    total = sum(len(cs) * (1 + s.warmup + s.repeats) for _, cs in plan)
    bar = _progress(total, "layers", s.progress)
    gen = torch.Generator().manual_seed(s.seed)
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    try:
        for shape, shape_cases in plan:
            b, c, h, w = shape
            label = "x".join(map(str, shape))
            maps = [
                torch.relu(torch.randn(b, c, h, w, generator=gen)).to(s.device) for _ in range(2)
            ]
            if s.channels_last:
                maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
            map_bytes = maps[0].numel() * maps[0].element_size()
            steps: dict[str, Callable[[], None]] = {}
            measured: dict[str, dict[str, Any]] = {}
            for case in shape_cases:
                bar.set_postfix_str(f"{label} {case.name}: saved bytes")
                fn = case.build(c, s.device)
                inputs = maps[: case.streams]
                leaves = [x.detach().requires_grad_() for x in inputs]
                with (
                    bench.SavedTensorCounter() as saved,
                    bench.autocast_context(s.device, s.amp_dtype),
                ):
                    out = fn(*leaves)
                grad = torch.randn(out.shape, generator=gen).to(device=s.device, dtype=out.dtype)
                out.backward(grad)
                dim = bench.layer_output_dim(fn, c, streams=case.streams, out=out)
                del out, leaves
                with_linear = _saved_with_linear(fn, inputs, dim, s)
                steps[case.name] = _fwd_bwd(fn, inputs, grad, s.amp_dtype)
                measured[case.name] = {
                    "dim": dim,
                    "layer_params": (
                        bench.count_parameters(fn) if isinstance(fn, nn.Module) else 0
                    ),
                    "saved": saved.nbytes,
                    "with_linear": with_linear,
                    "peak": _peak_mib(steps[case.name], s.device),
                    "input": map_bytes * case.streams,
                }
                bar.update(1)
            bar.set_postfix_str(f"{label}: timing")
            times = bench.round_robin(
                steps,
                warmup=s.warmup,
                repeats=s.repeats,
                device=s.device,
                on_call=lambda _: bar.update(1),
            )
            med = {name: bench.median(t) for name, t in times.items()}
            for case in shape_cases:
                m = measured[case.name]
                row = {
                    "shape": label,
                    "case": case.name,
                    "fwd_bwd_ms": med[case.name] * 1e3,
                    "vs_naive": _ratio(med[case.name], med.get("naive")),
                    "vs_naive_range": _ratio_range(times[case.name], times.get("naive")),
                    "vs_floor": _ratio(med[case.name], med.get("matmul-floor")),
                    "saved_MiB": m["saved"] / MIB,
                    "input_MiB": m["input"] / MIB,
                    "saved_vs_input": m["saved"] / m["input"],
                    "saved_with_linear_MiB": m["with_linear"] / MIB,
                    "peak_MiB": m["peak"],
                    "D": m["dim"],
                    "layer_params": m["layer_params"],
                    "classifier_params": bench.classifier_parameter_count(m["dim"]),
                    "goals": _layer_goal(
                        case, med[case.name], med.get("naive"), m["saved"] / m["input"]
                    ),
                }
                rows.append(row)
                raw.append({"shape": label, "case": case.name, "times_s": times[case.name]})
            del steps, maps
            gc.collect()
    finally:
        bar.close()
    env["load_average_at_end"] = _load_average()
    columns = ["shape", "case", "fwd_bwd_ms", "vs_naive", "vs_naive_range", "vs_floor", "saved_MiB", "input_MiB",
               "saved_vs_input", "saved_with_linear_MiB"]  # fmt: skip
    if s.device.type == "cuda":
        columns.append("peak_MiB")
    columns += ["D", "layer_params", "classifier_params", "goals"]
    k = bench.CLASSIFIER_CLASSES
    summary_columns = ["shape", "case", "D", "layer_params", "classifier_params", "fwd_bwd_ms",
                       "vs_naive", "saved_vs_input", "saved_with_linear_MiB"]  # fmt: skip
    summary_roles = {c.name: c.role for c in cases}
    meta = {
        "command": command,
        "environment": env,
        "settings": {**s.describe(), "input": "relu(randn), float32"},
        "cases": {c.name: c.description for c in cases},
        "goals": _layer_goal_summary(rows, cases),
        "summary": {
            "title": "Which pooling to choose",
            "text": (
                f"Per shape, every pooling (the references `naive` and `matmul-floor` left out): "
                f"D, the features per sample it gives (asked of the layer: its output_dim(C), "
                f"checked against one output); layer_params, its own trainable parameters; "
                f"classifier_params, those of an {k}-class linear classifier on top "
                f"({k}*D + {k}); fwd+bwd time and its ratio to the naive chain; saved-for-backward "
                f"bytes / input, and those of the layer with the {k}-class classifier on top "
                f"(MiB). Whole-model parameters: add the backbone's and layer_params."
            ),
            "columns": summary_columns,
            "rows": [
                {col: r.get(col) for col in summary_columns}
                for r in rows
                if summary_roles.get(r["case"]) == "ours"
            ],
        },
        "notes": [
            (
                "vs_naive and vs_floor: median fwd+bwd time of the row / that of `naive` (the op-by-op "
                "chain) and of `matmul-floor` (bare bmm) at the same shape, timed interleaved in this "
                "run; below 1 is faster. vs_naive_range: the smallest and largest ratio of single "
                "interleaved rounds (how much the noise moves it)."
            ),
            (
                "saved_MiB: bytes autograd keeps for backward, counted exactly by unique storage with "
                "torch.autograd.graph.saved_tensors_hooks (inputs included); input_MiB: the input map(s). "
                f"saved_with_linear_MiB: the same for the layer followed by an {k}-class linear "
                "classifier on its output (the classifier's weight not counted), what a model "
                "keeps: a linear layer keeps its input, so a layer that saves its own output "
                "(fast-bcnn-so) costs no more there than one that does not."
            ),
            "bcnn-2stream takes two maps of the shape, so its input is twice the others'.",
            (
                "D: features per sample of the layer's output (its output_dim(C), checked against "
                "the shape of one output; for naive and matmul-floor the output's size). layer_params: "
                "trainable parameters of the layer itself (low-rank projections, the 1x1 conv + BN of "
                "a channel reduction; 0 for parameter-free poolings; compact-ts holds its fixed random "
                f"hashes and signs as buffers, not parameters). classifier_params: an {k}-class "
                f"nn.Linear(D, {k}) on top, {k}*D + {k}."
            ),
            "Cases: " + "; ".join(f"`{c.name}`: {c.description}" for c in cases) + ".",
        ],
    }
    return BenchResult(
        "layers",
        "Layers: forward+backward time and saved-for-backward bytes",
        columns,
        rows,
        meta,
        raw,
    )


def _layer_goal(
    case: bench.LayerCase, t: float, t_naive: float | None, saved_ratio: float
) -> str | None:
    if not case.goal:
        return None
    parts = []
    ratio = _ratio(t, t_naive)
    if ratio is None:
        parts.append("time: no naive baseline")
    else:
        parts.append(f"time {'met' if ratio <= TIME_GOAL else 'NOT met'} ({ratio:.2f}x)")
    parts.append(
        f"memory {'met' if saved_ratio <= MEMORY_GOAL else 'NOT met'} ({saved_ratio:.2f}x)"
    )
    return ", ".join(parts)


def _layer_goal_summary(rows: list[dict[str, Any]], cases: Sequence[bench.LayerCase]) -> list[str]:
    lines = []
    for case in cases:
        if not case.goal:
            continue
        mine = [r for r in rows if r["case"] == case.name]
        if not mine:
            continue
        for what, key, limit in (
            ("fwd+bwd time", "vs_naive", TIME_GOAL),
            ("saved bytes", "saved_vs_input", MEMORY_GOAL),
        ):
            baseline = "the naive chain's" if key == "vs_naive" else "the input map's"
            values = [(r["shape"], r[key]) for r in mine if r[key] is not None]
            missed = [(sh, v) for sh, v in values if v > limit]
            head = f"`{case.name}` {what} <= {limit}x {baseline}: "
            if not missed:
                lines.append(
                    head
                    + f"met at all {len(values)} shapes ("
                    + ", ".join(f"{sh}: {v:.2f}x" for sh, v in values)
                    + ")"
                )
            else:
                lines.append(
                    head
                    + f"NOT met at {len(missed)} of {len(values)} shapes ("
                    + ", ".join(f"{sh}: {v:.2f}x" for sh, v in missed)
                    + ")"
                    + (
                        "; met at " + ", ".join(f"{sh}: {v:.2f}x" for sh, v in values if v <= limit)
                        if len(missed) < len(values)
                        else ""
                    )
                )
    return lines


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def _parse_batch_at(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*=\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"expected RESOLUTION=BATCH, e.g. 448=1, but got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _batch_size(args: argparse.Namespace, device: torch.device, resolution: int) -> int:
    overrides = dict(args.batch_size_at or [])
    if resolution in overrides:
        return overrides[resolution]
    if args.batch_size is not None:
        return args.batch_size
    if device.type == "cuda":
        return 32
    return 1 if resolution >= 448 and not args.quick else 2


def _parameter_rows(
    backbone: str,
    models: dict[str, nn.Module],
    heads: Sequence[bench.ModelHead],
    *,
    num_classes: int,
    se_reduction: int,
) -> dict[str, dict[str, Any]]:
    plain = models["plain"]
    backbone_params = bench.count_parameters(plain.backbone)  # type: ignore[arg-type]
    channels = int(plain.backbone.out_channels)  # type: ignore[union-attr]
    out = {}
    for head in heads:
        exact = bench.count_parameters(models[head.name])
        analytic = head.analytic_parameters(
            models[head.name],
            backbone_params=backbone_params,
            channels=channels,
            num_classes=num_classes,
            se_reduction=se_reduction,
        )
        out[head.name] = {
            "backbone": backbone,
            "head": head.name,
            "channels": channels,
            "params": exact,
            "params_analytic": analytic,
            "params_ok": exact == analytic,
        }
    plain_params = out["plain"]["params"]
    for row in out.values():
        row["params_vs_plain"] = row["params"] / plain_params
    return out


def parameter_table(
    backbones: Iterable[str],
    heads: Sequence[str] = PAPER_HEADS,
    *,
    num_classes: int = 8,
    se_reduction: int = 8,
) -> list[dict[str, Any]]:
    """Exact and analytic parameter counts of backbone x head, without timing anything.

    Returns:
        One row per model: ``backbone``, ``head``, ``channels``, ``params`` (exact),
        ``params_analytic``, ``params_ok`` and ``params_vs_plain``.
    """
    selected = _select_heads(heads)
    rows = []
    for backbone in backbones:
        models = {
            h.name: h.build(backbone, num_classes=num_classes, se_reduction=se_reduction)
            for h in selected
        }
        rows += list(
            _parameter_rows(
                backbone, models, selected, num_classes=num_classes, se_reduction=se_reduction
            ).values()
        )
        del models
    return rows


def _select_heads(names: Sequence[str]) -> list[bench.ModelHead]:
    unknown = [n for n in names if n not in bench.MODEL_HEADS]
    if unknown:
        raise SystemExit(f"error: unknown head(s) {unknown}; known: {list(bench.MODEL_HEADS)}")
    ordered = ["plain"] + [n for n in dict.fromkeys(names) if n != "plain"]  # plain is the baseline
    return [bench.MODEL_HEADS[n] for n in ordered]


def run_models(args: argparse.Namespace, *, command: str) -> BenchResult:
    """Parameters and throughput of backbone x head x resolution (see ``models --help``)."""
    s = _settings(args, "models")
    env = bench.environment(s.device)
    backbones = args.backbones or list(PAPER_BACKBONES)
    heads = _select_heads(args.heads or list(PAPER_HEADS))
    resolutions = args.resolutions or ([GOAL_RESOLUTION] if args.quick else list(PAPER_RESOLUTIONS))
    timed = not args.params_only
    per_group = len(heads) * (s.warmup + s.repeats) * (1 if args.no_train else 2)
    total = len(backbones) * (len(heads) + (len(resolutions) * per_group if timed else 0))
    bar = _progress(total, "models", s.progress)
    gen = torch.Generator().manual_seed(s.seed)
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    try:
        for backbone in backbones:
            models: dict[str, nn.Module] = {}
            for head in heads:
                bar.set_postfix_str(f"build {backbone} {head.name}")
                models[head.name] = head.build(
                    backbone, num_classes=args.num_classes, se_reduction=args.se_reduction
                )
                bar.update(1)
            params = _parameter_rows(
                backbone,
                models,
                heads,
                num_classes=args.num_classes,
                se_reduction=args.se_reduction,
            )
            if not timed:
                rows += [{**p, "resolution": None} for p in params.values()]
                continue
            for model in models.values():
                model.to(s.device)
                if s.channels_last:
                    model.to(memory_format=torch.channels_last)
            for res in resolutions:
                batch = _batch_size(args, s.device, res)
                images = torch.randn(batch, 3, res, res, generator=gen).to(s.device)
                if s.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = torch.randint(0, args.num_classes, (batch,), generator=gen).to(s.device)
                bar.set_postfix_str(f"{backbone} {res}px: inference")
                notes: dict[str, list[str]] = {n: [] for n in models}
                for model in models.values():
                    model.eval()
                infer_steps = {
                    n: bench.make_inference_step(m, images, amp_dtype=s.amp_dtype)
                    for n, m in models.items()
                }
                infer_steps = _drop_out_of_memory(infer_steps, notes, "inference")
                infer = bench.round_robin(
                    infer_steps,
                    warmup=s.warmup,
                    repeats=s.repeats,
                    device=s.device,
                    on_call=lambda _: bar.update(1),
                )
                train: dict[str, list[float]] = {}
                peaks: dict[str, float | None] = {n: None for n in models}
                if not args.no_train:
                    bar.set_postfix_str(f"{backbone} {res}px: training step")
                    for m in models.values():
                        m.train()
                    steps = {
                        n: bench.make_training_step(m, images, labels, amp_dtype=s.amp_dtype)
                        for n, m in models.items()
                    }
                    steps = _drop_out_of_memory(steps, notes, "training step")
                    peaks.update({n: _peak_mib(step, s.device) for n, step in steps.items()})
                    train = bench.round_robin(
                        steps,
                        warmup=s.warmup,
                        repeats=s.repeats,
                        device=s.device,
                        on_call=lambda _: bar.update(1),
                    )
                    for m in models.values():
                        m.zero_grad(set_to_none=True)
                    del steps
                infer_ips = {
                    n: bench.images_per_second(batch, bench.median(t)) for n, t in infer.items()
                }
                train_ips = {
                    n: bench.images_per_second(batch, bench.median(t)) for n, t in train.items()
                }
                for head in heads:
                    n = head.name
                    rows.append(
                        {
                            **params[n],
                            "resolution": res,
                            "batch": batch,
                            "infer_img_s": infer_ips.get(n),
                            "infer_vs_plain": _ratio(infer_ips.get(n), infer_ips.get("plain")),
                            "infer_range": _ratio_range(
                                _rates(infer.get(n)), _rates(infer.get("plain"))
                            ),
                            "train_img_s": train_ips.get(n),
                            "train_vs_plain": _ratio(train_ips.get(n), train_ips.get("plain")),
                            "train_range": _ratio_range(
                                _rates(train.get(n)), _rates(train.get("plain"))
                            ),
                            "peak_train_MiB": peaks[n],
                            "note": "; ".join(notes[n]) or None,
                        }
                    )
                    raw.append(
                        {
                            "backbone": backbone,
                            "head": n,
                            "resolution": res,
                            "batch": batch,
                            "inference_s": infer.get(n, []),
                            "training_step_s": train.get(n, []),
                        }
                    )
            del models
            gc.collect()
    finally:
        bar.close()
    env["load_average_at_end"] = _load_average()
    if timed:
        columns = ["backbone", "head", "resolution", "batch", "params", "params_ok", "params_vs_plain",
                   "infer_img_s", "infer_vs_plain", "infer_range", "train_img_s", "train_vs_plain",
                   "train_range"]  # fmt: skip
        if s.device.type == "cuda":
            columns.append("peak_train_MiB")
        if any(r.get("note") for r in rows):
            columns.append("note")
    else:
        columns = [
            "backbone",
            "head",
            "channels",
            "params",
            "params_analytic",
            "params_ok",
            "params_vs_plain",
        ]
    settings = {
        **s.describe(),
        "num_classes": args.num_classes,
        "se_reduction": args.se_reduction,
        "weights": "random (no download)",
        "training_step": "SGD lr=0 (full update arithmetic, weights unchanged), cross-entropy",
    }
    meta = {
        "command": command,
        "environment": env,
        "settings": settings,
        "heads": {h.name: h.description for h in heads},
        "goals": _model_goal_summary(rows, timed),
        "notes": [
            (
                "*_vs_plain: the row's value / the plain backbone's (global average pooling) at the same "
                "backbone and resolution, measured interleaved in this run: what the head costs. "
                "*_range: the smallest and largest ratio of single interleaved rounds."
            ),
            (
                "params: exact count (model.parameters()); params_ok: it equals the closed-form count "
                "(backbone + SE blocks + classifier; two backbones for BCNN)."
            ),
            "Heads: " + "; ".join(f"`{h.name}`: {h.description}" for h in heads) + ".",
        ],
    }
    return BenchResult("models", "Models: parameters and throughput", columns, rows, meta, raw)


def _model_goal_summary(rows: list[dict[str, Any]], timed: bool) -> list[str]:
    lines = []
    param_rows = {(r["backbone"], r["head"]): r for r in rows}
    bad = [
        f"{b}/{h}: {r['params']:,} vs {r['params_analytic']:,}"
        for (b, h), r in param_rows.items()
        if not r["params_ok"]
    ]
    if bad:
        lines.append("Parameter counts equal the analytic counts: NOT met for " + "; ".join(bad))
    else:
        lines.append(
            f"Parameter counts equal the analytic counts: met for all {len(param_rows)} models"
        )
    if not timed:
        return lines
    at_goal = {(r["backbone"], r["head"]): r for r in rows if r["resolution"] == GOAL_RESOLUTION}
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    if not any(b for b, _ in at_goal):
        lines.append(
            f"Throughput goals are stated at {GOAL_RESOLUTION}px, which was not measured in this run"
        )
        return lines
    for head, text in (("fast-bcnn", "goal >= 0.85x"), ("bcnn", "expected near 0.5x")):
        parts = []
        for b in backbones:
            r = at_goal.get((b, head))
            if r is None or r["infer_vs_plain"] is None:
                continue
            v = r["infer_vs_plain"]
            verdict = (
                ("met" if v >= THROUGHPUT_GOAL else "NOT met")
                if head == "fast-bcnn"
                else "measured"
            )
            parts.append(f"{b} {v:.2f}x ({verdict})")
        if parts:
            name = "Fast BCNN" if head == "fast-bcnn" else "Two-stream BCNN"
            lines.append(
                f"{name} inference throughput / plain at {GOAL_RESOLUTION}px, {text}: "
                + ", ".join(parts)
            )
    return lines


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _report(args: argparse.Namespace, *, command: str) -> int:
    folder = Path(args.folder)
    parts = []
    for name in ("layers", "models"):
        path = folder / f"{name}.json"
        if path.is_file():
            parts.append(json.loads(path.read_text(encoding="utf-8")))
    if not parts:
        raise SystemExit(
            f"error: no layers.json or models.json in {folder}; run `bilinearpool-bench layers --out {folder}` first"
        )
    lines = [f"# {args.title}", ""]
    for note in args.note or []:
        lines += [note, ""]
    lines += ["Commands that produced these results:", "", "```"]
    lines += [p["command"] for p in parts]
    lines += [command, "```", ""]
    lines += [f"Raw files (CSV, JSON with raw timings, PNG plots): `{folder}/`.", ""]
    for p in parts:
        lines += [p["markdown"].rstrip(), ""]
    text = "\n".join(lines)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"Report written to {args.out}")
    else:
        print(text)
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, out_default: str | None) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)"
    )
    g.add_argument("--batch-size", type=int, default=None, help="batch size (layers: replaces B of every shape; "
                   "models default: 2 on CPU, 1 at 448px and above, 32 on CUDA)")  # fmt: skip
    g.add_argument("--repeats", type=int, default=None, help="timed rounds, the median is reported "
                   "(default: layers 5, models 3 on CPU; 20 on CUDA; 2 with --quick)")  # fmt: skip
    g.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed rounds first (default: 1 on CPU, 5 on CUDA)",
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="short run: 1 warm-up + 2 timed rounds (models: 224px, batch 2)",
    )
    g.add_argument("--out", type=Path, default=out_default, help="folder for <name>.csv/.json/.md/.png "
                   "(default: print only)" if out_default is None else f"output folder (default: {out_default})")  # fmt: skip
    g.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    g.add_argument(
        "--amp",
        action="store_true",
        help="run under torch.autocast: float16 on CUDA, bfloat16 on CPU",
    )
    g.add_argument(
        "--channels-last",
        action="store_true",
        help="inputs (and models) in channels_last memory format",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _layers_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("layers")
    g.add_argument("--shapes", type=_parse_shape, nargs="+", default=None, metavar="BxCxHxW",
                   help="input shapes (default: " + " ".join("x".join(map(str, s)) for s in LAYER_SHAPES) + ")")  # fmt: skip
    g.add_argument("--cases", nargs="+", default=None, metavar="NAME",
                   help=f"layer cases to run (default: all): {', '.join(bench.LAYER_CASES)}; "
                   "naive and matmul-floor always run (the ratios need them)")  # fmt: skip


def _models_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models")
    g.add_argument("--backbones", nargs="+", default=None, metavar="NAME",
                   help="any name bilinearpool.build_backbone accepts (default: " + " ".join(PAPER_BACKBONES) + ")")  # fmt: skip
    g.add_argument("--heads", nargs="+", default=None, metavar="HEAD",
                   help=f"heads: {', '.join(bench.MODEL_HEADS)} (default: {' '.join(PAPER_HEADS)}); "
                   "plain always runs, it is the baseline of the ratios")  # fmt: skip
    g.add_argument("--resolutions", type=int, nargs="+", default=None, metavar="PX",
                   help="square input sizes (default: 197 224 448; 224 with --quick)")  # fmt: skip
    g.add_argument("--batch-size-at", type=_parse_batch_at, action="append", default=None, metavar="RES=BATCH",
                   help="batch size at one resolution, e.g. --batch-size-at 448=1 (repeatable)")  # fmt: skip
    g.add_argument(
        "--num-classes",
        type=int,
        default=8,
        help="classes of the classifier (default: 8, the paper's)",
    )
    g.add_argument(
        "--se-reduction", type=int, default=8, help="SE ratio of the 'se' head (default: 8)"
    )
    g.add_argument("--params-only", action="store_true", help="parameter counts only, no timing")
    g.add_argument(
        "--no-train", action="store_true", help="time inference only, not the training step"
    )


_DESCRIPTION = """\
Measure what bilinear pooling costs: parameters, time and the memory kept for backward.

  layers   forward+backward time and saved-for-backward bytes of each pooling path
           vs the naive op-by-op chain and the bare batched matmul of the same size
  models   exact parameter counts and images/s (inference, training step) of
           backbone x head x resolution vs the plain backbone
  demo     layers --quick + models --quick (what `make demo` runs)
  report   one Markdown file from the layers/models results of a folder

Read the ratios, not the times: every row shows ours / baseline measured side by side
in the same run (medians after warm-up, candidates interleaved), which stays
meaningful on a shared, noisy machine where absolute times do not. Each run prints a
Markdown table; with --out it writes CSV, JSON (with the environment and raw timings),
Markdown and, when matplotlib is installed, a PNG plot."""


def build_parser() -> argparse.ArgumentParser:
    """The ``bilinearpool-bench`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="bilinearpool-bench",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  bilinearpool-bench layers --out results/layers\n"
        "  bilinearpool-bench models --backbones resnet50 --resolutions 224 --out results/models\n"
        "  bilinearpool-bench models --device cuda --amp --channels-last --out results/gpu\n"
        "  bilinearpool-bench demo\n"
        "See `bilinearpool-bench SUBCOMMAND --help` for the options of each.",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    fmt = argparse.HelpFormatter
    p = sub.add_parser(
        "layers",
        help="forward+backward time and saved bytes of pooling layers vs the naive chain",
        description="Time forward+backward (median after warm-up, all cases interleaved) and count the "
        "bytes autograd saves for backward (exact, saved_tensors_hooks; on CUDA also the peak memory) "
        "of every pooling case, against the naive op-by-op chain (bmm / HW -> sign*sqrt -> "
        "F.normalize) and the bare batched matmul of the same size. Inputs are relu(randn) maps.",
        formatter_class=fmt,
    )
    _layers_options(p)
    _common(p, out_default=None)
    p = sub.add_parser(
        "models",
        help="parameters and images/s of backbone x head x resolution vs the plain backbone",
        description="Exact parameter counts (checked against the closed form) and throughput, "
        "images/s for inference and for one training step, of every backbone x head x resolution, "
        f"with {8} classes and random weights (nothing is downloaded). Each row shows its ratio to the "
        "plain backbone (global average pooling) at the same resolution, measured interleaved.",
        formatter_class=fmt,
    )
    _models_options(p)
    _common(p, out_default=None)
    p = sub.add_parser(
        "demo",
        help="quick run of both benchmarks (what `make demo` runs)",
        description="`layers --quick` and `models --quick` (the paper's 12 models at 224px, batch 2, "
        "1 warm-up + 2 timed rounds): a few minutes on two CPU cores.",
        formatter_class=fmt,
    )
    _common(p, out_default="results/demo")
    p = sub.add_parser(
        "report",
        help="one Markdown file from the layers/models results in a folder",
        description="Collect FOLDER/layers.json and FOLDER/models.json (their commands, environments, "
        "tables and goals) into one Markdown file.",
        formatter_class=fmt,
    )
    p.add_argument("folder", type=Path, help="folder written by `layers --out` / `models --out`")
    p.add_argument("--out", type=Path, default=None, help="Markdown file to write (default: print)")
    p.add_argument("--title", default="bilinearpool benchmark results", help="heading of the file")
    p.add_argument(
        "--note", action="append", default=None, help="paragraph under the heading (repeatable)"
    )
    return parser


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch_size", "repeats", "threads", "num_classes", "se_reduction"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, but got {value}")
    if getattr(args, "warmup", None) is not None and args.warmup < 0:
        parser.error(f"--warmup must be at least 0, but got {args.warmup}")
    for res in getattr(args, "resolutions", None) or []:
        if res < 32:
            parser.error(f"--resolutions must be at least 32 pixels, but got {res}")


def _finish(result: BenchResult, out: Path | None) -> list[Path]:
    print(result.markdown())
    if out is None:
        return []
    return write_result(result, out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bilinearpool-bench`` (and ``python -m bilinearpool.bench``)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _check_positive(parser, args)
    command = "bilinearpool-bench " + shlex.join(argv)
    if args.command == "report":
        # The title and notes are printed in the report itself; the command shows where they go.
        shown = [
            "TEXT" if i > 0 and argv[i - 1] in ("--note", "--title") else a
            for i, a in enumerate(argv)
        ]
        return _report(args, command="bilinearpool-bench " + shlex.join(shown))
    written: list[Path] = []
    if args.command == "layers":
        written += _finish(run_layers(args, command=command), args.out)
    elif args.command == "models":
        written += _finish(run_models(args, command=command), args.out)
    elif args.command == "demo":
        args.quick = True
        for name, option in (("shapes", None), ("cases", None), ("backbones", None), ("heads", None),
                             ("resolutions", None), ("batch_size_at", None), ("num_classes", 8),
                             ("se_reduction", 8), ("params_only", False), ("no_train", False)):  # fmt: skip
            setattr(args, name, option)
        written += _finish(
            run_layers(args, command=command + "  (layers part: layers --quick)"), args.out
        )
        written += _finish(
            run_models(args, command=command + "  (models part: models --quick)"), args.out
        )
    if written:
        print("Results written to:\n" + "\n".join(f"  {p}" for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
