"""``bilinearpool-bench``: parameters, speed and saved memory of bilinear pooling, as tables.

Subcommands:

- ``layers``: forward+backward time and saved-for-backward bytes of every pooling path in
  :data:`bilinearpool.bench.LAYER_CASES` against the naive op-by-op chain and the bare
  batched matrix product, at the shapes of the benchmark protocol;
- ``models``: exact (and analytic) parameter counts and images/s (inference and one
  training step) of backbone x head x resolution, relative to the plain backbone;
- ``demo``: ``layers --quick`` and ``models --quick`` (what ``make demo`` runs);
- ``report``: one Markdown file from the results of ``layers`` and ``models`` in a folder,
  its tables and goal lines rebuilt from the raw measurements (and checked against the rows).

Every run prints a Markdown table, and with ``--out DIR`` writes ``<name>.csv``,
``<name>.json`` (rows, raw timings, settings, environment), ``<name>.md`` and, when
matplotlib is installed, ``<name>.png``. Ratios measured side by side in one run are the
headline; absolute times on a shared CPU are not comparable between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib
import io
import json
import math
import os
import re
import secrets
import shlex
import signal
import sys
import tempfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import bench
from .functional._checks import plural

__all__ = [
    "BenchResult",
    "ResultMismatchError",
    "build_parser",
    "main",
    "rebuild_result",
    "run_layers",
    "run_models",
    "write_result",
]

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
#: SE ratio of the ``se`` head when --se-reduction is not given (the paper's).
PAPER_SE_REDUCTION = 8
#: Goals of issue 4, checked in the tables.
TIME_GOAL = 0.5  # fused pooling fwd+bwd / naive chain
MEMORY_GOAL = 1.1  # fused pooling saved bytes / input map bytes
THROUGHPUT_GOAL = 0.85  # Fast BCNN inference images/s / plain backbone's, at 224
#: Below this many timed rounds (--quick, demo) the report says its verdicts are no measurement.
FEW_ROUNDS = 3
#: Timed rounds of ``--quick`` runs (and of ``demo``), on every device.
QUICK_ROUNDS = 2
#: ``params_ok`` of a head whose options have no closed form (the check does not apply).
PARAMS_UNCHECKED = "n/a"
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
        lines = [f"## {self.title}", ""]
        # a run cut short says so at the top too, not only in the notes at the end
        lines += [f"**{n}**\n" for n in self.meta.get("notes") or [] if str(n).startswith("INCOMPLETE")]
        lines += [
            f"Command: `{_command_with_env(self.meta)}`",
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
            lines += ["", "Goals:", ""]
            rounds = settings.get("timed_rounds")
            if isinstance(rounds, int) and rounds < FEW_ROUNDS:
                how = ("as `--quick` and `demo` run" if rounds == QUICK_ROUNDS
                       else f"fewer than the {QUICK_ROUNDS} of `--quick` and `demo`")  # fmt: skip
                lines += [
                    f"(Only {rounds} timed round{'s' if rounds != 1 else ''}, {how}: the "
                    "time and throughput verdicts below check that the code runs, they are not a "
                    "measurement. The full runs' results are committed in the repository's "
                    "benchmarks/results/, e.g. cpu-2core.md.)",
                    "",
                ]
            lines += [f"- {g}" for g in self.meta["goals"]]
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

    A ``|`` in a cell (a registered case's name, an error message) is escaped, ``\\|``: it
    would end the cell and shift the rest of the row.

    Examples:
        >>> print(markdown_table([{"a": 1, "b": 0.5}], ["a", "b"]))
        | a | b |
        |---|---|
        | 1 | 0.50 |
        >>> print(markdown_table([{"case": "gap|mean"}], ["case"]).splitlines()[-1])
        | gap\\|mean |
    """

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    head = "| " + " | ".join(cell(c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(_fmt(row.get(c))) for c in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _command_with_env(meta: dict[str, Any]) -> str:
    """A result's command as a shell line with the variables it ran under that change what
    is measured (:data:`bilinearpool.bench.SWITCHES` set, ``runtime_env``) before it, so
    that the line copied runs the same setup (``THP_MEM_ALLOC_ENABLE=1 bilinearpool-bench
    layers ...``); the recorded command alone left them out.

    Examples:
        >>> _command_with_env({"command": "bilinearpool-bench layers", "environment": {
        ...     "THP_MEM_ALLOC_ENABLE": "1", "BILINEARPOOL_TRITON": None, "runtime_env": {"OMP_X": "a b"}}})
        "THP_MEM_ALLOC_ENABLE=1 OMP_X='a b' bilinearpool-bench layers"
    """
    env = meta.get("environment") or {}
    recorded = {k: env[k] for k in bench.SWITCHES if env.get(k) is not None}
    recorded.update(env.get("runtime_env") or {})
    prefix = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in recorded.items())
    return f"{prefix} {meta['command']}" if prefix else str(meta["command"])


def _describe_environment(env: dict[str, Any]) -> str:
    parts = [
        f"torch {env.get('torch')}",
        f"{env.get('device_type')} ({env.get('device')})",
        f"{env.get('threads')} {plural(env.get('threads'), 'thread')} of "
        f"{env.get('cpu_count')} {plural(env.get('cpu_count'), 'CPU')}",
    ]
    for key in ("torchvision", "timm", "numpy"):
        if env.get(key):
            parts.append(f"{key} {env[key]}")
    if "bilinearpool" in env:
        # None: run from a checkout on the import path, not installed (results before the
        # package's own __version__ was recorded in that case)
        code = f"bilinearpool {env['bilinearpool'] or '(not installed)'}"
        if env.get("git_commit"):
            code += f" (git {env['git_commit'][:12]}{', dirty' if env.get('git_dirty') else ''})"
        elif env.get("git_problem"):  # a checkout git would not read
            code += f" (git: {env['git_problem']})"
        elif "git_commit" in env:
            code += " (not a git checkout)"
        parts.append(code)
    switches = [f"{k}={env[k] if env[k] is not None else 'unset'}" for k in bench.SWITCHES if k in env]
    if switches:
        parts.append(" ".join(switches))
    if "runtime_env" in env:  # recorded since format 2: an empty dict means none was set
        runtime = env["runtime_env"] or {}
        names = "/".join(env.get("runtime_env_watched") or bench.RUNTIME_ENV_WATCHED_BEFORE)
        parts.append(" ".join(f"{k}={v}" for k, v in runtime.items()) or f"no {names} set")
    if "transparent_hugepages" in env:
        parts.append(f"transparent huge pages {env['transparent_hugepages'] or 'unknown'}")
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}, cuDNN {env.get('cudnn')}")
    if "float32_matmul_precision" in env:  # recorded since format 2 runs of later code
        matmul = f"float32 matmul precision {env['float32_matmul_precision']}"
        tf32 = [f"{k}={env[k]}" for k in ("cuda_matmul_allow_tf32", "cudnn_allow_tf32") if k in env]
        parts.append(matmul + (f" ({', '.join(tf32)})" if tf32 else ""))
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
        fig = _plot_models(plt, result.rows, result.meta["settings"].get("num_classes"))
    elif result.name == "layers":
        fig = _plot_layers(plt, result.rows)
    else:
        return None
    if fig is None:
        return None
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def _plot_models(plt: Any, rows: list[dict[str, Any]], num_classes: int | None) -> Any:
    rows = [r for r in rows if r.get("params") is not None]  # pairs that were built
    if not rows:
        return None
    models = list(dict.fromkeys(_model_label(r) for r in rows))
    resolutions = sorted({r["resolution"] for r in rows if r.get("infer_img_s") is not None})
    if not resolutions:  # nothing timed (--params-only): the parameters alone, no empty panel
        fig, ax_p = plt.subplots(1, 1, figsize=(max(5, 0.6 * len(models) + 2), 5))
        _plot_parameters(ax_p, rows, models, num_classes)
        return fig
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(models) + 4), 5))
    width = 0.8 / max(1, len(resolutions))
    for i, res in enumerate(resolutions):
        values = {_model_label(r): r["infer_img_s"] for r in rows if r["resolution"] == res}
        xs = [j + i * width for j in range(len(models))]
        ax_t.bar(xs, [values.get(m) or 0.0 for m in models], width=width, label=f"{res}px")
    ax_t.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(models))], models, rotation=90, fontsize=7
    )
    ax_t.set_ylabel("inference images/s")
    ax_t.set_title("Throughput (higher is better)")
    ax_t.legend(fontsize=7)
    _plot_parameters(ax_p, rows, models, num_classes)
    return fig


def _model_label(row: dict[str, Any]) -> str:
    """A model's label under its bars: backbone over head."""
    return f"{row['backbone']}\n{row['head']}"


def _plot_parameters(ax: Any, rows: list[dict[str, Any]], models: list[str], num_classes: int | None) -> None:
    """Bars of each model's parameters (millions) on ``ax``."""
    params = {_model_label(r): r["params"] / 1e6 for r in rows}
    ax.bar(range(len(models)), [params[m] for m in models], color="tab:gray")
    ax.set_xticks(range(len(models)), models, rotation=90, fontsize=7)
    ax.set_ylabel("parameters (millions)")
    ax.set_title(f"Parameters ({num_classes} classes)" if num_classes else "Parameters")


#: Colours of the layer plot's bars: matplotlib's tab10, black, then tab10's light shades.
#: The library's cases take the first ones in table order, so each keeps its colour in
#: every run (11 cases: one more than matplotlib's default cycle of 10).
_CASE_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8", "#ffbb78", "#98df8a",
                 "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")  # fmt: skip
#: Hatches that tell bars apart once a plot has more cases than colours.
_CASE_HATCHES = ("", "//", "..", "xx", "\\\\", "oo")


def _case_styles(cases: Sequence[str]) -> dict[str, dict[str, str]]:
    """Bar colour and hatch of each layer case: distinct within a plot, stable across runs.

    The library's cases (:data:`bench._LIBRARY_LAYER_CASES`) have fixed places in
    :data:`_CASE_PALETTE`; another case gets the colour its name hashes to among the rest
    (the next free one when a case of the same plot has it), so it too keeps its colour
    from run to run unless two such cases collide. When those colours run out, hatches
    tell apart bars of one colour.

    Examples:
        >>> styles = _case_styles(["naive", "lowrank-r512", "my-pool"])
        >>> styles["naive"]["color"], styles["lowrank-r512"]["color"]
        ('#1f77b4', '#000000')
        >>> len({s["color"] for s in styles.values()})
        3
    """
    library = bench._LIBRARY_LAYER_CASES
    slots = {name: library.index(name) for name in cases if name in library}
    taken = set(slots.values())
    first_free = len(library)
    free = max(1, len(_CASE_PALETTE) - first_free)
    for name in cases:
        if name in slots:
            continue
        start = zlib.crc32(name.encode("utf-8")) % free
        ring = (first_free + (start + i) % free for i in range(free))  # from its own colour on
        slot = next((k for k in ring if k not in taken), None)
        if slot is None:  # every colour taken: a hatched bar
            slot = len(_CASE_PALETTE)
            while slot in taken:
                slot += 1
        slots[name] = slot
        taken.add(slot)
    n, hatches = len(_CASE_PALETTE), _CASE_HATCHES
    return {
        name: {"color": _CASE_PALETTE[slot % n], "hatch": hatches[(slot // n) % len(hatches)]}
        for name, slot in slots.items()
    }


def _plot_layers(plt: Any, rows: list[dict[str, Any]]) -> Any:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    measured = any(isinstance(r.get(k), (int, float)) for r in rows for k in ("vs_naive", "saved_vs_input"))
    if not shapes or not cases or not measured:  # no empty axes when every row failed
        return None
    styles = _case_styles(cases)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(10, 0.5 * len(shapes) * len(cases)), 4.8))
    width = 0.8 / len(cases)
    panels = (
        (ax_t, "vs_naive", "fwd+bwd time / naive chain (log)", TIME_GOAL, "time"),
        (ax_m, "saved_vs_input", "saved-for-backward bytes / input (log)", MEMORY_GOAL, "memory"),
    )
    for ax, key, ylabel, goal, what in panels:
        for i, case in enumerate(cases):
            values = {r["shape"]: r.get(key) for r in rows if r["case"] == case}
            xs = [j + i * width for j in range(len(shapes))]
            heights = [values.get(sh) or float("nan") for sh in shapes]
            style = {k: v for k, v in styles[case].items() if v}  # no empty hatch
            ax.bar(xs, heights, width=width, label=case, **style)
        ax.axhline(1.0, color="black", linewidth=0.8)
        goal_line = ax.axhline(
            goal, color="tab:red", linestyle="--", linewidth=0.8, label=f"{what} goal {goal}x"
        )
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=8)
        ax.set_xlabel("B x C x H x W")
        ax.set_ylabel(ylabel)
    ax_t.set_title("Time relative to the naive chain (lower is better)")
    ax_m.set_title("Memory kept for backward (lower is better)")
    ax_t.legend(fontsize=7, ncol=2)
    ax_m.legend(handles=[goal_line], fontsize=7)  # the cases' colours: the time panel's legend
    return fig


def write_result(result: BenchResult, out: Path, *, plot: bool = True) -> list[Path]:
    """Write ``<name>.json``, ``<name>.csv``, ``<name>.md`` (and ``<name>.png``) into ``out``.

    ``plot=False`` leaves out the PNG (the partial results a run writes while it goes).
    Without a new plot (``plot=False``, matplotlib missing, nothing to draw) an older
    ``<name>.png`` in ``out`` is removed: it would show another run's results beside these.

    Every file is first written whole to a hidden temporary file in ``out``, the plot
    drawn too, and only then are they renamed onto their names, the JSON (the record that
    ``report`` reads) first: an interruption or a failed write before that leaves the
    earlier files as they were, never one half-written or one of another run beside them.

    Raises:
        ResultWriteError: (an OSError) a file that could not be written or put in place,
            naming the files of this result already in place and those left as they were.
    """
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=result.columns, extrasaction="ignore")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in result.columns})
    markdown = result.markdown()
    payload = {
        "benchmark": result.name,
        "title": result.title,
        **result.meta,
        "columns": result.columns,
        "rows": result.rows,
        "raw": result.raw,
        "markdown": markdown,
    }
    texts = {
        ".json": json.dumps(payload, indent=2, default=str) + "\n",
        ".csv": buffer.getvalue(),
        ".md": markdown,
    }
    png_path = out / f"{result.name}.png"
    staged: dict[Path, Path] = {}  # final name -> its temporary file
    try:
        for suffix, text in texts.items():
            path = out / f"{result.name}{suffix}"
            staged[path] = _staged_file(path)
            with open(staged[path], "w", newline="", encoding="utf-8") as f:
                f.write(text)
        if plot:
            staged[png_path] = _staged_file(png_path)
            if _plot(result, staged[png_path]) is None:
                staged.pop(png_path).unlink()
        if png_path not in staged:
            png_path.unlink(missing_ok=True)  # an older run's plot, not of these rows
        placed: list[Path] = []
        for path, temporary in staged.items():
            try:
                os.replace(temporary, path)
            except OSError as err:
                raise ResultWriteError(path, placed, [p for p in staged if p != path and p not in placed],
                                       err) from err
            placed.append(path)
    except ResultWriteError:
        raise
    except OSError as err:  # a temporary file: nothing is in place yet
        failed = Path(err.filename) if err.filename else out
        raise ResultWriteError(failed, [], list(staged), err) from err
    finally:
        for temporary in staged.values():
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)  # (those put in place are gone already)
    return placed


def _staged_file(path: Path) -> Path:
    """A new hidden temporary file beside ``path``, to be renamed onto it once written.

    Created with mode ``0o666`` less the umask, as any file the user writes (0644 under
    umask 022): ``tempfile.mkstemp`` makes ``0o600`` files, and the rename keeps the mode,
    so results meant for colleagues were readable by their owner only."""
    while True:
        staged = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # (a name drawn twice)
            continue
        return staged


