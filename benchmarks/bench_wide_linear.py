"""Benchmark: the classifier on bilinear features, ``x @ w.T`` with millions of features.

Compares, interleaved on the same inputs (median after warm-up, float32), for shapes
``B x D -> out`` of a Fast BCNN classifier:

- ``f.linear``: ``torch.nn.functional.linear`` (cuBLAS, or the CPU's BLAS);
- ``library``: :func:`bilinearpool.functional.wide_linear` as shipped (one Triton kernel
  on CUDA from 2 rows, ``F.linear`` for one; a chunked batched product on CPU);
- ``kernel`` (CUDA): the library's kernel called directly, without the path checks and
  the autograd Function (``linear._forward``), at every row count;
- on CUDA, two candidate Triton kernels defined here, not in the library:
  ``dot`` accumulates ``tl.dot`` products of (16..32 rows x 128 features) tiles with the
  weight rows padded to 16 (no reduction per chunk, ``input_precision="ieee"``: float32
  accuracy), and ``deferred`` accumulates ``w * x`` products in an (out, rows, BK) tile
  (BK = 64 columns at 32 rows) and reduces it once at the end. The library's kernel took
  the ``deferred`` design
  (before, it reduced each (rows x 512) tile per class: 0.89 ms at 32 rows on an H200,
  about 0.76 TB/s, ``results/gpu-h200-head/run1/wide-linear``); the candidate stays as
  the reference it was measured against (``run2/wide-linear``: 0.31 ms, the library's
  0.41 ms, a difference not yet explained).

Each candidate is checked against ``F.linear`` first (float32, tolerance scaled with
``sqrt(D)``). ``gb_per_s``: bytes of x and w read once / median time. Usage::

    python benchmarks/bench_wide_linear.py --device cuda              # gpu_check.sh runs this
    python benchmarks/bench_wide_linear.py --device cpu --threads 1 --shapes 8x4194304x8
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import check_candidate, emit  # noqa: E402
from bilinearpool.bench import environment, round_robin  # noqa: E402
from bilinearpool.functional import linear as _linear  # noqa: E402
from bilinearpool.functional import wide_linear  # noqa: E402
from bilinearpool.functional._elementwise import next_pow2  # noqa: E402

DEFAULT_SHAPES = ["32x4194304x8", "8x4194304x8", "1x4194304x8", "32x2098176x8", "32x2359296x8"]


try:  # the candidate kernels need Triton (they run on CUDA, and under its interpreter in the tests)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _load_x(x_ptr, r, k, rows, d, stride_x):
        """The (rows r) x (features k) tile of x, zero outside."""
        return tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + k[None, :], mask=(r[:, None] < rows) & (k[None, :] < d), other=0.0)

    @triton.jit
    def dot_kernel(x_ptr, w_ptr, part_ptr, rows, d, stride_x, stride_w,
                   OUT: tl.constexpr, OUT_P: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, STEPS: tl.constexpr):
        pid = tl.program_id(0)
        r = tl.program_id(1) * BB + tl.arange(0, BB)
        outs = tl.arange(0, OUT_P)
        acc = tl.zeros([BB, OUT_P], dtype=tl.float32)
        for step in range(STEPS):
            k = (pid * STEPS + step) * BK + tl.arange(0, BK)
            kmask = k < d
            x = _load_x(x_ptr, r, k, rows, d, stride_x)
            wt = tl.load(w_ptr + outs[None, :] * stride_w + k[:, None], mask=(outs[None, :] < OUT) & kmask[:, None], other=0.0)
            acc += tl.dot(x, wt, input_precision="ieee")
        tl.store(part_ptr + (pid * rows + r[:, None]).to(tl.int64) * OUT + outs[None, :], acc,
                 mask=(r[:, None] < rows) & (outs[None, :] < OUT))

    @triton.jit
    def deferred_kernel(x_ptr, w_ptr, part_ptr, rows, d, stride_x, stride_w,
                        OUT: tl.constexpr, OUT_P: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, STEPS: tl.constexpr):
        pid = tl.program_id(0)
        r = tl.program_id(1) * BB + tl.arange(0, BB)
        outs = tl.arange(0, OUT_P)
        acc = tl.zeros([OUT_P, BB, BK], dtype=tl.float32)
        for step in range(STEPS):
            k = (pid * STEPS + step) * BK + tl.arange(0, BK)
            kmask = k < d
            x = _load_x(x_ptr, r, k, rows, d, stride_x)
            w = tl.load(w_ptr + outs[:, None] * stride_w + k[None, :], mask=(outs[:, None] < OUT) & kmask[None, :], other=0.0)
            acc += w[:, None, :] * x[None, :, :]
        s = tl.sum(acc, axis=2)  # (OUT_P, BB)
        tl.store(part_ptr + (pid * rows + r[None, :]).to(tl.int64) * OUT + outs[:, None], s,
                 mask=(r[None, :] < rows) & (outs[:, None] < OUT))



def _kernels() -> Any:
    """The candidate kernels, defined (and compiled per shape) once."""
    if triton is None:
        raise SystemExit("the candidate kernels need Triton")
    return {"dot": dot_kernel, "deferred": deferred_kernel}


def candidate(name: str, x: Tensor, w: Tensor, *, span: int = 4096) -> Callable[[], Tensor]:
    """A zero-argument callable computing ``x @ w.T`` with candidate kernel ``name``;
    each program covers ``span`` features of up to 32 rows."""
    kernel = _kernels()[name]
    rows, d = x.shape
    out = w.shape[0]
    if name == "dot":
        bb, out_p, bk = max(16, min(32, next_pow2(rows))), max(16, next_pow2(out)), 128
    else:
        bb, out_p = min(32, next_pow2(rows)), next_pow2(out)
        bk = max(16, 16384 // (out_p * bb))
    steps = max(1, span // bk)
    programs = -(-d // (bk * steps))
    grid = (programs, -(-rows // bb))

    def call() -> Tensor:
        parts = torch.empty(programs, rows, out, dtype=torch.float32, device=x.device)
        kernel[grid](x, w, parts, rows, d, x.stride(0), w.stride(0), OUT=out, OUT_P=out_p, BB=bb, BK=bk, STEPS=steps, num_warps=8)
        return parts.sum(0)

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxDxOUT (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds, median reported (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.csv / results.json / results.md")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows_out = []
    for shape in args.shapes:
        b, d, out = (int(v) for v in shape.split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(b, d, device=device, generator=g)
        w = torch.randn(out, d, device=device, generator=g) / math.sqrt(d)
        fns: dict[str, Callable[[], Tensor]] = {
            "f.linear": lambda: F.linear(x, w),
            "library": lambda: wide_linear(x, w),
        }
        if device.type == "cuda":
            # the library's kernel alone (no path checks, no autograd Function; also at one
            # row, which wide_linear sends to F.linear): separates its time from the call's
            fns["kernel"] = lambda: _linear._forward(x, w, None)
            fns.update({name: candidate(name, x, w) for name in ("dot", "deferred")})
        failed: dict[str, str] = {}
        with torch.no_grad():
            ref = F.linear(x.double(), w.double())
            for name in list(fns):
                why = check_candidate(name, fns[name], ref, tol=1e-5 * math.sqrt(d), where=shape, candidate=name in ("dot", "deferred"))
                if why:
                    failed[name] = why
                    del fns[name]
            times = round_robin(
                {k: (lambda fn=fn: fn()) for k, fn in fns.items()}, warmup=args.warmup, repeats=args.repeats, device=device
            )
        base = statistics.median(times["f.linear"])
        for name, t in times.items():
            med = statistics.median(t)
            rows_out.append({
                "shape": shape, "candidate": name, "ms": round(med * 1e3, 3), "vs_f.linear": round(med / base, 2),
                "gb_per_s": round((b + out) * d * 4 / med / 1e9, 1),
            })
        rows_out += [{"shape": shape, "candidate": name, "ms": why, "vs_f.linear": "", "gb_per_s": ""} for name, why in failed.items()]
    emit(
        f"x @ w.T for wide x, float32, {device} (median of {args.repeats} interleaved rounds)",
        ["shape", "candidate", "ms", "vs_f.linear", "gb_per_s"],
        rows_out,
        env=environment(device),
        out=args.out,
        command="python benchmarks/bench_wide_linear.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
