"""Benchmark: Tensor Sketch, FFT vs Gram algorithm, forward + backward, side by side in one run.

Compares, on the same inputs, device and thread count, the two algorithms of
:func:`bilinearpool.functional.sketch.tensor_sketch`:

- ``fft``: per-location count sketches and ``rfft`` of length ``d``, :math:`O(N d \\log d)`;
- ``gram``: one batched matmul :math:`G = X Y^\\top / N` and a count sketch of its
  :math:`C_1 C_2` entries, :math:`O(C_1 C_2 N)` at BLAS speed plus :math:`O(C_1 C_2)` scatter;

and, for scale, ``bilinear``: plain full bilinear pooling ``(X Y^T / N).flatten(1)``,
the floor under ``gram``. Reported per shape: median forward+backward time after
warm-up (algorithms interleaved, one run of each per round, so that load from other
processes hits them alike, in balanced orders, ``bilinearpool.bench.balanced_orders``), ``gram / fft``, which algorithm ``"auto"`` picks
(and whether that was the faster one), and the bytes saved for backward
(``saved_tensors_hooks``, exact).

``--fit`` instead times both algorithms per sample over a grid (C 128..2048, N 1..784,
d 2048..16384, one and two streams; about 3 minutes at one thread) and fits the
constants of the ``"auto"`` cost model (``_gram_is_cheaper`` in
``bilinearpool/functional/sketch.py``) by least squares; that is how they were chosen,
at ``--threads 1`` on the shared two-core development machine. The default shapes
then check the rule ("auto_ok").

Usage::

    python benchmarks/bench_tensor_sketch.py --threads 1              # the default shapes (one stream)
    python benchmarks/bench_tensor_sketch.py --threads 1 --two-streams --shapes 16,512,28,28,8192
    python benchmarks/bench_tensor_sketch.py --threads 1 --out benchmarks/results/tensor-sketch-cpu
    python benchmarks/bench_tensor_sketch.py --threads 1 --fit       # refit the cost model

A shape is ``B,C,H,W,d``.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import emit  # noqa: E402
from bilinearpool.bench import SavedTensorCounter, environment, round_robin, time_call  # noqa: E402
from bilinearpool.functional.sketch import _gram_is_cheaper, tensor_sketch  # noqa: E402

DEFAULT_SHAPES = [
    "8,2048,7,7,8192",
    "8,1536,5,5,8192",
    "16,512,28,28,8192",
    "32,256,14,14,8192",
    "16,1024,14,14,8192",
    "32,512,14,14,2048",
    "16,1024,14,14,2048",
    "32,512,14,14,16384",
    "32,512,3,3,8192",
    "64,512,1,1,8192",
    "32,2048,1,1,8192",
    "16,2048,3,3,8192",
]

Fn = Callable[[Tensor, "Tensor | None"], Tensor]


def _parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """``B,C,H,W,d`` or ``BxCxHxWxd`` (the separator of ``bilinearpool-bench --shapes``)."""
    try:
        parts = tuple(int(p) for p in re.split(r"[,x]", text.strip()))
    except ValueError:
        parts = ()
    if len(parts) != 5 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            "a shape is five positive ints B,C,H,W,d (or BxCxHxWxd): batch, channels, height, "
            f"width and the sketch's out_features, e.g. 32,512,14,14,8192, but got {text!r}")
    return parts  # type: ignore[return-value]


def _methods(c: int, d: int, device: torch.device) -> dict[str, Fn]:
    g = torch.Generator().manual_seed(1)
    ia, ib = (torch.randint(0, d, (c,), generator=g).to(device) for _ in range(2))
    sa, sb = ((torch.randint(0, 2, (c,), generator=g) * 2.0 - 1).to(device) for _ in range(2))

    def sketch(algorithm: str) -> Fn:
        return lambda x, y: tensor_sketch(
            x, y, index_a=ia, sign_a=sa, index_b=ib, sign_b=sb, out_features=d, algorithm=algorithm
        )

    def bilinear(x: Tensor, y: Tensor | None) -> Tensor:
        a = x.flatten(2)
        b = a if y is None else y.flatten(2)
        return (a @ b.transpose(1, 2) / a.shape[2]).flatten(1)

    return {"fft": sketch("fft"), "gram": sketch("gram"), "bilinear": bilinear}


def _leaves(x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return x.detach().clone().requires_grad_(), None if y is None else y.detach().clone().requires_grad_()


def _saved_mb(fn: Fn, x: Tensor, y: Tensor | None) -> float:
    """MiB autograd keeps for backward (distinct storages, via saved_tensors_hooks)."""
    with SavedTensorCounter() as saved:
        fn(*_leaves(x, y))
    return saved.nbytes / 2**20


def _step(fn: Fn, x: Tensor, y: Tensor | None) -> Callable[[], None]:
    """One forward + backward of ``fn`` on leaves made once (their gradients reset each call)."""
    lx, ly = _leaves(x, y)

    def step() -> None:
        lx.grad = None
        if ly is not None:
            ly.grad = None
        out = fn(lx, ly)
        out.backward(torch.ones_like(out))

    return step


def _measure_all(methods: dict[str, Fn], x: Tensor, y: Tensor | None, warmup: int, repeats: int) -> dict[str, dict]:
    """Median time of each method, interleaved in balanced orders (``bilinearpool.bench.round_robin``)."""
    times = round_robin({name: _step(fn, x, y) for name, fn in methods.items()},
                        warmup=warmup, repeats=repeats, device=x.device)
    return {
        name: {"saved_mb": _saved_mb(fn, x, y), "median_ms": statistics.median(times[name]) * 1e3}
        for name, fn in methods.items()
    }


def _per_sample_ms(algorithm: str, bsz: int, c: int, n: int, d: int, two: bool, repeats: int) -> float:
    """Fastest of ``repeats`` forward+backward runs (after one warm-up), per sample."""
    fn = _methods(c, d, torch.device("cpu"))[algorithm]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(bsz, c, n, 1, generator=gen)
    y = torch.randn(bsz, c, n, 1, generator=gen) if two else None
    times = [time_call(_step(fn, x, y), x.device) for _ in range(repeats + 1)][1:]
    return min(times) / bsz * 1e3


def _fit(repeats: int) -> None:
    """Time both algorithms over a grid and fit the cost model of ``"auto"`` by least squares."""
    fft_rows, gram_rows = [], []
    for d in (2048, 8192, 16384):
        for c in (256, 2048):
            for n in (1, 49, 196):
                bsz = max(1, min(64, int(0.15 / (n * 1.3e-9 * d * math.log2(d)))))
                ms = _per_sample_ms("fft", bsz, c, n, d, False, repeats)
                fft_rows.append((c, n, d, ms))
                print(f"fft  C={c} N={n} d={d}: {ms:.3f} ms/sample", file=sys.stderr, flush=True)
    for two in (False, True):
        for c in (128, 256, 512, 1024, 2048):
            for n in (1, 9, 49, 196, 784):
                est = c * c * (n * 0.1e-9 + 5e-9)
                bsz = max(1, min(64, int(0.15 / est)))
                ms = _per_sample_ms("gram", bsz, c, n, 8192, two, repeats)
                gram_rows.append((c, n, two, ms))
                print(f"gram C={c} N={n} two={two}: {ms:.3f} ms/sample", file=sys.stderr, flush=True)
    # Relative least squares: each row of the system is divided by the measured time.
    a = torch.tensor([[n * d * math.log2(d) / (ms * 1e6), n * 2 * c / (ms * 1e6)] for c, n, d, ms in fft_rows])
    fft_k = torch.linalg.lstsq(a.double(), torch.ones(len(fft_rows), 1, dtype=torch.float64)).solution.flatten()
    products = [2 if not two and n >= 128 else 3 for c, n, two, _ in gram_rows]
    a = torch.tensor([[c * c / (ms * 1e6), c * c * p * n / (ms * 1e6)] for (c, n, _, ms), p in zip(gram_rows, products)])
    gram_k = torch.linalg.lstsq(a.double(), torch.ones(len(gram_rows), 1, dtype=torch.float64)).solution.flatten()
    print(
        f"fft:  N * ({fft_k[0]:.3f} * d * log2(d) + {fft_k[1]:.1f} * (C1 + C2)) ns per sample\n"
        f"gram: C1 * C2 * ({gram_k[0]:.2f} + {gram_k[1]:.4f} * p * N) ns per sample "
        "(p = 2 for one stream at N >= 128, else 3)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=_parse_shape, nargs="+", default=[_parse_shape(s) for s in DEFAULT_SHAPES],
                        help="shapes B,C,H,W,d or BxCxHxWxd, d = out_features (default: the calibration shapes)")
    parser.add_argument("--two-streams", action="store_true", help="pool x with an independent y of the same shape")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per algorithm (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per algorithm, median reported (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.csv / results.json / results.md")
    parser.add_argument("--fit", action="store_true", help="time a grid on the CPU and fit the cost model of 'auto'")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.fit:
        _fit(args.repeats)
        return 0
    env = {  # versions, commit, switches (THP), CPU or GPU name, threads, load: as bilinearpool-bench
        **environment(device),
        "two_streams": args.two_streams,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    rows = []
    gen = torch.Generator().manual_seed(0)
    for bsz, c, h, w, d in args.shapes:
        x = torch.relu(torch.randn(bsz, c, h, w, generator=gen)).to(device)
        y = torch.relu(torch.randn(bsz, c, h, w, generator=gen)).to(device) if args.two_streams else None
        print(f"B={bsz} C={c} {h}x{w} d={d}: timing fft, gram, bilinear ...", file=sys.stderr, flush=True)
        r = _measure_all(_methods(c, d, device), x, y, args.warmup, args.repeats)
        auto = "gram" if _gram_is_cheaper(c, c, h * w, d, one_stream=not args.two_streams) else "fft"
        fastest = min(("fft", "gram"), key=lambda k: r[k]["median_ms"])
        rows.append(
            {
                "B": bsz, "C": c, "HxW": f"{h}x{w}", "d": d,
                "fft_ms": round(r["fft"]["median_ms"], 1),
                "gram_ms": round(r["gram"]["median_ms"], 1),
                "bilinear_ms": round(r["bilinear"]["median_ms"], 1),
                "gram/fft": round(r["gram"]["median_ms"] / r["fft"]["median_ms"], 3),
                "auto": auto,
                "auto_ok": auto == fastest,
                "fft_saved_MiB": round(r["fft"]["saved_mb"], 2),
                "gram_saved_MiB": round(r["gram"]["saved_mb"], 2),
            }
        )
        print("  " + ", ".join(f"{k}={v}" for k, v in rows[-1].items()), file=sys.stderr, flush=True)

    header = list(rows[0])
    title = (
        f"Tensor Sketch, forward+backward, {'two streams' if args.two_streams else 'one stream'}; "
        f"torch {env['torch']}, {device.type} ({env['device']}), {env['threads']} threads; "
        f"median of {args.repeats} after {args.warmup} warm-up runs."
    )
    cmd = "python benchmarks/bench_tensor_sketch.py " + " ".join(sys.argv[1:] if argv is None else argv)
    emit(title, header, rows, env=env, out=args.out, command=cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