class ResultWriteError(OSError):
    """A results file that could not be written: which one, why, and what is in ``out`` now."""

    def __init__(self, path: Path, placed: Sequence[Path], kept: Sequence[Path], err: OSError) -> None:
        if placed:
            now = (f"; in place: this run's {', '.join(p.name for p in placed)}; left as they were: "
                   f"{', '.join(p.name for p in [path, *kept])}")
        else:
            now = f"; the files in {path.parent} are left as they were"
        super().__init__(f"writing {path} failed with {_error_text(err)}{now}")
        self.errno = err.errno
        self.placed = [p.name for p in placed]


class _NoBar:
    """Stands in for a tqdm bar when tqdm is missing or the bar is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _reach(bar: Any, expected: int) -> int:
    """Bring ``bar`` to ``expected`` calls at the end of a part of the plan (a shape, a
    backbone) and return where the next part starts: calls that never ran (a case or
    step left out after it failed, a head skipped) count as done, so that the bar does
    not stall short of its end; calls beyond the plan (a timing restarted) extend its
    total."""
    n = getattr(bar, "n", None)
    if not isinstance(n, int):
        return expected
    if n < expected:
        bar.update(expected - n)
    elif n > expected:
        bar.total += n - expected
        bar.refresh()
    return max(n, expected)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    # Redirected to a file (`make demo > log`), a bar is a frame per refresh: one every
    # 30 s there keeps the progress readable in the log without hundreds of frames (the
    # postfix is set without a refresh of its own: it shows at the next one).
    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    # (tqdm's monitor thread refreshes a bar left alone for maxinterval, 10 s by default)
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False,
                mininterval=0.1 if interactive else 30.0, maxinterval=10.0 if interactive else 30.0)


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
            "statistic": ("median of the timed rounds, candidates interleaved, in a new order each round "
                          "(whole balanced designs, then seeded random orders)"),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "channels_last": self.channels_last,
            "seed": self.seed,
        }


def _device_problem(text: str) -> str | None:
    """Why ``--device text`` cannot run on this machine, or None when it can."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        return f"--device expected cpu, cuda, cuda:N or mps, but got {text!r}"
    if device.type == "cpu":
        if device.index not in (None, 0):  # torch takes any index and ignores it
            return f"--device expected cpu (one CPU device, index 0), but got {text!r}"
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {text} was asked for, but torch.cuda.is_available() is False"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return (
                f"--device {text} was asked for, but only {count} CUDA "
                f"{plural(count, 'device is', 'devices are')} visible "
                f"({'cuda:0' if count == 1 else f'cuda:0 ... cuda:{count - 1}'})"
            )
        return None
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            return f"--device {text} was asked for, but torch.backends.mps.is_available() is False"
        return None
    return f"--device expected cpu, cuda, cuda:N or mps, but got {text!r}"


def _settings(args: argparse.Namespace, kind: str) -> _Settings:
    problem = _device_problem(args.device)
    if problem is not None:
        raise ValueError(problem)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.quick:
        warmup, repeats = 1, QUICK_ROUNDS
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


def _peak_bytes(
    step: Callable[[], object], device: torch.device, params: Iterable[Tensor] = ()
) -> int | None:
    """CUDA: peak bytes allocated during one (warm) call of ``step`` above what was allocated
    before it; None on other devices.

    The gradients of ``params`` (those the step computes) are set to None first: a step
    frees the previous call's gradients (``zero_grad(set_to_none=True)``) before making new
    ones, so with them still allocated the baseline would be too high and the peak too low
    by up to their size.
    """
    if device.type != "cuda":
        return None
    for p in params:
        p.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _error_text(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line, cut to about ``limit`` characters
    (``SIGTERM`` for the exception a SIGTERM raises)."""
    if isinstance(err, _Terminated):
        return "SIGTERM"
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()


def _drop_failing(
    steps: dict[str, Callable[[], object]], notes: dict[str, list[str]], what: str
) -> dict[str, Callable[[], object]]:
    """Run each step once (a warm-up); leave out, with a note, those that raise.

    Running out of memory is noted as such; any other error with its type and message,
    so that one case that cannot run (a batch of 1 through BatchNorm, an input too small
    for the backbone) does not stop the others.
    """
    kept = {}
    for name, step in steps.items():
        try:
            step()
        except torch.OutOfMemoryError:
            notes[name].append(f"{what}: out of memory at this batch size")
            _free_memory()
            continue
        except Exception as err:
            notes[name].append(f"{what} failed: {_error_text(err)}")
            _free_memory()
            continue
        kept[name] = step
    return kept


class _StepFailed(Exception):
    """A candidate raised while being timed (carries its name)."""

    def __init__(self, name: str, error: Exception) -> None:
        super().__init__(f"{name}: {_error_text(error)}")
        self.name = name
        self.error = error


def _round_robin_robust(
    steps: dict[str, Callable[[], object]],
    notes: dict[str, list[str]],
    what: str,
    s: _Settings,
    on_call: Callable[[str], None],
) -> dict[str, list[float]]:
    """:func:`bench.round_robin` of ``steps``; a step that raises is noted and left out, and the
    rest are timed again from the start (so that all rows of a table share their rounds)."""
    steps = dict(steps)

    def named(name: str, step: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            try:
                return step()
            except Exception as err:
                raise _StepFailed(name, err) from err

        return call

    while steps:
        try:
            return bench.round_robin(
                {n: named(n, st) for n, st in steps.items()},
                warmup=s.warmup,
                repeats=s.repeats,
                device=s.device,
                on_call=on_call,
            )
        except _StepFailed as failure:
            notes[failure.name].append(f"{what} failed: {_error_text(failure.error)}")
            del steps[failure.name]
            _free_memory()
    return {}


def _write_partial(
    checkpoint: Checkpoint | None, result: Callable[[str], BenchResult], done: int, total: int, unit: str
) -> None:
    """Hand the rows so far to ``checkpoint`` after ``done`` of ``total`` groups (not after the last)."""
    if checkpoint is not None and done < total:
        checkpoint(result(f"INCOMPLETE: written after {done} of {total} {unit}, the run goes on"))


def _write_stopped(
    checkpoint: Checkpoint | None,
    result: Callable[[str], BenchResult],
    err: BaseException,
    where: str,
    rows: int,
    name: str,
) -> None:
    """When a run stops with ``err`` at ``where``: write its ``rows`` measured rows, marked
    incomplete, and say so on stderr (nothing when there is nowhere to write or nothing).

    Writing them can fail too (``err`` may itself be a failed write): that is said in the
    same one line on stderr and not raised, so that the caller re-raises ``err``, the
    error that stopped the run, with nothing chained to it.
    """
    if checkpoint is None:
        return
    if not rows:  # a warning may have said that this run replaces the folder's files
        print(
            f"bilinearpool-bench: stopped at {where} by {_error_text(err)}, before any row was "
            f"measured: no {name} results of this run are written ({name}.* files already in "
            "the output folder are an earlier run's)",
            file=sys.stderr,
        )
        with contextlib.suppress(AttributeError):
            err._bench_said = True  # type: ignore[attr-defined]
        return
    try:
        checkpoint(
            result(
                f"INCOMPLETE: the run stopped at {where} with {_error_text(err)}; "
                f"the {rows} rows of its table came before"
            )
        )
    except Exception as failed:
        placed = getattr(failed, "placed", None)
        where_now = (f"the output folder holds them (marked INCOMPLETE) in {', '.join(placed)} only"
                     if placed else
                     "the output folder does not hold them (its files are missing, or were "
                     "written earlier)")
        print(
            f"bilinearpool-bench: stopped at {where} by {_error_text(err)}; writing the {rows} "
            f"rows measured before failed too, with {_error_text(failed)}: {where_now}",
            file=sys.stderr,
        )
    else:
        print(
            f"bilinearpool-bench: stopped at {where} by {_error_text(err)}; "
            "what was measured before is written (marked INCOMPLETE)",
            file=sys.stderr,
        )
    with contextlib.suppress(AttributeError):
        err._bench_said = True  # type: ignore[attr-defined]  # main says no more of it


def _load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _round_ratios(a: Sequence[float] | None, b: Sequence[float] | None) -> list[float]:
    """Per-round ratios a[i] / b[i] (rounds are interleaved, so paired); [] when not paired."""
    if not a or not b or len(a) != len(b):
        return []
    return [x / y for x, y in zip(a, b) if y > 0]


def _ratio_range(a: Sequence[float] | None, b: Sequence[float] | None) -> str | None:
    """Smallest and largest per-round ratio a[i] / b[i], as ``"0.12-0.19"``.

    Examples:
        >>> _ratio_range([1.0, 3.0], [2.0, 2.0])
        '0.50-1.50'
        >>> _ratio_range([0.0021, 0.003], [1.0, 1.0])
        '0.0021-0.003'
        >>> _ratio_range([2e-4, 3e-4], [3.0, 3.0])
        '0.0000667-0.0001'
    """
    ratios = _round_ratios(a, b)

    def fmt(r: float) -> str:  # ratios below 0.01 with their digits: 0.00232 had 0.00-0.00
        # positional, never 4.09e-05: the range's "-" is read back by report
        if not 0 < abs(r) < 0.01:
            return f"{r:.2f}"
        return f"{r:.{2 - math.floor(math.log10(abs(r)))}f}".rstrip("0").rstrip(".")

    return f"{fmt(min(ratios))}-{fmt(max(ratios))}" if ratios else None


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


def _path(text: str) -> Path:
    """A path option's value: an empty string is refused (``Path("")`` is the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, but got {text!r}")
    return Path(text)


def _text(text: str) -> str:
    """A text option's value (``--title``, ``--note``): blank text is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected some text, but got {text!r}")
    return text


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = re.split(r"[x,]", text.lower())
    # isdecimal, not isdigit: "²" is a digit that int() refuses
    if len(parts) != 4 or not all(p.strip().isdecimal() and int(p) > 0 for p in parts):
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


def _own_tensors(fn: bench.LayerFn) -> list[Tensor]:
    """The layer's parameters and buffers: the model holds them whatever autograd saves."""
    if not isinstance(fn, nn.Module):
        return []
    return [*fn.parameters(), *fn.buffers()]


def _saved_with_linear(fn: bench.LayerFn, inputs: Sequence[Tensor], dim: int, s: Any) -> int:
    """Saved-for-backward bytes of ``fn`` followed by a linear classifier on its output
    (:data:`bench.CLASSIFIER_CLASSES` classes); the classifier's weight and the layer's own
    parameters and buffers are not counted (their autocast copies are: only the graph holds
    them)."""
    weight = torch.zeros(bench.CLASSIFIER_CLASSES, dim, device=s.device, requires_grad=True)
    leaves = [x.detach().requires_grad_() for x in inputs]
    with (
        bench.SavedTensorCounter(exclude=[weight, *_own_tensors(fn)]) as saved,
        bench.autocast_context(s.device, s.amp_dtype),
    ):
        F.linear(fn(*leaves).flatten(1), weight)
    return saved.nbytes


#: Where a run reports its rows while it goes (``--out``: the files, rewritten after each group).
Checkpoint = Callable[[BenchResult], object]

#: Version of the JSON files: 2 keeps every measurement in ``raw`` (the rows are rebuilt
#: from it) and leaves the layer's own parameters out of the saved bytes; files without
#: the field are version 1 (``raw`` holds the timings only).
RESULT_FORMAT = 2

#: Columns of a layer row that a case that failed leaves blank.
_LAYER_VALUES = ("fwd_bwd_ms", "vs_naive", "vs_naive_range", "vs_floor", "saved_MiB", "input_MiB",
                 "saved_vs_input", "saved_with_linear_MiB", "peak_MiB", "D", "layer_params",
                 "classifier_params", "goals")  # fmt: skip
#: What a layer case's raw record holds besides its timings (None when it failed).
_LAYER_MEASURED = ("saved_bytes", "input_bytes", "saved_with_linear_bytes", "peak_bytes", "D",
                   "layer_params", "out_dtype")  # fmt: skip
#: Settings entry that says how saved bytes are counted (absent in version 1 files).
_SAVED_BYTES_RULE = (
    "unique storages autograd saves, inputs included; the layer's own parameters and "
    "buffers not counted"
)


def _measure_layer(
    case: bench.LayerCase, c: int, maps: list[Tensor], gen: torch.Generator, s: _Settings
) -> tuple[Callable[[], None], dict[str, Any]]:
    """Build ``case`` for ``c`` channels, count what it saves; its timed step and the counts."""
    fn = case.build(c, s.device)
    inputs = maps[: case.streams]
    own = _own_tensors(fn)
    leaves = [x.detach().requires_grad_() for x in inputs]
    # The layer's weights are not counted: the model holds them whether saved or not.
    with (
        bench.SavedTensorCounter(exclude=own) as saved,
        bench.autocast_context(s.device, s.amp_dtype),
    ):
        out = fn(*leaves)
    grad = torch.randn(out.shape, generator=gen).to(device=s.device, dtype=out.dtype)
    out.backward(grad)
    dim = bench.layer_output_dim(fn, c, streams=case.streams, out=out)
    out_dtype = out.dtype
    del out, leaves
    step = _fwd_bwd(fn, inputs, grad, s.amp_dtype)
    map_bytes = maps[0].numel() * maps[0].element_size()
    return step, {
        "saved_bytes": saved.nbytes,
        "input_bytes": map_bytes * case.streams,
        "saved_with_linear_bytes": _saved_with_linear(fn, inputs, dim, s),
        "peak_bytes": _peak_bytes(step, s.device, own),  # buffers have no gradient to clear
        "D": dim,
        # trainable only, as the tables say (a frozen parameter of a registered case is no
        # weight to learn)
        "layer_params": bench.count_parameters(fn, trainable_only=True) if isinstance(fn, nn.Module) else 0,
        "out_dtype": str(out_dtype).replace("torch.", ""),
    }


def _check_layer_cases(names: Sequence[str]) -> list[str]:
    """``names`` without repeats, in order; ValueError naming the unknown ones."""
    unknown = [n for n in names if n not in bench.LAYER_CASES]
    if unknown:
        raise ValueError(
            f"unknown {plural(len(unknown), 'layer case')} {unknown}; known: {list(bench.LAYER_CASES)}"
        )
    return list(dict.fromkeys(names))


def _case_info(cases: Sequence[bench.LayerCase]) -> dict[str, dict[str, Any]]:
    """What the tables need of each case (saved in the JSON: ``report`` rebuilds them from it)."""
    return {
        c.name: {"description": c.description, "role": c.role, "goal": c.goal, "streams": c.streams,
                 "variant_of": c.variant_of}
        for c in cases
    }


def run_layers(
    args: argparse.Namespace, *, command: str, checkpoint: Checkpoint | None = None
) -> BenchResult:
    """Measure every selected layer case at every shape (see ``bilinearpool-bench layers --help``).

    A case that raises at a shape (a batch of 1 through BatchNorm, say) gets a row with its
    error and the run goes on. ``checkpoint``, when given, receives the result so far after
    every shape, and once more, marked incomplete, when the run stops with an exception.
    The rows are computed from the raw measurements (:func:`_layer_rows`), as ``report``
    computes them again.
    """
    s = _settings(args, "layers")
    env = bench.environment(s.device)
    shapes = [tuple(sh) for sh in (args.shapes or LAYER_SHAPES)]
    if args.batch_size is not None:
        shapes = [(args.batch_size, c, h, w) for _, c, h, w in shapes]
    shapes = list(dict.fromkeys(shapes))
    names = _check_layer_cases(args.cases or list(bench.LAYER_CASES))
    # The ratios need both references; they lead the table.
    names = ["naive", "matmul-floor"] + [n for n in names if n not in ("naive", "matmul-floor")]
    cases = [bench.LAYER_CASES[n] for n in names]
    plan = [(shape, [c for c in cases if c.applies(shape[1])]) for shape in shapes]
    total = sum(len(cs) * (1 + s.warmup + s.repeats) for _, cs in plan)
    bar = _progress(total, "layers", s.progress)
    gen = torch.Generator().manual_seed(s.seed)
    raw: list[dict[str, Any]] = []
    info = _case_info(cases)
    settings = {**s.describe(), "input": "relu(randn), float32", "saved_bytes": _SAVED_BYTES_RULE}
    # every case at every shape: one that does not run at a shape's channel count gets a
    # row that says so
    planned = [["x".join(map(str, shape)), [c.name for c in cases]] for shape, _ in plan]
    in_process = _in_process_note("layer case", names, getattr(args, "imports", None))

    def result(note: str | None = None) -> BenchResult:
        env_now = {**env, "load_average_at_end": _load_average()}
        notes = ([note] if note else []) + in_process
        return _layers_result(raw, info, settings, env_now, command, planned, notes)

    where = "the start"
    counted = 0  # calls the bar has counted up to the end of the last shape
    try:
        for done, (shape, shape_cases) in enumerate(plan, 1):
            calls = len(shape_cases) * (1 + s.warmup + s.repeats)
            b, c, h, w = shape
            label = "x".join(map(str, shape))
            where = f"{label} inputs"
            bar.set_postfix_str(where, refresh=False)
            try:
                maps = [
                    torch.relu(torch.randn(b, c, h, w, generator=gen)).to(s.device)
                    for _ in range(2)
                ]
                if s.channels_last:
                    maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
            except Exception as err:  # e.g. out of memory: every case's row says so, and on
                maps = []
                _free_memory()
                text = f"inputs failed: {_error_text(err)}"
                raw.extend(_unmeasured(label, case.name, text) for case in shape_cases)
                raw.extend(_skipped_records(label, c, cases))
                counted = _reach(bar, counted + calls)
                _write_partial(checkpoint, result, done, len(plan), "shapes")
                continue
            steps: dict[str, Callable[[], object]] = {}
            measured: dict[str, dict[str, Any]] = {}
            errors: dict[str, list[str]] = {case.name: [] for case in shape_cases}
            for case in shape_cases:
                where = f"{label} {case.name}"
                bar.set_postfix_str(f"{where}: saved bytes", refresh=False)
                try:
                    steps[case.name], measured[case.name] = _measure_layer(case, c, maps, gen, s)
                except Exception as err:
                    errors[case.name].append(f"failed: {_error_text(err)}")
                    _free_memory()
                bar.update(1)
            where = f"{label} timing"
            bar.set_postfix_str(where, refresh=False)
            times = _round_robin_robust(steps, errors, "timing", s, lambda _: bar.update(1))
            for case in shape_cases:
                raw.append(
                    {
                        "shape": label,
                        "case": case.name,
                        "times_s": times.get(case.name, []),
                        **dict.fromkeys(_LAYER_MEASURED),
                        **measured.get(case.name, {}),
                        "error": "; ".join(errors[case.name]) or None,
                    }
                )
            raw.extend(_skipped_records(label, c, cases))
            counted = _reach(bar, counted + calls)
            del steps, maps
            gc.collect()
            where = f"{label} writing the results so far"
            _write_partial(checkpoint, result, done, len(plan), "shapes")
    except BaseException as err:
        _write_stopped(checkpoint, result, err, where, len(raw), "layers")
        raise
    finally:
        bar.close()
    return result()


#: How the error of a case that does not run at a shape's channel count begins.
_SKIPPED = "skipped:"


def _unmeasured(label: str, case: str, error: str) -> dict[str, Any]:
    """The raw record of a case not measured at shape ``label``, with the reason."""
    return {"shape": label, "case": case, "times_s": [], **dict.fromkeys(_LAYER_MEASURED), "error": error}


def _skipped_records(label: str, channels: int, cases: Sequence[bench.LayerCase]) -> list[dict[str, Any]]:
    """A record for each case asked for that does not run at ``channels`` channels, saying so."""
    return [
        _unmeasured(label, case.name, f"{_SKIPPED} runs at C <= {case.max_channels} only (C = {channels} here)")
        for case in cases if not case.applies(channels)
    ]


def _layer_rows(
    raw: Sequence[dict[str, Any]], cases: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The table's rows, computed from the raw records: medians, ratios, MiB, goal verdicts.

    Every number of a row comes from its record (counts) and from the timings of the
    records of the same shape (ratios to ``naive`` and ``matmul-floor``, timed in the same
    rounds).
    """
    times: dict[str, dict[str, list[float]]] = {}
    for rec in raw:
        times.setdefault(rec["shape"], {})[rec["case"]] = list(rec.get("times_s") or [])
    medians = {
        shape: {n: bench.median(t) for n, t in by_case.items() if t}
        for shape, by_case in times.items()
    }
    rows = []
    for rec in raw:
        shape, name = rec["shape"], rec["case"]
        med, mine = medians[shape], times[shape][name]
        row: dict[str, Any] = {"shape": shape, "case": name, **dict.fromkeys(_LAYER_VALUES)}
        if rec.get("saved_bytes") is not None:
            dim = rec.get("D")
            row.update(
                saved_MiB=rec["saved_bytes"] / MIB,
                input_MiB=rec["input_bytes"] / MIB,
                saved_vs_input=rec["saved_bytes"] / rec["input_bytes"],
                saved_with_linear_MiB=_mib(rec.get("saved_with_linear_bytes")),
                peak_MiB=_mib(rec.get("peak_bytes")),
                D=dim,
                layer_params=rec.get("layer_params"),
                classifier_params=None if dim is None else bench.classifier_parameter_count(dim),
            )
            if rec.get("out_dtype") is not None:  # older files lack it
                row["out_dtype"] = rec["out_dtype"]
        t = med.get(name)
        if t is not None:
            naive = times[shape].get("naive")
            row.update(
                fwd_bwd_ms=t * 1e3,
                vs_naive=_ratio(t, med.get("naive")),
                vs_naive_range=_ratio_range(mine, naive),
                vs_floor=_ratio(t, med.get("matmul-floor")),
            )
            if cases.get(name, {}).get("goal") and row["saved_vs_input"] is not None:
                rounds = _round_ratios(mine, naive)
                row["goals"] = _layer_goal(row["vs_naive"], rounds, row["saved_vs_input"])
                if cases[name].get("variant_of"):  # not the goal's work: information only
                    row["goals"] = f"variant: {row['goals']}"
        if rec.get("error"):
            row["error"] = rec["error"]
        rows.append(row)
    return rows


def _mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / MIB


def _layers_result(
    raw: list[dict[str, Any]],
    cases: dict[str, dict[str, Any]],
    settings: dict[str, Any],
    env: dict[str, Any],
    command: str,
    plan: Sequence[Sequence[Any]],
    notes_first: Sequence[str] = (),
) -> BenchResult:
    """The layer table, summary, goals and notes, all computed from the raw records.

    Args:
        raw: one record per (shape, case) planned so far: timings and counts.
        cases: name -> description, role, goal, streams (see :func:`_case_info`).
        settings: the run's settings as saved in the JSON.
        env: the environment record.
        command: the command line of the run.
        plan: ``[shape, [case names]]`` of every shape planned, measured or not.
        notes_first: notes put before the others (an INCOMPLETE mark, an IN-PROCESS note).
    """
    rows = _layer_rows(raw, cases)
    columns = ["shape", "case", "fwd_bwd_ms", "vs_naive", "vs_naive_range", "vs_floor", "saved_MiB", "input_MiB",
               "saved_vs_input", "saved_with_linear_MiB"]  # fmt: skip
    if torch.device(settings.get("device", "cpu")).type == "cuda":
        columns.append("peak_MiB")
    columns += ["D", "layer_params", "classifier_params", "goals"]
    amp = _amp_dtype_name(settings)
    if amp is not None and any(r.get("out_dtype") for r in rows):
        columns.insert(columns.index("D"), "out_dtype")
    if any(r.get("error") for r in rows):
        columns.append("error")
    k = bench.CLASSIFIER_CLASSES
    summary_columns = ["shape", "case", "D", "layer_params", "classifier_params", "fwd_bwd_ms",
                       "vs_naive", "saved_vs_input", "saved_with_linear_MiB"]  # fmt: skip
    ours = [r for r in rows if cases.get(r["case"], {}).get("role", "ours") == "ours"]
    if any(r.get("error") for r in ours):  # a failed or skipped row is not left blank here
        summary_columns.append("error")
    if settings.get("saved_bytes"):
        weights = (
            "inputs included; the layer's own parameters and buffers not counted: the model "
            "holds them anyway"
        )
    else:
        weights = (
            "inputs included; in these older results also the layer's own parameters and "
            "buffers when it saves them, e.g. lowrank-r512's projections, which newer runs "
            "leave out"
        )
    meta = {
        "format": RESULT_FORMAT,
        "command": command,
        "environment": env,
        "settings": settings,
        "cases": cases,
        "plan": [list(p) for p in plan],
        "goals": _layer_goal_summary(rows, raw, cases, plan)
        + _failure_lines(rows, ("shape", "case")),
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
            "rows": [{col: r.get(col) for col in summary_columns} for r in ours],
        },
        "notes": [
            *notes_first,
            *_amp_notes(settings, "layers"),
            (
                "vs_naive and vs_floor: median fwd+bwd time of the row / that of `naive` (the op-by-op "
                "chain) and of `matmul-floor` (bare bmm) at the same shape, timed interleaved in this "
                "run; below 1 is faster. vs_naive_range: the smallest and largest ratio of single "
                "interleaved rounds (how much the noise moves it). A goal verdict goes by the median "
                "ratio and says 'within noise' when single rounds fall on both sides of the goal."
            ),
            (
                "saved_MiB: bytes autograd keeps for backward, counted exactly by unique storage with "
                f"torch.autograd.graph.saved_tensors_hooks ({weights}); input_MiB: the input map(s). "
                f"saved_with_linear_MiB: the same for the layer followed by an {k}-class linear "
                "classifier on its output (the classifier's weight not counted), what a model "
                "keeps: a linear layer keeps its input, so a layer that saves its own output "
                "(fast-bcnn-so) costs no more there than one that does not."
            ),
            *(["bcnn-2stream takes two maps of the shape, so its input is twice the others'."]
              if any(n.startswith("bcnn-2stream") for n in cases) else []),
            (
                "D: features per sample of the layer's output (its output_dim(C), checked against "
                "the shape of one output; for naive and matmul-floor the output's size). layer_params: "
                "trainable parameters of the layer itself (low-rank projections, the 1x1 conv + BN of "
                "a channel reduction; 0 for parameter-free poolings; compact-ts holds its fixed random "
                f"hashes and signs as buffers, not parameters). classifier_params: an {k}-class "
                f"nn.Linear(D, {k}) on top, {k}*D + {k}."
            ),
            "Cases: " + "; ".join(f"`{n}`: {c['description']}" for n, c in cases.items()) + ".",
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


def _amp_dtype_name(settings: dict[str, Any]) -> str | None:
    """The autocast dtype of a run (``"bfloat16"``, ``"float16"``), None when it ran without."""
    amp = settings.get("amp")
    return None if amp in (None, "off", False) else str(amp)


def _amp_notes(settings: dict[str, Any], kind: str) -> list[str]:
    """The note of a run under autocast: which arithmetic the ratios compare.

    Examples:
        >>> _amp_notes({"amp": "off"}, "layers")
        []
        >>> "float32 by design" in _amp_notes({"amp": "bfloat16"}, "layers")[0]
        True
    """
    amp = _amp_dtype_name(settings)
    if amp is None:
        return []
    if kind == "layers":
        who = (
            f"the baselines `naive` and `matmul-floor` run their matrix products in {amp}, "
            "while the library's poolings compute in float32 by design (autocast is turned off "
            "inside them: second-order statistics accumulate in float32; a 1x1 reduction conv "
            f"before one, as in isqrt-cov-r256, runs in {amp})"
        )
        dtype = (
            " out_dtype: the dtype of the layer's output under autocast. Saved bytes count the "
            "autocast copies of weights (e.g. the classifier's half-precision weight in "
            "saved_with_linear_MiB): memory only the graph holds."
        )
    else:
        who = (
            f"the backbones run in {amp}, while the library's bilinear poolings in the bcnn and "
            "fast-bcnn heads compute in float32 by design (second-order statistics accumulate "
            "in float32)"
        )
        dtype = ""
    return [
        f"Under autocast ({amp}): {who}. So the ratios compare what each path gives under "
        f"autocast, not the same arithmetic.{dtype}"
    ]


def _failure_lines(
    rows: list[dict[str, Any]], keys: Sequence[str], column: str = "error"
) -> list[str]:
    """One line naming the rows that failed or were skipped (their reasons are in the table)."""
    failed = [
        " ".join(str(r[k]) for k in keys if r.get(k) is not None) for r in rows if r.get(column)
    ]
    if not failed:
        return []
    return [f"Failed or skipped, with the reason in the {column} column: {'; '.join(failed)}"]


def _noise(rounds: Sequence[float], meets: Callable[[float], bool]) -> str | None:
    """``"rounds 0.45-0.72, within noise"`` when some single rounds meet a goal and some do not.

    Examples:
        >>> _noise([0.45, 0.72, 0.49], lambda r: r <= 0.5)
        'rounds 0.45-0.72, within noise'
        >>> _noise([0.12, 0.19], lambda r: r <= 0.5) is None
        True
    """
    hits = [meets(r) for r in rounds]
    if any(hits) and not all(hits):
        return f"rounds {min(rounds):.2f}-{max(rounds):.2f}, within noise"
    return None


def _layer_goal(ratio: float | None, rounds: Sequence[float], saved_ratio: float) -> str:
    """The goals column of a Fast BCNN row: time (by the median, with noise) and memory (exact)."""
    if ratio is None:
        parts = ["time: no naive baseline"]
    else:
        noise = _noise(rounds, lambda r: r <= TIME_GOAL)
        parts = [
            f"time {'met' if ratio <= TIME_GOAL else 'NOT met'} "
            f"({ratio:.3f}x{'; ' + noise if noise else ''})"
        ]
    parts.append(
        f"memory {'met' if saved_ratio <= MEMORY_GOAL else 'NOT met'} ({saved_ratio:.3f}x)"
    )
    return ", ".join(parts)


def _layer_goal_summary(
    rows: Sequence[dict[str, Any]],
    raw: Sequence[dict[str, Any]],
    cases: dict[str, dict[str, Any]],
    plan: Sequence[Sequence[Any]],
) -> list[str]:
    """One line per goal and Fast BCNN case, counted against the shapes planned for it."""
    by_key = {(r["shape"], r["case"]): r for r in rows}
    times = {(r["shape"], r["case"]): list(r.get("times_s") or []) for r in raw}
    lines = []

    def skipped(shape: str, name: str) -> bool:  # a case that does not run at that shape
        return str((by_key.get((shape, name)) or {}).get("error") or "").startswith(_SKIPPED)

    for name, info in cases.items():
        shapes = [shape for shape, names in plan if name in names and not skipped(shape, name)]
        if not info.get("goal") or not shapes:
            continue
        if info.get("variant_of"):
            judged = any(info["variant_of"] in names for _, names in plan)
            lines.append(_variant_line(name, info["variant_of"], shapes, by_key, judged))
            continue
        for what, key, limit in (
            ("fwd+bwd time", "vs_naive", TIME_GOAL),
            ("saved bytes", "saved_vs_input", MEMORY_GOAL),
        ):
            baseline = "the naive chain's" if key == "vs_naive" else "the input map's"
            values: list[tuple[str, float, str]] = []  # shape, ratio, how it reads
            missing = []
            for sh in shapes:
                row = by_key.get((sh, name))
                if row is None or row.get(key) is None:
                    missing.append(f"{sh}: {_why_not_measured(row, key)}")
                    continue
                v, noise = row[key], None
                if key == "vs_naive":
                    rounds = _round_ratios(times.get((sh, name)), times.get((sh, "naive")))
                    noise = _noise(rounds, lambda r: r <= limit)
                values.append((sh, v, f"{sh}: {v:.3f}x" + (f" [{noise}]" if noise else "")))
            met = [text for _, v, text in values if v <= limit]
            missed = [text for _, v, text in values if v > limit]
            n = len(shapes)
            head = f"`{name}` {what} <= {limit}x {baseline}: "
            if not values:
                text = "not measured at the planned shape"
                if n != 1:
                    text = f"not measured at any of the {n} planned shapes"
            elif not missed:
                count = f"all {n} shapes" if len(met) == n else f"{len(met)} of {n} shapes"
                text = f"met at {'the 1 shape' if n == 1 else count} (" + ", ".join(met) + ")"
            else:
                count = "the 1 shape" if n == 1 else f"{len(missed)} of {n} shapes"
                text = f"NOT met at {count} (" + ", ".join(missed) + ")"
                if met:
                    text += "; met at " + ", ".join(met)
            if missing:
                text += f"; {len(missing)} not measured: " + "; ".join(missing)
            lines.append(head + text)
    return lines


def _variant_line(
    name: str, of: str, shapes: Sequence[str], by_key: dict[tuple[str, str], dict[str, Any]],
    judged: bool = True,
) -> str:
    """The goal line of a variant of a goal case: its ratios, as information, not a verdict
    (``judged``: whether the run has ``of``, on which the goals are judged)."""
    parts = []
    for what, key in (
        ("fwd+bwd time / the naive chain's", "vs_naive"),
        ("saved bytes / the input map's", "saved_vs_input"),
    ):
        values = []
        for sh in shapes:
            row = by_key.get((sh, name))
            value = None if row is None else row.get(key)
            values.append(f"{sh}: {value:.3f}x" if value is not None
                          else f"{sh}: not measured ({_why_not_measured(row, key)})")
        parts.append(f"{what}: {', '.join(values)}")
    where = (f"the goals are judged on `{of}`" if judged else
             f"the goals are judged on `{of}`, which this run did not include")
    return f"`{name}` is a variant of `{of}` ({where}); for information, " + "; ".join(parts)


def _why_not_measured(row: dict[str, Any] | None, key: str) -> str:
    """Why a planned row has no value in column ``key``."""
    if row is None:
        return "the run stopped before measuring it"
    if row.get("error"):
        return row["error"]
    if key == "vs_naive" and row.get("fwd_bwd_ms") is not None:
        return "the naive chain was not timed at this shape (see its row)"
    return "no value (see the table)"


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def _parse_batch_at(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*=\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"expected RESOLUTION=BATCH, e.g. 448=1, but got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _parse_node(text: str) -> tuple[str, str]:
    m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*([^=\s]+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"expected BACKBONE=NODE, e.g. vit_b_16=encoder, but got {text!r}"
        )
    return m.group(1), m.group(2)


def _cuts(nodes: Iterable[tuple[str, str]] | None, resolution: int) -> dict[str, dict[str, Any]]:
    """Backbone name -> the ``node`` and ``sample_shape`` its heads are built with
    (``--node``): the channels are read from a zero image of ``resolution`` pixels.

    Examples:
        >>> _cuts([("vit_b_16", "encoder")], 224)
        {'vit_b_16': {'node': 'encoder', 'sample_shape': (3, 224, 224)}}
    """
    return {b: {"node": n, "sample_shape": (3, resolution, resolution)} for b, n in nodes or []}


def _cut_resolution(resolutions: Sequence[int]) -> int:
    """The resolution whose zero image reads a cut backbone's channels: 224, the size of
    the torchvision models that need a cut, when the run measures it, else its first."""
    return GOAL_RESOLUTION if GOAL_RESOLUTION in resolutions else resolutions[0]


def _batch_size(args: argparse.Namespace, device: torch.device, resolution: int) -> int:
    overrides = dict(args.batch_size_at or [])
    if resolution in overrides:
        return overrides[resolution]
    if args.batch_size is not None:
        return args.batch_size
    if args.quick:
        return 2
    if device.type == "cuda":
        return 32
    return 1 if resolution >= 448 else 2


#: What a models run records of a model's parameter counts, in its raw records
#: (``params_unchecked``: the head's options without a closed form, when it has some).
_PARAMS_RECORDED = ("channels", "params", "params_analytic", "params_unchecked")


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
            "params_ok": exact == analytic if analytic is not None else PARAMS_UNCHECKED,
        }
        if analytic is None:  # options without a closed form: the check does not apply
            out[head.name]["params_unchecked"] = head.unchecked_options()
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
    nodes: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Exact and analytic parameter counts of backbone x head, without timing anything.

    The models are built on the meta device (shapes only, no memory for weights; a model
    that cannot be built there is built on the CPU), so any ``num_classes`` counts.
    ``nodes`` maps a backbone name to the graph node every head cuts it at (a 224px zero
    image reads its channels), as ``models --node`` does: e.g. ``{"vit_b_16": "encoder"}``.

    Returns:
        One row per model: ``backbone``, ``head``, ``channels``, ``params`` (exact),
        ``params_analytic``, ``params_ok`` and ``params_vs_plain``. For a head with options
        that have no closed form (:meth:`~bilinearpool.bench.ModelHead.unchecked_options`),
        ``params_analytic`` is ``None``, ``params_ok`` is ``"n/a"`` and ``params_unchecked``
        names those options.

    Raises:
        ValueError: a head that cannot be built on a backbone (e.g. ``se`` on a backbone
            without residual blocks), naming both; the ``models`` command records such a
            pair in its notes instead and goes on.
    """
    selected = _select_heads(heads)
    backbones = list(backbones)
    problem = _nodes_problem(list((nodes or {}).items()), backbones, option="nodes")
    if problem is not None:
        raise ValueError(problem)
    cuts = _cuts((nodes or {}).items(), GOAL_RESOLUTION)
    rows = []
    for backbone in backbones:
        models = {}
        for h in selected:
            try:
                models[h.name] = _build_to_count(
                    h, backbone, num_classes=num_classes, se_reduction=se_reduction, **cuts.get(backbone, {})
                )
            except (ValueError, TypeError) as err:  # the builders' refusal, named by the pair
                kind = TypeError if isinstance(err, TypeError) else ValueError
                raise kind(_build_problem(h, backbone, err)) from err
        rows += list(
            _parameter_rows(
                backbone, models, selected, num_classes=num_classes, se_reduction=se_reduction
            ).values()
        )
        del models
    return rows


def _build_to_count(head: bench.ModelHead, backbone: str, **build: Any) -> nn.Module:
    """``head.build(backbone, **build)`` for counting parameters: on the meta device (shapes
    only: no memory for weights, so a huge ``num_classes`` counts too, and no time to
    initialise them), else, where a part cannot be built there, as usual. A ValueError or
    TypeError is the builders' refusal, the same on either device: raised as it is."""
    try:
        with torch.device("meta"):
            return head.build(backbone, **build)
    except (ValueError, TypeError):
        raise
    except Exception:  # e.g. a module of one's own that reads a value at build time
        return head.build(backbone, **build)


def _select_heads(names: Sequence[str]) -> list[bench.ModelHead]:
    unknown = [n for n in names if n not in bench.MODEL_HEADS]
    if unknown:
        raise ValueError(
            f"unknown {plural(len(unknown), 'head')} {unknown}; known: {list(bench.MODEL_HEADS)}"
        )
    ordered = ["plain"] + [n for n in dict.fromkeys(names) if n != "plain"]  # plain is the baseline
    return [bench.MODEL_HEADS[n] for n in ordered]


def _build_problem(head: bench.ModelHead, backbone: str, err: Exception) -> str:
    """The note of a (backbone, head) pair that cannot be built."""
    if isinstance(err, (ValueError, TypeError)):  # how the builders refuse a combination
        return f"{head.name}: not applicable to {backbone}: {_error_text(err)}"
    return f"{head.name}: could not be built on {backbone}: {_error_text(err)}"


def _node_hint(backbone: str, err: Exception, cut: Mapping[str, Any]) -> str:
    """What the command line gives for the builders' ``node=`` / ``sample_shape=`` advice
    (they name the Python arguments), or ``""``.

    Examples:
        >>> _node_hint("vit_b_16", ValueError("... pass node= naming ..."), {})
        ' (on this command line: --node vit_b_16=NODE; the run passes sample_shape itself)'
        >>> print(_node_hint("vit_b_16", ValueError("... pass sample_shape=(3, 224, 224)"),
        ...                  {"node": "encoder", "sample_shape": (3, 197, 197)}))  # doctest: +NORMALIZE_WHITESPACE
         (on this command line the channels are read from a zero image of 197px: the run's
         224px, else its first resolution)
    """
    text = str(err)
    if not cut:
        if "pass node=" not in text:
            return ""
        return f" (on this command line: --node {backbone}=NODE; the run passes sample_shape itself)"
    if "sample_shape" in text:
        size = cut["sample_shape"][-1]
        return (f" (on this command line the channels are read from a zero image of {size}px: the run's "
                "224px, else its first resolution)")
    if "node=" in text:
        return f" (on this command line: --node {backbone}=NODE names the node)"
    return ""


def _precheck_builds(
    backbones: Sequence[str],
    heads: Sequence[bench.ModelHead],
    *,
    num_classes: int,
    se_reduction: int,
    cuts: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[tuple[str, str], str]:
    """(backbone, head) pairs that cannot be built, found before anything is measured.

    Only heads that depend on the backbone's blocks (SE) are tried, on the meta device (no
    memory, no weights: a fraction of a second each). A ValueError or TypeError is the
    builders' refusal; any other error is left for the real build to report.
    """
    problems = {}
    for backbone in backbones:
        for head in heads:
            if not head.se:
                continue
            try:
                with torch.device("meta"):
                    head.build(
                        backbone,
                        num_classes=num_classes,
                        se_reduction=se_reduction,
                        **(cuts or {}).get(backbone, {}),
                    )
            except (ValueError, TypeError) as err:
                hint = _node_hint(backbone, err, (cuts or {}).get(backbone, {}))
                problems[backbone, head.name] = _build_problem(head, backbone, err) + hint
            except Exception:
                pass
    return problems


def run_models(
    args: argparse.Namespace, *, command: str, checkpoint: Checkpoint | None = None
) -> BenchResult:
    """Parameters and throughput of backbone x head x resolution (see ``models --help``).

    A (backbone, head) pair that cannot be built (SE blocks in a backbone without ResNet or
    Inception blocks) gets a row with the reason in ``note`` and is left out; a step that
    raises at one resolution (out of memory, an input too small for the backbone, a batch
    of 1 through BatchNorm) is noted in its row and the others go on. ``checkpoint``, when
    given, receives the result so far after every backbone and resolution, and once more,
    marked incomplete, when the run stops with an exception. The rows are computed from the
    raw records (:func:`_model_rows`), as ``report`` computes them again.
    """
    s = _settings(args, "models")
    env = bench.environment(s.device)
    backbones = list(dict.fromkeys(args.backbones or PAPER_BACKBONES))
    heads = _select_heads(args.heads or list(PAPER_HEADS))
    resolutions = list(dict.fromkeys(_model_resolutions(args)))
    timed = not args.params_only
    se_reduction = PAPER_SE_REDUCTION if args.se_reduction is None else args.se_reduction
    build = {"num_classes": args.num_classes, "se_reduction": se_reduction}
    cuts = _cuts(args.nodes, _cut_resolution(resolutions if timed else [GOAL_RESOLUTION]))
    problems = _precheck_builds(backbones, heads, **build, cuts=cuts)
    for problem in problems.values():
        print(f"bilinearpool-bench: skipping {problem}", file=sys.stderr)
    per_group = len(heads) * (s.warmup + s.repeats) * (1 if args.no_train else 2)
    total = len(backbones) * (len(heads) + (len(resolutions) * per_group if timed else 0))
    bar = _progress(total, "models", s.progress)
    gen = torch.Generator().manual_seed(s.seed)
    raw: list[dict[str, Any]] = []
    settings = {
        **s.describe(),
        "num_classes": args.num_classes,
        "se_reduction": se_reduction,
        **({"nodes": dict(args.nodes)} if args.nodes else {}),
        "weights": "random (no download)",
        "training_step": ("not timed (--no-train)" if args.no_train else
                          "SGD lr=0 (full update arithmetic, weights unchanged), cross-entropy"),
    }
    if not timed:  # --params-only: nothing is timed, so no timing settings either
        settings = {k: settings[k] for k in ("device", "num_classes", "se_reduction", "nodes") if k in settings}
        settings["weights"] = "none: built on the meta device (shapes only)"
    plan = {
        "backbones": backbones,
        "heads": [h.name for h in heads],
        "resolutions": resolutions,
        "timed": timed,
    }
    described = {h.name: h.description for h in heads}
    in_process = _in_process_note("model head", list(described), getattr(args, "imports", None))

    def result(note: str | None = None) -> BenchResult:
        env_now = {**env, "load_average_at_end": _load_average()}
        notes = ([note] if note else []) + in_process
        return _models_result(raw, described, settings, env_now, command, plan, notes)

    groups, done = len(backbones) * (len(resolutions) if timed else 1), 0
    where = "the start"
    counted = 0  # calls the bar has counted up to the end of the last backbone
    try:
        for backbone in backbones:
            counted += total // len(backbones)  # this backbone's calls, when it is done
            models: dict[str, nn.Module] = {}
            skipped: dict[str, str] = {}
            for head in heads:
                where = f"{backbone} {head.name}: build"
                bar.set_postfix_str(where, refresh=False)
                problem = problems.get((backbone, head.name))
                if problem is None and "plain" in skipped:
                    problem = f"{head.name}: not measured on {backbone}: the baseline `plain` could not be built"
                if problem is None:
                    cut = cuts.get(backbone, {})
                    try:
                        if timed:
                            models[head.name] = head.build(backbone, **build, **cut)
                        else:
                            models[head.name] = _build_to_count(head, backbone, **build, **cut)
                    except Exception as err:
                        problem = _build_problem(head, backbone, err) + _node_hint(backbone, err, cut)
                        print(f"bilinearpool-bench: skipping {problem}", file=sys.stderr)
                if problem is not None:
                    skipped[head.name] = problem
                bar.update(1)
            built = [h for h in heads if h.name in models]
            params = {
                name: {k: p[k] for k in _PARAMS_RECORDED if k in p}
                for name, p in (
                    _parameter_rows(backbone, models, built, **build) if "plain" in models else {}
                ).items()
            }
            skip_records = [
                {"backbone": backbone, "head": n, "resolution": None, "note": note}
                for n, note in skipped.items()
            ]
            if not timed or not params:
                raw += [
                    {"backbone": backbone, "head": n, "resolution": None, **p}
                    for n, p in params.items()
                ]
                raw += skip_records
                done += len(resolutions) if timed else 1
                counted = _reach(bar, counted)
                del models
                where = f"{backbone}: writing the results so far"
                _write_partial(checkpoint, result, done, groups, "groups")
                continue
            where = f"{backbone}: moving the models to {s.device}"
            for model in models.values():
                model.to(s.device)
                if s.channels_last:
                    model.to(memory_format=torch.channels_last)
            for res in resolutions:
                where = f"{backbone} {res}px"
                raw += _time_models(models, built, params, backbone, res, args, s, gen, bar)
                done += 1
                if res == resolutions[-1]:
                    raw += skip_records
                where = f"{backbone} {res}px: writing the results so far"
                _write_partial(checkpoint, result, done, groups, "groups")
            counted = _reach(bar, counted)
            del models
            gc.collect()
    except BaseException as err:
        _write_stopped(checkpoint, result, err, where, len(raw), "models")
        raise
    finally:
        bar.close()
    return result()


def _model_resolutions(args: argparse.Namespace) -> Sequence[int]:
    """The resolutions a models run measures: ``--resolutions``, else 224 for ``--quick``,
    else the paper's three."""
    return args.resolutions or ([GOAL_RESOLUTION] if args.quick else PAPER_RESOLUTIONS)


def _time_models(
    models: dict[str, nn.Module],
    heads: Sequence[bench.ModelHead],
    params: dict[str, dict[str, Any]],
    backbone: str,
    res: int,
    args: argparse.Namespace,
    s: _Settings,
    gen: torch.Generator,
    bar: Any,
) -> list[dict[str, Any]]:
    """Inference and training-step timings of ``models`` at one resolution: their raw records."""
    batch = _batch_size(args, s.device, res)
    notes: dict[str, list[str]] = {n: [] for n in models}
    try:
        images = torch.randn(batch, 3, res, res, generator=gen).to(s.device)
        if s.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, args.num_classes, (batch,), generator=gen).to(s.device)
    except Exception as err:  # e.g. out of memory for the batch: a note, and the run goes on
        _free_memory()
        bar.update(len(models) * (s.warmup + s.repeats) * (1 if args.no_train else 2))
        text = f"inputs failed: {_error_text(err)}"
        return [
            {"backbone": backbone, "head": head.name, "resolution": res, "batch": batch,
             **params[head.name], "inference_s": [], "training_step_s": [],
             "peak_train_bytes": None, "note": text}
            for head in heads
        ]
    bar.set_postfix_str(f"{backbone} {res}px: inference", refresh=False)
    for model in models.values():
        model.eval()
    infer_steps = {
        n: bench.make_inference_step(m, images, amp_dtype=s.amp_dtype) for n, m in models.items()
    }
    infer_steps = _drop_failing(infer_steps, notes, "inference")
    infer = _round_robin_robust(infer_steps, notes, "inference", s, lambda _: bar.update(1))
    train: dict[str, list[float]] = {}
    peaks: dict[str, int | None] = {n: None for n in models}
    if not args.no_train:
        bar.set_postfix_str(f"{backbone} {res}px: training step", refresh=False)
        for m in models.values():
            m.train()
        steps = {
            n: bench.make_training_step(m, images, labels, amp_dtype=s.amp_dtype)
            for n, m in models.items()
        }
        steps = _drop_failing(steps, notes, "training step")
        peaks.update(
            {n: _peak_bytes(step, s.device, models[n].parameters()) for n, step in steps.items()}
        )
        train = _round_robin_robust(steps, notes, "training step", s, lambda _: bar.update(1))
        for m in models.values():
            m.zero_grad(set_to_none=True)
        del steps
    return [
        {
            "backbone": backbone,
            "head": head.name,
            "resolution": res,
            "batch": batch,
            **params[head.name],
            "inference_s": infer.get(head.name, []),
            "training_step_s": train.get(head.name, []),
            "peak_train_bytes": peaks[head.name],
            "note": "; ".join(notes[head.name]) or None,
        }
        for head in heads
    ]


def _model_rows(raw: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows, computed from the raw records: images/s, ratios to ``plain``, checks.

    A record without ``params`` is a pair that was not built (its row has the reason only);
    one without a resolution holds parameter counts only.
    """
    plain_params: dict[str, int] = {}
    for rec in raw:
        if rec["head"] == "plain" and rec.get("params") is not None:
            plain_params.setdefault(rec["backbone"], rec["params"])
    by_key = {(r["backbone"], r["head"], r.get("resolution")): r for r in raw}

    def speed(times: Sequence[float], batch: int) -> float | None:
        return bench.images_per_second(batch, bench.median(times)) if times else None

    rows = []
    for rec in raw:
        backbone, head, res = rec["backbone"], rec["head"], rec.get("resolution")
        if rec.get("params") is None:
            rows.append(
                {"backbone": backbone, "head": head, "resolution": res, "note": rec.get("note")}
            )
            continue
        row: dict[str, Any] = {
            "backbone": backbone,
            "head": head,
            "channels": rec.get("channels"),
            "params": rec["params"],
            "params_analytic": rec.get("params_analytic"),
            "params_ok": (PARAMS_UNCHECKED if rec.get("params_unchecked")
                          else rec["params"] == rec.get("params_analytic")),  # fmt: skip
            "params_vs_plain": _ratio(rec["params"], plain_params.get(backbone)),
            "resolution": res,
        }
        if res is not None:
            plain = by_key.get((backbone, "plain", res), {})
            batch = rec["batch"]
            infer = list(rec.get("inference_s") or [])
            train = list(rec.get("training_step_s") or [])
            p_infer = list(plain.get("inference_s") or [])
            p_train = list(plain.get("training_step_s") or [])
            infer_ips, train_ips = speed(infer, batch), speed(train, batch)
            row.update(
                batch=batch,
                infer_img_s=infer_ips,
                infer_vs_plain=_ratio(infer_ips, speed(p_infer, plain.get("batch", batch))),
                infer_range=_ratio_range(_rates(infer), _rates(p_infer)),
                train_img_s=train_ips,
                train_vs_plain=_ratio(train_ips, speed(p_train, plain.get("batch", batch))),
                train_range=_ratio_range(_rates(train), _rates(p_train)),
                peak_train_MiB=_mib(rec.get("peak_train_bytes")),
                note=rec.get("note"),
            )
        rows.append(row)
    return rows


def _models_result(
    raw: list[dict[str, Any]],
    heads: dict[str, str],
    settings: dict[str, Any],
    env: dict[str, Any],
    command: str,
    plan: dict[str, Any],
    notes_first: Sequence[str] = (),
) -> BenchResult:
    """The model table, goals and notes, all computed from the raw records.

    Args:
        raw: one record per row: counts, and timings at a resolution.
        heads: name -> description of the heads compared.
        settings: the run's settings as saved in the JSON.
        env: the environment record.
        command: the command line of the run.
        plan: ``backbones``, ``heads``, ``resolutions`` asked for and whether ``timed``.
        notes_first: notes put before the others (an INCOMPLETE mark, an IN-PROCESS note).
    """
    rows = _model_rows(raw)
    if plan["timed"]:
        columns = ["backbone", "head", "resolution", "batch", "params", "params_ok", "params_vs_plain",
                   "infer_img_s", "infer_vs_plain", "infer_range", "train_img_s", "train_vs_plain",
                   "train_range"]  # fmt: skip
        if torch.device(settings.get("device", "cpu")).type == "cuda":
            columns.append("peak_train_MiB")
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
    if any(r.get("note") for r in rows):
        columns.append("note")
    meta = {
        "format": RESULT_FORMAT,
        "command": command,
        "environment": env,
        "settings": settings,
        "heads": heads,
        "plan": plan,
        "goals": _model_goal_summary(rows, raw, plan)
        + _failure_lines(rows, ("backbone", "head", "resolution"), "note"),
        "notes": [
            *notes_first,
            *_amp_notes(settings, "models"),
            (
                "*_vs_plain: the row's value / the plain backbone's (global average pooling) at the same "
                "backbone and resolution, measured interleaved in this run: what the head costs. "
                "*_range: the smallest and largest ratio of single interleaved rounds. The throughput "
                "verdict goes by the median ratio and says 'within noise' when single rounds fall on "
                "both sides of the goal."
                if plan["timed"]
                else "params_vs_plain: the row's parameters / the plain backbone's (global average "
                "pooling + linear) on the same backbone: what the head adds."
            ),
            (
                "params: exact count (model.parameters()); params_ok: it equals the closed-form count "
                "(backbone + SE blocks + classifier; two backbones for BCNN)."
            ),
            *(
                [
                    f"params_ok {PARAMS_UNCHECKED}: the head has options whose parameters the closed "
                    "form does not give (a pooling module of its own, a second backbone, a cut at "
                    "another node), so its exact count is not checked."
                ]
                if any(r.get("params_ok") == PARAMS_UNCHECKED for r in rows)
                else []
            ),
            "Heads: " + "; ".join(f"`{n}`: {d}" for n, d in heads.items()) + ".",
        ],
    }
    return BenchResult("models", "Models: parameters and throughput", columns, rows, meta, raw)


def _model_goal_summary(
    rows: Sequence[dict[str, Any]], raw: Sequence[dict[str, Any]], plan: dict[str, Any]
) -> list[str]:
    """Parameter check, and throughput at :data:`GOAL_RESOLUTION` of every backbone planned."""
    lines = []
    param_rows = {(r["backbone"], r["head"]): r for r in rows if r.get("params") is not None}
    unchecked = {k: r for k, r in param_rows.items() if r["params_ok"] == PARAMS_UNCHECKED}
    checked = {k: r for k, r in param_rows.items() if k not in unchecked}
    bad = [
        f"{b}/{h}: {r['params']:,} vs {r['params_analytic']:,}"
        for (b, h), r in checked.items()
        if not r["params_ok"]
    ]
    # heads whose options have no closed form: counted apart, with the options
    options = {
        (rec["backbone"], rec["head"]): ", ".join(rec["params_unchecked"])
        for rec in raw
        if rec.get("params_unchecked")
    }
    apart = (
        f"not checkable for {len(unchecked)} (options without a closed form: "
        + "; ".join(f"{b}/{h}: {options[b, h]}" for b, h in unchecked)
        + ")"
    )
    if bad:
        line = "Parameter counts equal the analytic counts: NOT met for " + "; ".join(bad)
        lines.append(line + (f"; {apart}" if unchecked else ""))
    elif not param_rows:
        lines.append("Parameter counts equal the analytic counts: not measured (no model was built)")
    elif not checked:
        lines.append(f"Parameter counts equal the analytic counts: {apart}")
    elif unchecked:
        lines.append(
            f"Parameter counts equal the analytic counts: met for all {len(checked)} models with a "
            f"closed form; {apart}"
        )
    else:
        lines.append(
            f"Parameter counts equal the analytic counts: met for all {len(param_rows)} models"
        )
    if not plan["timed"]:
        return lines
    if GOAL_RESOLUTION not in plan["resolutions"]:
        lines.append(
            f"Throughput goals are stated at {GOAL_RESOLUTION}px, which was not measured in this run"
        )
        return lines
    by_key = {(r["backbone"], r["head"], r.get("resolution")): r for r in rows}
    times = {(r["backbone"], r["head"], r.get("resolution")): r.get("inference_s") for r in raw}
    goals = (("fast-bcnn", f"goal >= {THROUGHPUT_GOAL}x"), ("bcnn", "expected near 0.5x"))
    for head, text in goals:
        if head not in plan["heads"]:
            continue
        parts, missing = [], []
        for b in plan["backbones"]:
            r = by_key.get((b, head, GOAL_RESOLUTION))
            if r is None or r.get("infer_vs_plain") is None:
                missing.append(f"{b} ({_why_no_throughput(by_key, b, head)})")
                continue
            v = r["infer_vs_plain"]
            if head == "fast-bcnn":
                rounds = _round_ratios(
                    _rates(times.get((b, head, GOAL_RESOLUTION))),
                    _rates(times.get((b, "plain", GOAL_RESOLUTION))),
                )
                noise = _noise(rounds, lambda x: x >= THROUGHPUT_GOAL)
                verdict = "met" if v >= THROUGHPUT_GOAL else "NOT met"
                verdict += f"; {noise}" if noise else ""
            else:
                verdict = "measured"
            parts.append(f"{b} {v:.3f}x ({verdict})")
        name = "Fast BCNN" if head == "fast-bcnn" else "Two-stream BCNN"
        line = f"{name} inference throughput / plain at {GOAL_RESOLUTION}px, {text}: "
        line += ", ".join(parts)
        if missing:
            line += ("; " if parts else "") + "not measured on " + ", ".join(missing)
        lines.append(line)
    return lines


def _why_no_throughput(
    by_key: dict[tuple[Any, ...], dict[str, Any]], backbone: str, head: str
) -> str:
    """Why a planned (backbone, head) has no throughput ratio at :data:`GOAL_RESOLUTION`."""
    for name in (head, "plain"):
        for res in (GOAL_RESOLUTION, None):
            row = by_key.get((backbone, name, res))
            if row is not None and row.get("note"):
                return row["note"] if name == head else f"the baseline plain: {row['note']}"
    if by_key.get((backbone, head, GOAL_RESOLUTION)) is None:
        return "the run stopped before it"
    return "see the table"


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _report_problem(folder: Path) -> str:
    """Why ``report FOLDER`` has nothing to read: no such folder, results one level down
    (the committed results/gpu-* folders hold one subfolder per run kind), or none."""
    if not folder.exists():
        return f"expected a folder of layers.json / models.json, but {folder} does not exist"
    if not folder.is_dir():
        return f"expected a folder of layers.json / models.json, but {folder} is a file"
    below = sorted(
        sub.name for sub in folder.iterdir()
        if sub.is_dir() and any((sub / f"{n}.json").is_file() for n in ("layers", "models"))
    )
    if below:
        return (
            f"expected layers.json or models.json in {folder}, but found none; its subfolders "
            f"{', '.join(below)} hold results: report one of them, e.g. "
            f"`bilinearpool-bench report {folder / below[0]}`"
        )
    return (
        f"expected layers.json or models.json in {folder}, but found none; "
        f"run `bilinearpool-bench layers --out {folder}` first"
    )


class ResultMismatchError(ValueError):
    """A results file whose stored rows disagree with what its raw measurements give, or
    that cannot be read or rebuilt at all (damaged, not JSON, edited by hand)."""


def _bytes(mib: float | None) -> int | None:
    return None if mib is None else round(mib * MIB)


def _version1_layer_raw(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Raw records of a version 1 layers file: its timings, and the counts from its rows."""
    times = {(r["shape"], r["case"]): r.get("times_s") or [] for r in data.get("raw", [])}
    return [
        {
            "shape": row["shape"],
            "case": row["case"],
            "times_s": times.get((row["shape"], row["case"]), []),
            "saved_bytes": _bytes(row.get("saved_MiB")),
            "input_bytes": _bytes(row.get("input_MiB")),
            "saved_with_linear_bytes": _bytes(row.get("saved_with_linear_MiB")),
            "peak_bytes": _bytes(row.get("peak_MiB")),
            "D": row.get("D"),
            "layer_params": row.get("layer_params"),
            "error": row.get("error"),
        }
        for row in data["rows"]
    ]


def _version1_model_raw(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Raw records of a version 1 models file: its timings, and the counts from its rows."""
    times = {(r["backbone"], r["head"], r.get("resolution")): r for r in data.get("raw", [])}
    out = []
    for row in data["rows"]:
        rec: dict[str, Any] = {
            "backbone": row["backbone"],
            "head": row["head"],
            "resolution": row.get("resolution"),
        }
        if row.get("params") is not None:
            rec.update({k: row.get(k) for k in ("channels", "params", "params_analytic")})
        if rec["resolution"] is not None and row.get("params") is not None:
            timing = times.get((row["backbone"], row["head"], row["resolution"]), {})
            rec.update(
                batch=row.get("batch"),
                inference_s=timing.get("inference_s") or [],
                training_step_s=timing.get("training_step_s") or [],
                peak_train_bytes=_bytes(row.get("peak_train_MiB")),
            )
        if "note" in row:
            rec["note"] = row["note"]
        out.append(rec)
    return out


def _stored_cases(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Case name -> description, role, goal, streams; version 1 files stored descriptions only."""
    cases: dict[str, dict[str, Any]] = {}
    for name, value in data.get("cases", {}).items():
        known = bench.LAYER_CASES.get(name)
        if isinstance(value, dict):
            cases[name] = dict(value)
            if known is not None:  # the registry, not the file, says what a known case is
                cases[name].update(
                    role=known.role,
                    goal=known.goal,
                    streams=known.streams,
                    variant_of=known.variant_of,
                )
            continue
        role = {"naive": "baseline", "matmul-floor": "floor"}.get(name, "ours")
        with_goal = any(r.get("goals") for r in data["rows"] if r["case"] == name)
        cases[name] = {
            "description": value,
            "role": known.role if known else role,
            "goal": with_goal or bool(known and known.goal),
            "streams": known.streams if known else 1,
            "variant_of": known.variant_of if known else None,
        }
    return cases


def _check_raw_timings(settings: dict[str, Any], raw: Sequence[Any], source: str) -> None:
    """Refuse raw timings that are not times (a NaN, a string: every ratio built on them
    would disagree with its stored row, and the report named that row instead), and
    ``settings.timed_rounds`` other than the count of timings in the raw records (the
    longest: a case that failed may have fewer; a run in which every case failed has none
    to count), which the report's caveat on few rounds reads."""
    for r in raw:
        for k in ("times_s", "inference_s", "training_step_s"):
            times = r.get(k) if isinstance(r, dict) else None
            bad = [t for t in times if not _is_time(t)] if isinstance(times, list) else []
            if bad:
                names = ("shape", "case", "backbone", "head", "resolution")
                where = " ".join(str(r[n]) for n in names if n in r)
                raise ResultMismatchError(
                    f"{source}: the raw record of {where} holds {bad[0]!r} among its {k}, where "
                    "a time in seconds belongs; the file was edited or damaged: rerun the benchmark"
                )
    rounds = settings.get("timed_rounds")
    counts = [len(r[k]) for r in raw if isinstance(r, dict)
              for k in ("times_s", "inference_s", "training_step_s") if isinstance(r.get(k), list) and r[k]]
    if isinstance(rounds, int) and counts and max(counts) != rounds:
        raise ResultMismatchError(
            f"{source}: its settings say {rounds} timed rounds, but its raw records hold up to "
            f"{max(counts)} timings each; the file was edited or written by other code: rerun the "
            "benchmark"
        )


def _is_time(value: Any) -> bool:
    """A finite number >= 0 (not a bool)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value >= 0


def _format_problem(version: Any) -> str | None:
    """Why a results file of format ``version`` cannot be rebuilt by this code, or None.

    A file of a newer format was read as this code's own, without a word (helper-143).

    Examples:
        >>> _format_problem(2) is None, _format_problem(1) is None
        (True, True)
        >>> _format_problem(3)
        'expected a results file of format 1 to 2 (what this bilinearpool-bench reads), but its format is 3: it was written by a newer bilinearpool-bench, which can rebuild it'
    """
    if isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= RESULT_FORMAT:
        return None
    newer = isinstance(version, int) and not isinstance(version, bool) and version > RESULT_FORMAT
    return (f"expected a results file of format 1 to {RESULT_FORMAT} (what this bilinearpool-bench "
            f"reads), but its format is {version!r}"
            + (": it was written by a newer bilinearpool-bench, which can rebuild it" if newer else
               "; the file is damaged or was edited by hand: rerun the benchmark"))


def rebuild_result(data: dict[str, Any], *, source: str = "results") -> BenchResult:
    """The result stored in a ``layers.json`` / ``models.json``, rebuilt from its raw measurements.

    Rows, ratios, the summary and the goal lines are computed again by this code from the
    raw records and the settings; the stored rows must agree with them, value by value
    (numbers exactly up to float rounding, ``*_range`` up to its 2 printed decimals, goal
    verdicts by their met / NOT met words, since older files printed fewer decimals).
    Version 1 files keep only the timings as raw data: their exact counts (saved bytes,
    parameters, D) come from their rows. Of the stored notes, only the INCOMPLETE mark and
    the IN-PROCESS note (cases or heads the recorded command does not know) are kept; the
    others are written again.

    Raises:
        ResultMismatchError: a stored row disagrees with the raw data (names the row, the
            column and both values).
        ValueError: not a file of ``layers`` or ``models``.
    """
    name = data.get("benchmark")
    version = data.get("format", 1)
    problem = _format_problem(version)
    if problem:
        raise ValueError(problem)
    raw_records = data.get("raw") if isinstance(data.get("raw"), list) else []
    if version < 2 and any(isinstance(r, dict) and "saved_bytes" in r for r in raw_records):
        version = 2  # exact counts in its raw part: a version 2 file whose format field went missing
    settings, env = data["settings"], data["environment"]
    _check_raw_timings(settings, raw_records, source)
    carried = [n for n in data.get("notes", []) if str(n).startswith(("INCOMPLETE", _IN_PROCESS))]
    if version < 2:
        carried.append(
            "Rebuilt by `bilinearpool-bench report` from a version 1 results file: its raw part "
            "holds the timings only, so the exact counts come from its rows; medians, ratios and "
            "goal verdicts were recomputed from the timings and agree with its rows."
        )
    if name == "layers":
        raw = data["raw"] if version >= 2 else _version1_layer_raw(data)
        plan = data.get("plan") or [
            [shape, [r["case"] for r in raw if r["shape"] == shape]]
            for shape in dict.fromkeys(r["shape"] for r in raw)
        ]
        planned = {(shape, case) for shape, names in plan for case in names}
        unplanned = sorted({(r["shape"], r["case"]) for r in raw} - planned)
        if unplanned:  # goal lines count planned shapes: a plan must cover what was measured
            raise ResultMismatchError(
                f"{source}: measured but not in the file's plan: "
                + ", ".join(f"{shape} {case}" for shape, case in unplanned)
            )
        cases = _stored_cases(data)
        result = _layers_result(raw, cases, settings, env, data["command"], plan, carried)
        keys: tuple[str, ...] = ("shape", "case")
    elif name == "models":
        raw = data["raw"] if version >= 2 else _version1_model_raw(data)
        rows = data["rows"]
        plan = data.get("plan") or {
            "backbones": list(dict.fromkeys(r["backbone"] for r in rows)),
            "heads": list(dict.fromkeys(r["head"] for r in rows)),
            "resolutions": list(
                dict.fromkeys(r["resolution"] for r in rows if r.get("resolution") is not None)
            ),
            "timed": "infer_img_s" in data.get("columns", []),
        }
        heads = dict(data.get("heads", {}))
        result = _models_result(raw, heads, settings, env, data["command"], plan, carried)
        keys = ("backbone", "head", "resolution")
    else:
        raise ValueError(
            f"{source}: expected a results file of 'layers' or 'models', but got {name!r}"
        )
    _check_rows(data["rows"], result.rows, keys, source)
    return result


def _verdicts(text: Any) -> list[tuple[str, str]]:
    return re.findall(r"(time|memory) (met|NOT met)", str(text or ""))


def _same_value(key: str, stored: Any, rebuilt: Any) -> bool:
    """Whether a stored cell agrees with the rebuilt one (see :func:`rebuild_result`)."""
    if stored is None or rebuilt is None:
        return stored is rebuilt
    if key == "goals":
        return _verdicts(stored) == _verdicts(rebuilt)
    if key.endswith("_range"):
        # the two ends split at a "-" that is no exponent's sign (4.09e-05 in older files)
        a, b = (re.split(r"(?<![eE])-", str(v)) for v in (stored, rebuilt))
        close = all(abs(float(x) - float(y)) <= 0.0051 for x, y in zip(a, b))
        return len(a) == len(b) == 2 and close
    numbers = (int, float)
    both = isinstance(stored, numbers) and isinstance(rebuilt, numbers)
    if both and not isinstance(stored, bool):
        return math.isclose(stored, rebuilt, rel_tol=1e-9, abs_tol=1e-12)
    return stored == rebuilt


def _check_rows(
    stored: Sequence[dict[str, Any]],
    rebuilt: Sequence[dict[str, Any]],
    keys: Sequence[str],
    source: str,
) -> None:
    """Raise :class:`ResultMismatchError` at the first stored cell the raw data do not give."""
    if len(stored) != len(rebuilt):
        raise ResultMismatchError(
            f"{source}: {len(stored)} rows are stored, but the raw data give {len(rebuilt)}"
        )
    # Cells the file's code wrote (a file written before a column existed lacks it in
    # every row) and cells the current code knows (in any row).
    written = {key for row in stored for key in row}
    known = {key for row in rebuilt for key in row}
    for old, new in zip(stored, rebuilt):
        label = " ".join(str(old.get(k)) for k in keys)
        if [old.get(k) for k in keys] != [new.get(k) for k in keys]:
            # (as values: a resolution stored as "64" prints as the 64 it stands for)
            raise ResultMismatchError(
                f"{source}: stored row {' '.join(repr(old.get(k)) for k in keys)} stands where the "
                f"raw data give row {' '.join(repr(new.get(k)) for k in keys)}"
            )
        missing = sorted((set(new) & written) - set(old))
        extra = sorted(set(old) - known)
        if missing or extra:  # a cell deleted, or one added, by hand
            said = [f"lacks {missing}, which the raw data give"] if missing else []
            said += [f"has {extra}, which no benchmark writes"] if extra else []
            raise ResultMismatchError(
                f"{source}: row {label} {' and '.join(said)}; the file was edited or written by "
                "other code: rerun the benchmark"
            )
        for key, value in old.items():
            if key in new and not _same_value(key, value, new[key]):
                raise ResultMismatchError(
                    f"{source}: row {label}: {key} is stored as {value!r}, but the raw data give "
                    f"{new[key]!r}; the file was edited or written by other code: rerun the "
                    "benchmark"
                )


#: Environment entries that must agree for two parts of one report to be compared.
_SAME_RUN_KEYS = ("git_commit", "git_dirty", "bilinearpool", "torch", "torchvision", "timm",
                  "numpy", "python", "platform", "device", "cpu_count", "threads", "cuda", "cudnn",
                  *bench.SWITCHES, "runtime_env", "transparent_hugepages", "float32_matmul_precision",
                  "cuda_matmul_allow_tf32", "cudnn_allow_tf32")  # fmt: skip
_SAME_RUN_SETTINGS = ("device", "amp", "channels_last")
#: Of those, the entries that change only what is timed, and the device (a ``models
#: --params-only`` run counts on the CPU whatever its parts beside it ran on): not compared
#: with a part that times nothing, which does not record the timing settings either.
_TIMING_ONLY_KEYS = ("device", "threads", "cpu_count", "cuda", "cudnn", *bench.SWITCHES, "runtime_env",
                     "transparent_hugepages", "float32_matmul_precision", "cuda_matmul_allow_tf32",
                     "cudnn_allow_tf32", "amp", "channels_last")  # fmt: skip


def _times_nothing(part: dict[str, Any]) -> bool:
    """Whether a results file holds no timings: a ``models --params-only`` run."""
    if part.get("benchmark") != "models":
        return False
    plan = part.get("plan")
    if isinstance(plan, dict) and "timed" in plan:
        return not plan["timed"]
    return "infer_img_s" not in part.get("columns", [])  # older files: no plan


def _incomplete_head(note: str) -> str:
    """An INCOMPLETE note without its count of rows: where and why the run stopped, or
    that it was written part-way (by a run that may still be going, or was killed)."""
    return str(note).rsplit("; the ", 1)[0]


def _part_differences(parts: Sequence[dict[str, Any]]) -> list[str]:
    """Warnings when the parts of a report (layers, models) ran on other code or settings.

    Beside a part that times nothing (``models --params-only``), only what changes the
    code is compared (commit, versions, platform), not the timing settings it does not
    record nor the threads and device it did not time on (:data:`_TIMING_ONLY_KEYS`).
    """
    if len(parts) < 2:
        return []
    first, *others = parts
    warnings = []
    for other in others:
        names = f"{first['benchmark']}.json and {other['benchmark']}.json"
        untimed = _times_nothing(first) or _times_nothing(other)
        diffs = []
        for where, keys in (("environment", _SAME_RUN_KEYS), ("settings", _SAME_RUN_SETTINGS)):
            a, b = first.get(where, {}), other.get(where, {})
            for key in keys:
                if untimed and key in _TIMING_ONLY_KEYS:
                    continue
                if a.get(key) != b.get(key):
                    shown = ["not recorded" if key not in d else d[key] for d in (a, b)]
                    diffs.append(f"{key} {shown[0]} vs {shown[1]}")
        if diffs:
            warnings.append(
                f"{names} come from different commits or environments: " + "; ".join(diffs)
            )
        commits = [p.get("environment", {}).get("git_commit") for p in (first, other)]
        if not any(commits):
            warnings.append(
                f"{names} do not record the git commit of the code (older files, not run from a "
                "checkout, or one git would not read): whether they ran the same code cannot be checked"
            )
    return warnings


def _held_benchmark(kind: Any) -> str:
    """What a results file's ``benchmark`` field says it holds, in words."""
    if kind in ("layers", "models"):
        return f"those of `bilinearpool-bench {kind}`"
    return f"benchmark {kind!r}" if kind is not None else "no benchmark field"


def _report(args: argparse.Namespace, *, command: str) -> int:
    folder = Path(args.folder)
    parts, tables = [], []
    for name in ("layers", "models"):
        path = folder / f"{name}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
                raise ResultMismatchError(
                    f"{path}: expected the JSON that `bilinearpool-bench {name} --out` writes, but "
                    f"it cannot be read as JSON ({_error_text(err)}); the file is damaged or was "
                    "edited by hand: rerun the benchmark"
                ) from err
            if not isinstance(data, dict):
                raise ResultMismatchError(
                    f"{path}: expected the JSON object that `bilinearpool-bench {name} --out` "
                    f"writes, but it holds a JSON {type(data).__name__}; the file is damaged or "
                    "was edited by hand: rerun the benchmark"
                )
            if data.get("benchmark") != name:  # the rows would be read as the other kind's
                raise ResultMismatchError(
                    f"{path}: expected the results of `bilinearpool-bench {name}`, but it holds "
                    f"{_held_benchmark(data.get('benchmark'))}; was it renamed or swapped with "
                    "another file? Give each file its own name (layers.json, models.json)"
                )
            problem = _format_problem(data.get("format", 1))
            if problem:
                raise ResultMismatchError(f"{path}: {problem}")
            parts.append(data)
            try:
                if not isinstance(data.get("command"), str):
                    raise TypeError(f"its command is {type(data.get('command')).__name__}, not a str")
                tables.append(rebuild_result(data, source=str(path)).markdown())  # (reads its environment)
            except ResultMismatchError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as err:
                raise ResultMismatchError(
                    f"{path}: cannot rebuild its results ({type(err).__name__}: {err}); "
                    "the file is damaged or was edited by hand"
                ) from err
    if not parts:
        raise ValueError(_report_problem(folder))
    lines = [f"# {args.title}", ""]
    for note in args.note or []:
        lines += [note, ""]
    warnings = _part_differences(parts)
    warnings += [f"{p['benchmark']}.json is marked {_incomplete_head(n)}"
                 for p in parts for n in p.get("notes", []) if str(n).startswith("INCOMPLETE")]
    for warning in warnings:
        print(f"bilinearpool-bench report: warning: {warning}", file=sys.stderr)
        lines += [f"> **Warning:** {warning}.", ""]
    lines += ["Commands that produced these results:", "", "```"]
    lines += [_command_with_env(p) for p in parts]
    lines += [command, "```", ""]
    # A run without matplotlib, or one that stopped, leaves no plot.
    plots = any((folder / f"{p.get('benchmark')}.png").is_file() for p in parts)
    kinds = "CSV, JSON with raw timings" + (", PNG plots" if plots else "")
    lines += [
        f"Raw files ({kinds}): `{folder}/`. The tables, ratios "
        "and goal lines below are rebuilt from the raw measurements in the JSON files and "
        "checked against the rows stored there.",
        "",
    ]
    for table in tables:
        lines += [table.rstrip(), ""]
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


def _common(parser: argparse.ArgumentParser, *, out_default: str | None, quick: bool = True) -> None:
    """The options every measuring subcommand takes; ``quick=False``: no ``--quick`` (demo is quick)."""
    g = parser.add_argument_group("common options")
    g.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)"
    )
    g.add_argument("--batch-size", type=int, default=None, help="batch size (layers: replaces B of every shape; "
                   "models default: 2 on CPU, 1 at 448px and above, 32 on CUDA; 2 with --quick and in demo)")  # fmt: skip
    g.add_argument("--repeats", type=int, default=None, help="timed rounds, the median is reported "
                   "(default: layers 5, models 3 on CPU; 20 on CUDA; 2 with --quick and in demo)")  # fmt: skip
    g.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed rounds first (default: 1 on CPU, 5 on CUDA); before them each candidate "
        "runs once, untimed, to drop one that fails (with --warmup 0 too)",
    )
    if quick:
        g.add_argument(
            "--quick",
            action="store_true",
            help="short run: 1 warm-up + 2 timed rounds (models: 224px, batch 2, on CPU and CUDA)",
        )
    g.add_argument("--out", type=_path, default=out_default, help="folder for <name>.csv/.json/.md/.png "
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
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the random inputs, in [-2**63, 2**64) (default: 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _layers_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("layers")
    g.add_argument("--shapes", type=_parse_shape, nargs="+", default=None, metavar="BxCxHxW",
                   help="input shapes (default: " + " ".join("x".join(map(str, s)) for s in LAYER_SHAPES) + ")")  # fmt: skip
    g.add_argument("--cases", nargs="+", default=None, metavar="NAME",
                   help=f"layer cases to run (default: all): {', '.join(bench.LAYER_CASES)}, and those "
                   "the --import modules register; naive and matmul-floor always run (the ratios need them)")  # fmt: skip
    g.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE",
                   help="import MODULE before the cases are checked (repeatable): a module that registers "
                   "layer cases with bilinearpool.bench.register_layer_case; found on sys.path or in the "
                   "current folder")  # fmt: skip


def _models_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models")
    g.add_argument("--backbones", nargs="+", default=None, metavar="NAME",
                   help="any name bilinearpool.build_backbone accepts (default: " + " ".join(PAPER_BACKBONES) + ")")  # fmt: skip
    g.add_argument("--heads", nargs="+", default=None, metavar="HEAD",
                   help=f"heads: {', '.join(bench.MODEL_HEADS)}, and those the --import modules add "
                   f"(default: {' '.join(PAPER_HEADS)}); plain always runs, it is the baseline of the ratios")  # fmt: skip
    g.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE",
                   help="import MODULE before the heads are checked (repeatable): a module that adds "
                   "bilinearpool.bench.ModelHead entries to bilinearpool.bench.MODEL_HEADS; found on "
                   "sys.path or in the current folder")  # fmt: skip
    g.add_argument("--resolutions", type=int, nargs="+", default=None, metavar="PX",
                   help="square input sizes (default: 197 224 448; 224 with --quick)")  # fmt: skip
    g.add_argument("--batch-size-at", type=_parse_batch_at, action="append", default=None, metavar="RES=BATCH",
                   help="batch size at one resolution, e.g. --batch-size-at 448=1 (repeatable)")  # fmt: skip
    g.add_argument("--node", dest="nodes", type=_parse_node, action="append", default=None,
                   metavar="BACKBONE=NODE",
                   help="cut BACKBONE at the graph node NODE for every head, e.g. --node vit_b_16=encoder "
                   "(repeatable; needed by backbones without a default feature node, such as torchvision's "
                   "vision transformers; the channels are read from a zero image of the run's 224px, "
                   "else its first, resolution)")  # fmt: skip
    g.add_argument(
        "--num-classes",
        type=int,
        default=8,
        help="classes of the classifier (default: 8, the paper's)",
    )
    g.add_argument("--se-reduction", type=int, default=None,
                   help=f"SE ratio of the 'se' head (default: {PAPER_SE_REDUCTION}); refused "
                   "without a head that has SE blocks")  # fmt: skip
    g.add_argument("--params-only", action="store_true",
                   help="parameter counts only, models built without weights (meta device), no "
                   "timing: the timing options, "
                   "--resolutions and a --device other than cpu are refused with it")  # fmt: skip
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
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
        "with --num-classes classes (default 8) and random weights (nothing is downloaded). Each row shows its ratio to the "
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
    _common(p, out_default="results/demo", quick=False)
    p = sub.add_parser(
        "report",
        help="one Markdown file from the layers/models results in a folder",
        description="Collect FOLDER/layers.json and FOLDER/models.json (their commands, environments, "
        "tables and goals) into one Markdown file. The tables, ratios and goal lines are rebuilt from "
        "the raw measurements in the JSON files with this version's code; a stored row that disagrees "
        "with them is an error (exit code 1), and parts from different commits or environments are "
        "flagged with a warning.",
        formatter_class=fmt,
    )
    p.add_argument("folder", type=_path, help="folder written by `layers --out` / `models --out`")
    p.add_argument("--out", type=_path, default=None, help="Markdown file to write (default: print)")
    p.add_argument("--title", type=_text, default="bilinearpool benchmark results", help="heading of the file")
    p.add_argument(
        "--note", type=_text, action="append", default=None, help="paragraph under the heading (repeatable)"
    )
    # main() reports a subcommand's bad input with that subcommand's usage, as argparse does
    parser.subcommands = dict(sub.choices)  # type: ignore[attr-defined]
    return parser


#: Largest ``--threads`` taken (torch.set_num_threads overflows above 2**31 - 1, and
#: OpenMP would try to start that many threads).
MAX_THREADS = 1024

#: Largest ``--num-classes`` (and other sizes) taken: a classifier of more outputs than
#: this fails to be built anyway, and sizes above 2**63 fail in torch as a TypeError.
MAX_SIZE = 2**31 - 1


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch_size", "repeats", "threads", "num_classes", "se_reduction"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, but got {value}")
        most = MAX_THREADS if name == "threads" else MAX_SIZE
        if value is not None and value > most:
            parser.error(f"--{name.replace('_', '-')} must be at most {most}, but got {value}")
    if getattr(args, "warmup", None) is not None and args.warmup < 0:
        parser.error(f"--warmup must be at least 0, but got {args.warmup}")
    for res in getattr(args, "resolutions", None) or []:
        if res < 32:
            parser.error(f"--resolutions must be at least 32 pixels, but got {res}")
    seed = getattr(args, "seed", None)
    if seed is not None and not -(2**63) <= seed < 2**64:  # what torch.Generator takes
        parser.error(f"--seed must be in [-2**63, 2**64), but got {seed}")


#: Suffixes of the files a run writes into ``--out`` (see :func:`write_result`).
_RESULT_SUFFIXES = (".csv", ".json", ".md", ".png")


def _writable_problem(folder: Path, option: str, what: str = "a folder") -> str | None:
    """Why files cannot be written into ``folder``, or None when they can.

    Tried, not guessed: the folder is created when missing, and a probe file is written
    into it and removed (a path under ``/proc``, a read-only file system or a folder
    without permission fail here, before anything is measured).
    """
    for place in (folder, *folder.parents):
        if place.exists():
            break
        if place.is_symlink():  # mkdir would say "File exists"
            return (
                f"{option} expected {what} that can be created, but "
                f"{folder if place == folder else f'{place}, a folder above {folder},'} is a "
                f"symbolic link to {os.readlink(place)}, which does not exist"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return (
            f"{option} expected {what} that can be created, but creating {folder} failed "
            f"with {_error_text(err)}"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".bilinearpool-bench-", suffix=".probe", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        return (
            f"{option} expected {what} that can be written, but writing a file into {folder} "
            f"failed with {_error_text(err)}"
        )
    return None


def _out_problem(out: Path, option: str = "--out", names: Sequence[str] = ()) -> str | None:
    """Why the output folder ``out`` cannot be written, found before anything is measured.

    A file in the way (``out`` itself or a folder above it), a folder that cannot be
    created or written (:func:`_writable_problem`, which creates it), and a folder where
    one of the files ``<name>.csv/.json/.md/.png`` of ``names`` is to be written.
    """
    if out.exists() and not out.is_dir():
        return f"{option} expected a folder, but {out} is an existing file"
    problem = _file_above(out, option, "a folder") or _writable_problem(out, option)
    if problem is not None:
        return problem
    for path in (out / f"{name}{suffix}" for name in names for suffix in _RESULT_SUFFIXES):
        if path.is_dir():
            return f"{option} expected to write the file {path}, but a folder of that name is there"
    return None


def _file_above(path: Path, option: str, what: str) -> str | None:
    """The error when the nearest existing folder above ``path`` is a file, else None."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{option} expected {what}, but {parent} (above {path}) is a file"
            break
    return None


def _report_out_problem(out: Path, folder: Path | None = None) -> str | None:
    """Why ``report --out FILE.md`` cannot be written, found before the report is built:
    also when it is one of the result files in ``folder`` that the report reads or
    describes (writing it would replace the raw data)."""
    if out.is_dir():
        return f"--out expected a Markdown file, but {out} is a folder"
    if folder is not None:
        ours = {(folder / f"{name}.{ext}").resolve()
                for name in ("layers", "models") for ext in ("json", "csv", "md", "png")}
        if out.resolve() in ours:
            return (f"--out expected a Markdown file beside the results, but {out} is one of "
                    f"the result files of {folder} (writing it would replace them); name "
                    "another file, e.g. one next to the folder")
    return (_file_above(out, "--out", "a Markdown file")
            or _writable_problem(out.parent, "--out", "a Markdown file in a folder"))


#: Layer cases and model heads that an ``--import`` module registered, by that module's
#: name (recorded when the module is first imported, which is when it registers them).
_IMPORTED: dict[str, dict[str, str]] = {"layer case": {}, "model head": {}}


def _import_modules(modules: Sequence[str]) -> None:
    """Import the ``--import`` modules, which register layer cases or model heads.

    The current folder is searched too, as ``python -m`` does (the ``bilinearpool-bench``
    script does not put it on ``sys.path``): it is appended to ``sys.path``. What a module
    registers on its first import is recorded in :data:`_IMPORTED`, so that a run can tell
    it from what its process registered by other means (see :func:`_in_process_note`).

    Raises:
        ValueError: a module that cannot be imported, named, with the error its import raised.
    """
    if not modules:
        return
    cwd = os.getcwd()
    if not any(isinstance(p, str) and os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.append(cwd)
    registries = {"layer case": bench.LAYER_CASES, "model head": bench.MODEL_HEADS}
    for module in dict.fromkeys(modules):
        before = {kind: set(registry) for kind, registry in registries.items()}
        try:
            importlib.import_module(module)
        except (Exception, SystemExit) as err:  # ImportError, what its code raised, sys.exit()
            raise ValueError(
                f"--import expected a module that can be imported, but importing {module!r} "
                f"raised {_error_text(err)}"
            ) from err
        for kind, registry in registries.items():
            for name in set(registry) - before[kind]:
                _IMPORTED[kind][name] = module


#: Start of the note of a run that measured layer cases or model heads its command cannot
#: run in a fresh process (``report`` keeps it, as it keeps an INCOMPLETE mark).
_IN_PROCESS = "IN-PROCESS:"


def _in_process_note(kind: str, names: Sequence[str], imports: Sequence[str] | None) -> list[str]:
    """The note of a run whose ``names`` (``kind``: ``"layer case"`` or ``"model head"``)
    include some that neither the library nor an ``--import`` module of its command
    registered: registered by the Python process that called :func:`main`, they are
    unknown to the recorded command run in a fresh process. ``[]`` when there are none.

    Examples:
        >>> _in_process_note("layer case", ["naive", "fast-bcnn"], None)
        []
    """
    library = bench._LIBRARY_LAYER_CASES if kind == "layer case" else bench._LIBRARY_MODEL_HEADS
    given = set(imports or [])

    def imported(name: str) -> bool:
        # Recorded when an --import module registered it; also known from the module that
        # made it (a module imported before main() was called): for a layer case the module
        # that defines its build function, for a model head the one ModelHead records.
        if kind == "layer case":
            made_in = getattr(getattr(bench.LAYER_CASES.get(name), "build", None), "__module__", None)
        else:
            made_in = getattr(bench.MODEL_HEADS.get(name), "module", None)
        return _IMPORTED[kind].get(name) in given or (made_in is not None and made_in in given)

    foreign = [n for n in names if n not in library and not imported(n)]
    if not foreign:
        return []
    option = "--cases" if kind == "layer case" else "--heads"
    them, were = plural(len(foreign), "it", "them"), plural(len(foreign), "was", "were")
    return [
        f"{_IN_PROCESS} the {plural(len(foreign), kind)} {', '.join(f'`{n}`' for n in foreign)} "
        f"of this run {were} registered in the Python process that ran it, not by the library "
        "nor by importing an --import module of the command above, so that command, run in a "
        f"fresh process, does not know {them} ({option} refuses {them}, or the default runs "
        f"without {them}): to rerun it, add --import MODULE naming the module that registers "
        f"{them}."
    ]


def _backbones_problem(command: str, given: Sequence[str] | None) -> str | None:
    """Why the backbones a ``models`` or ``demo`` run would build cannot all be built here.

    Checks ``given`` (``--backbones``), or the paper's backbones a run without it builds,
    with :func:`bilinearpool.check_backbone_name`: a name whose package is not installed
    (``inception_resnet_v2`` comes from timm, ``timm:`` names too) is named with the extra
    to install and how to leave it out; any other name is unknown, given with the error's
    own text (its close names, a missing package that may provide it). None when every
    name can be built.
    """
    from . import backbones as bb

    names = list(dict.fromkeys(given or PAPER_BACKBONES))
    errors: dict[str, Exception] = {}
    for b in names:
        try:
            bb.check_backbone_name(b)
        except (ValueError, ImportError) as err:
            errors[b] = err
    if not errors:
        return None
    extras = {"torchvision": "vision", "timm": "timm"}
    needs: list[str] = []
    others: dict[str, Exception] = {}
    for b, err in errors.items():
        provider = "timm" if b.startswith("timm:") else bb.PAPER_BACKBONES.get(b.partition(".")[0])
        missing = bb._missing(provider, extras[provider]) if isinstance(err, ImportError) and provider else ""
        if missing:
            needs.append(f"{b} comes from {provider} ({missing})")
        else:
            others[b] = err
    reasons = list(needs)
    if others:
        reasons.append(f"got unknown {list(others)}: " + "; ".join(str(err) for err in others.values()))
    if command == "demo":
        head = f"demo builds the backbones {' '.join(names)} (its models --quick part)"
    elif given:
        timm = "" if bb._missing("timm", "timm") else ", timm models"
        head = (
            f"--backbones expected names that bilinearpool.build_backbone accepts (torchvision "
            f"classification models{timm}; see bilinearpool.list_backbones())"
        )
    else:
        head = f"models builds the backbones {' '.join(names)} when --backbones is not given"
    text = f"{head}, but " + "; ".join(reasons)
    if needs:
        kept = " ".join(b for b in names if b not in errors)
        if not kept:
            leave = ""
        elif command == "demo":
            leave = (
                f", or run demo's two parts without {' '.join(errors)}: `bilinearpool-bench "
                f"layers --quick` and `bilinearpool-bench models --quick --backbones {kept}`"
            )
        else:
            leave = f", or leave out {' '.join(errors)}: --backbones {kept}"
        text += f"; install what is missing{leave}"
    return text


def _check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, with an ``error:`` line, what would fail only after (part of) a run, and
    options that the run would ignore without a word.

    The ``--import`` modules are imported first (what they register is then known to the
    name checks); the output folder is checked last, since checking it creates it.
    """
    if args.command == "report":
        problem = None if args.out is None else _report_out_problem(args.out, args.folder)
        if problem is not None:
            parser.error(problem)
        if not any((args.folder / f"{n}.json").is_file() for n in ("layers", "models")):
            parser.error(_report_problem(args.folder))
        return
    try:
        _import_modules(getattr(args, "imports", None) or [])
    except ValueError as err:
        parser.error(str(err))
    # --params-only uses no device: a --device cuda given with it is refused as ignored,
    # also where CUDA is not there
    problem = _params_only_problem(args) if args.command == "models" else None
    problem = problem or _device_problem(args.device)
    if problem is not None:
        parser.error(problem)
    try:
        if args.command == "layers":
            _check_layer_cases(args.cases or [])
        elif args.command == "models":
            _select_heads(args.heads or [])
    except ValueError as err:
        what = "cases" if args.command == "layers" else "heads"
        parser.error(f"{err}; {what} that a module of yours registers need --import MODULE")
    if args.command in ("models", "demo"):
        problem = _backbones_problem(args.command, getattr(args, "backbones", None))
        if problem is not None:
            parser.error(problem)
    if args.command == "models":
        problem = _se_reduction_problem(args)
        if problem is not None:
            parser.error(problem)
    if args.command == "models" and args.batch_size_at:
        given: dict[int, list[int]] = {}
        for r, b in args.batch_size_at:
            given.setdefault(r, []).append(b)
        twice = [f"{r}={'/'.join(map(str, b))}" for r, b in given.items() if len(set(b)) > 1]
        if twice:  # only the last would count, without a word
            parser.error(f"--batch-size-at expected one batch size per resolution, but got "
                         f"{' '.join(twice)}")
        runs = _model_resolutions(args)
        unused = [f"{r}={b}" for r, b in args.batch_size_at if r not in runs]
        if unused:  # it would be ignored without a word
            parser.error(f"--batch-size-at {' '.join(unused)} names a resolution this run does not "
                         f"measure (resolutions: {' '.join(map(str, runs))})")
    if args.command == "models" and args.nodes:
        problem = _nodes_problem(args.nodes, list(args.backbones or PAPER_BACKBONES))
        if problem is not None:
            parser.error(problem)
    problem = _ignored_problem(args)
    if problem is not None:
        parser.error(problem)
    if args.out is not None:
        names = ["layers", "models"] if args.command == "demo" else [args.command]
        problem = _out_problem(args.out, names=names)
        if problem is not None:
            parser.error(problem)


def _nodes_problem(
    nodes: Sequence[tuple[str, str]], backbones: Sequence[str], *, option: str = "--node"
) -> str | None:
    """``--node`` (named ``option``) for a backbone the run does not build, two nodes for
    one backbone (either would be ignored without a word), or one for a timm model; or None.

    Examples:
        >>> _nodes_problem([("vit_b_16", "encoder")], ["resnet50"])
        '--node vit_b_16=encoder names a backbone this run does not build (backbones: resnet50)'
    """
    given: dict[str, list[str]] = {}
    for b, n in nodes:
        given.setdefault(b, []).append(n)
    twice = [f"{b}={'/'.join(n)}" for b, n in given.items() if len(set(n)) > 1]
    if twice:
        return f"{option} expected one node per backbone, but got {' '.join(twice)}"
    unused = [f"{b}={n[0]}" for b, n in given.items() if b not in backbones]
    if unused:
        return (f"{option} {' '.join(unused)} names a backbone this run does not build "
                f"(backbones: {' '.join(backbones)})")
    timm = [f"{b}={n[0]}" for b, n in given.items() if b.startswith("timm:")]
    if timm:
        return (f"{option} {' '.join(timm)}: a graph node cuts torchvision models and modules; a timm "
                f"model gives its last feature map itself (drop {option})")
    return None


def _ignored_problem(args: argparse.Namespace) -> str | None:
    """``--quick`` when every setting it picks is given too, or a ``models --batch-size``
    that no resolution uses (``--batch-size-at`` names each one): ignored without a
    word, or None."""
    if args.command not in ("layers", "models") or getattr(args, "params_only", False):
        return None  # --params-only refuses the timing options itself
    models = args.command == "models"
    every_batch_set = models and bool(args.batch_size_at) and {r for r, _ in args.batch_size_at} >= set(
        _model_resolutions(args)
    )
    if args.quick:
        given = {"--warmup": args.warmup is not None, "--repeats": args.repeats is not None}
        if models:
            given["--resolutions"] = bool(args.resolutions)
            given["--batch-size"] = args.batch_size is not None or every_batch_set
        if all(given.values()):
            return (
                f"--quick picks {', '.join(given)}, and all of them are given: it would change "
                "nothing, drop it"
            )
    if models and args.batch_size is not None and every_batch_set:
        return (
            f"--batch-size {args.batch_size} would be used at no resolution: --batch-size-at "
            "sets the batch size of each one this run measures; drop one of them"
        )
    return None


#: ``models`` options that only the timing reads; their defaults (None, False) tell a
#: value given from one left out.
_TIMING_OPTIONS = ("repeats", "warmup", "batch_size", "batch_size_at", "threads", "amp",
                   "channels_last", "no_train", "quick", "resolutions")  # fmt: skip


def _params_only_problem(args: argparse.Namespace) -> str | None:
    """The options ``models --params-only`` would ignore without a word, or None.

    It builds the models on the meta device (no weights), counts their parameters and times
    nothing: the timing options, the resolutions, a device other than the CPU and a seed
    (of the random inputs) change nothing in its results. ``--seed 0`` cannot be told from
    the default, so only another seed is named.
    """
    if not args.params_only:
        return None
    given = []
    for name in _TIMING_OPTIONS:
        value = getattr(args, name)
        if value is None or value is False:
            continue
        option = "--" + name.replace("_", "-")
        if value is True:
            given.append(option)
        elif name == "batch_size_at":
            given.append(f"{option} {' '.join(f'{r}={b}' for r, b in value)}")
        elif isinstance(value, list):
            given.append(f"{option} {' '.join(map(str, value))}")
        else:
            given.append(f"{option} {value}")
    try:
        on_cpu = torch.device(args.device).type == "cpu"
    except (RuntimeError, ValueError):  # not a device: the device check says so
        on_cpu = True
    if not on_cpu:
        given.append(f"--device {args.device}")
    if args.seed:
        given.append(f"--seed {args.seed}")
    if not given:
        return None
    n = len(given)
    return (f"{' '.join(given)} {plural(n, 'does', 'do')} nothing with --params-only, which "
            f"counts parameters without weights and times nothing: leave {plural(n, 'it', 'them')} out, "
            "or drop --params-only to time the models")


def _se_reduction_problem(args: argparse.Namespace) -> str | None:
    """Why ``--se-reduction`` would do nothing in this run (no head with SE blocks), or None."""
    if args.se_reduction is None:
        return None
    heads = _select_heads(args.heads or list(PAPER_HEADS))
    if any(h.se for h in heads):
        return None
    names = " ".join(h.name for h in heads)
    return (f"--se-reduction {args.se_reduction} does nothing without an SE head (heads: {names}): "
            "add se to --heads, or leave --se-reduction out")


def _saver(out: Path | None) -> Checkpoint | None:
    """Writes a partial result's CSV, JSON and Markdown (no plot) into ``out``."""
    if out is None:
        return None
    return lambda result: write_result(result, out, plot=False)


def _dropping_earlier(checkpoint: Checkpoint | None, out: Path | None, stem: str) -> Checkpoint | None:
    """``checkpoint`` that first removes the ``stem`` results (``.csv``, ``.json``, ``.md``,
    ``.png``) an earlier run left in ``out``: ``demo`` writes its layers part, then its
    models part, and a demo stopped in between left its own ``layers.*`` beside an older
    run's ``models.*``, which ``report`` then combined. Nothing is removed until this run
    writes its first result, and the warning at its start says the files are replaced."""
    if checkpoint is None or out is None:
        return checkpoint
    pending = [Path(out) / f"{stem}.{ext}" for ext in ("json", "csv", "md", "png")]

    def save(result: BenchResult) -> None:
        for path in pending:
            path.unlink(missing_ok=True)
        pending.clear()  # the first result only
        checkpoint(result)

    return save


def _finish(result: BenchResult, out: Path | None) -> list[Path]:
    """Write the finished ``result`` into ``out`` (when given), then print its table.

    Stopped while the plot is drawn or the files are written, the complete rows are still
    put in place (without the plot), and the stop goes on."""
    written: list[Path] = []
    if out is not None:
        try:
            written = write_result(result, out)
        except KeyboardInterrupt as err:
            try:
                write_result(result, out, plot=False)
            except Exception as failed:
                said = (f"writing the finished results failed too, with {_error_text(failed)}: "
                        f"{out} holds the files written before")
            else:
                said = f"the finished results are written into {out}, without the plot"
            print(f"bilinearpool-bench: stopped by {_error_text(err)} while writing; {said}", file=sys.stderr)
            with contextlib.suppress(AttributeError):
                err._bench_said = True  # type: ignore[attr-defined]
            raise
    print(result.markdown())
    return written


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler), raised where the run is, so that it
    stops as on Ctrl-C: the rows so far written, marked INCOMPLETE; status 143."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM raises :class:`_Terminated` (in the main thread; elsewhere, or where
    the platform has no SIGTERM, nothing changes). The previous handler goes back after."""
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stdout_gone() -> None:
    """stdout's reader has gone (``| head``): what is left of stdout goes nowhere, so that
    Python's flush at exit does not fail once more."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bilinearpool-bench`` (and ``python -m bilinearpool.bench``).

    Exit status: 0; 1 for results that disagree with their raw data (``report``) or that
    could not be written, and for a run that measured nothing (every row skipped or
    failed; its files are written); 2 for a usage error; 130 on Ctrl-C and 143 on SIGTERM (one line
    on stderr, the rows measured so far written, marked INCOMPLETE); 141 when stdout's
    reader has gone (``| head``: the files are written before the table is printed).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    with _terminate_as_interrupt():
        try:
            return _main(parser, args, argv)
        except KeyboardInterrupt as err:  # one line, not a traceback (also in the checks before a run)
            terminated = isinstance(err, _Terminated)
            if not getattr(err, "_bench_said", False):  # else _write_stopped's line said it
                what = "terminated (SIGTERM)" if terminated else "interrupted"
                print(f"bilinearpool-bench {args.command}: {what}", file=sys.stderr)
            return 143 if terminated else 130  # 128 + the signal, as a shell reports it
        except BrokenPipeError:
            _stdout_gone()
            return 141  # 128 + SIGPIPE
        except OSError as err:  # results that could not be written (a run's own failures are notes)
            if not getattr(err, "_bench_said", False):
                text = str(err) if isinstance(err, ResultWriteError) else _error_text(err)
                print(f"bilinearpool-bench {args.command}: error: {text}", file=sys.stderr)
            return 1


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    subcommand = parser.subcommands[args.command]  # type: ignore[attr-defined]
    _check_positive(subcommand, args)
    _check_inputs(subcommand, args)
    command = "bilinearpool-bench " + shlex.join(argv)
    if args.command == "report":
        # The title and notes are printed in the report itself; the command shows where they go.
        shown = [
            "TEXT" if i > 0 and argv[i - 1] in ("--note", "--title") else a
            for i, a in enumerate(argv)
        ]
        try:
            return _report(args, command="bilinearpool-bench " + shlex.join(shown))
        except ResultMismatchError as err:
            print(f"bilinearpool-bench report: error: {err}", file=sys.stderr)
            return 1
    with _holding_out(args.out) as busy:
        if busy:
            print(f"bilinearpool-bench {args.command}: error: --out {args.out} is in use by "
                  "another bilinearpool-bench run, which writes its results there as it goes: "
                  "wait for it to finish, or pass another --out", file=sys.stderr)
            return 2
        empty: list[str] = []
        written = _run(args, command, empty)
    if written:
        print("Results written to:\n" + "\n".join(f"  {p}" for p in written))
    for name in empty:  # exit status 0 told a script that the run had measured something
        column = "error" if name == "layers" else "note"
        print(f"bilinearpool-bench {args.command}: error: the {name} run measured nothing: every "
              f"row was skipped or failed, with the reason in its {column} column", file=sys.stderr)
    return 1 if empty else 0


@contextlib.contextmanager
def _holding_out(out: str | None) -> Iterator[bool]:
    """Hold the ``--out`` folder of a measuring run (an exclusive ``flock`` on the folder
    itself: no lock file among the results; the kernel lets go when the process ends in
    any way); yields whether another run holds it. Two runs into one folder replaced
    each other's files as they went, each file ending as the last writer's. Where there
    is no ``flock`` (Windows, some network file systems) nothing is held.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield False
        return
    try:
        fd = os.open(out, os.O_RDONLY) if out else None  # the checks before made the folder
    except OSError:
        fd = None  # what writing there then says is the error
    if fd is None:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield True
            return
        except OSError:  # no flock on this file system: hold nothing
            pass
        yield False
    finally:
        os.close(fd)


def _demo_defaults() -> dict[str, Any]:
    """What ``demo`` runs its two parts with: the defaults of every option of ``layers``
    and ``models`` (demo has none of them), and ``--quick``.

    Examples:
        >>> d = _demo_defaults()
        >>> d["quick"], d["backbones"], d["nodes"], d["num_classes"]
        (True, None, None, 8)
    """
    defaults: dict[str, Any] = {}
    for add in (_layers_options, _models_options):
        parser = argparse.ArgumentParser(add_help=False)
        add(parser)
        defaults.update(vars(parser.parse_args([])))
    return {**defaults, "quick": True}


def _measured_nothing(result: BenchResult) -> bool:
    """Whether every row of ``result`` was skipped or failed: no layer timed; no model
    timed (counted, with ``--params-only``)."""
    if result.name == "layers":
        keys = ["fwd_bwd_ms"]
    else:
        keys = [k for k in ("infer_img_s", "train_img_s") if k in result.columns] or ["params"]
    return all(row.get(k) is None for row in result.rows for k in keys)


def _run(args: argparse.Namespace, command: str, empty: list[str] | None = None) -> list[Path]:
    """Run the ``layers``, ``models`` or ``demo`` subcommand; the files it wrote. The name
    of a part that measured nothing (:func:`_measured_nothing`) is added to ``empty``."""
    written: list[Path] = []
    empty = [] if empty is None else empty
    stems = ("layers", "models") if args.command == "demo" else (args.command,)
    earlier = [f"{stem}.json" for stem in stems if args.out and (Path(args.out) / f"{stem}.json").is_file()]
    if earlier:  # written over after the first shape or model: a run stopped then loses them
        print(f"bilinearpool-bench {args.command}: warning: {args.out} holds the results of an "
              f"earlier run ({', '.join(earlier)}); this run replaces them as it goes",
              file=sys.stderr)
    results: list[BenchResult] = []
    if args.command == "layers":
        results.append(run_layers(args, command=command, checkpoint=_saver(args.out)))
        written += _finish(results[-1], args.out)
    elif args.command == "models":
        results.append(run_models(args, command=command, checkpoint=_saver(args.out)))
        written += _finish(results[-1], args.out)
    elif args.command == "demo":
        for name, option in _demo_defaults().items():
            if not hasattr(args, name):  # what demo's own options set stays
                setattr(args, name, option)
        layers = run_layers(
            args, command=command + "  (layers part: layers --quick)",
            checkpoint=_dropping_earlier(_saver(args.out), args.out, "models"),
        )
        written += _finish(layers, args.out)
        models = run_models(
            args, command=command + "  (models part: models --quick)", checkpoint=_saver(args.out)
        )
        written += _finish(models, args.out)
        results += [layers, models]
    empty += [r.name for r in results if _measured_nothing(r)]
    return written


if __name__ == "__main__":
    raise SystemExit(main())
