"""Benchmark: the one-stream fused pooling's two CPU algorithms, side by side.

``FastBilinearPool`` builds its ``C x C`` matrices on CPU in one of two ways
(``bilinearpool.functional.bilinear``), for the full output and (``--triu``) the packed
upper triangle alike:

- ``groups``: whole samples, several per block: one batched product into the output, one
  elementwise pass, and in backward the matrices rebuilt and one product ``S A``;
- ``panels``: row panels of the upper triangle (about 0.75 of the products at two
  panels), mirrored into the lower half; the backward rebuilds the panels and forms
  ``S A`` panel by panel.

The library takes ``groups`` up to ``_GROUPS_UP_TO`` entries per matrix (C <= 256) and
``panels`` above. This script times forward+backward of both on the same input,
interleaved in the same rounds (median after warm-up), with the naive op-by-op chain of
``bilinearpool-bench layers`` for scale, after checking that the two give the same
gradients; also both with ``save_output=True`` (``-so``: the backward reads the matrices
from the saved output, as the classifiers train), where no product is rebuilt. The naive
chain gives the full output in both modes. Usage::

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_gram_paths.py --threads 1 \\
        --out benchmarks/results/cpu-2core-gram-paths/threads-1
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_gram_paths.py --threads 1 --triu \\
        --out benchmarks/results/cpu-2core-gram-paths/triu-threads-1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import emit  # noqa: E402
from bilinearpool.bench import environment, naive_bilinear_chain, round_robin  # noqa: E402
from bilinearpool.functional import bilinear as FB  # noqa: E402
from bilinearpool.functional import fast_bilinear_pool  # noqa: E402

DEFAULT_SHAPES = ["64x128x28x28", "32x256x14x14", "16x512x28x28"]
#: ``_GROUPS_UP_TO`` that forces each path (the block size still bounds a group).
PATHS = {"groups": 1 << 62, "panels": 0}
CASES = {name: (path, so) for so in (False, True) for path in PATHS for name in [path + ("-so" if so else "")]}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``"BxCxHxW"`` -> four positive ints (argparse type)."""
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected a shape BxCxHxW of four positive integers, got {text!r}")
    b, c, h, w = (int(p) for p in parts)
    return b, c, h, w


def fwd_bwd(
    x: torch.Tensor, weights: torch.Tensor, path: str | None, save_output: bool = False, triu: bool = False
) -> Callable[[], torch.Tensor]:
    """One forward+backward of the fused op on ``path`` (``None``: the naive chain), keeping
    its output for backward with ``save_output``, packed with ``triu``; returns the input's
    gradient (``weights``: the incoming gradient, of the output's shape)."""

    def run() -> torch.Tensor:
        leaf = x.detach().requires_grad_()
        if path is None:
            out = naive_bilinear_chain(leaf)
        else:
            saved, FB._GROUPS_UP_TO = FB._GROUPS_UP_TO, PATHS[path]
            try:
                out = fast_bilinear_pool(leaf, save_output=save_output, triu=triu)
                (grad,) = torch.autograd.grad(out, leaf, weights)
            finally:
                FB._GROUPS_UP_TO = saved
            return grad
        (grad,) = torch.autograd.grad(out, leaf, weights)
        return grad

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar="BxCxHxW", help=f"input shapes (default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds, median reported (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default: %(default)s)")
    parser.add_argument("--triu", action="store_true", help="the packed output (triu=True) instead of the full one")
    parser.add_argument("--out", type=Path, default=None, help="also write results.{md,csv,json} to this folder")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for b, c, h, w in args.shapes:
        x = torch.randn(b, c, h, w, generator=gen).relu_()
        weights = torch.randn(b, c * c, generator=gen)
        packed = weights[:, : c * (c + 1) // 2] if args.triu else weights
        fns = {"naive": fwd_bwd(x, weights, None),
               **{n: fwd_bwd(x, packed, *case, triu=args.triu) for n, case in CASES.items()}}
        grads = {n: fns[n]() for n in CASES}
        for name in CASES:
            torch.testing.assert_close(grads[name], grads["panels"], rtol=1e-4, atol=1e-6)
        times = round_robin(fns, warmup=args.warmup, repeats=args.repeats, device=torch.device("cpu"))
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in fns:
            panels = "panels-so" if name.endswith("-so") else "panels"
            rounds = [g / p for g, p in zip(times[name], times[panels])]
            rows.append({
                "shape": f"{b}x{c}x{h}x{w}",
                "case": name,
                "fwd_bwd_ms": round(med[name] * 1e3, 1),
                "vs_naive": round(med[name] / med["naive"], 2),
                "vs_panels": round(med[name] / med[panels], 2),
                "vs_panels_rounds": f"{min(rounds):.2f}-{max(rounds):.2f}" if name.startswith("groups") else "",
                "library_takes": ("panels" if FB._sample_groups(b, c, FB._block_elements(x.device)) is None else "groups")
                if name != "naive" else "",
            })
    output = "packed output (triu=True)" if args.triu else "full output"
    emit(f"Fast BCNN pooling on CPU, {output}, forward+backward: whole-sample groups vs upper-triangle "
         f"panels (median of {args.repeats} interleaved rounds; vs_panels: against panels with the same "
         f"save_output)",
         ["shape", "case", "fwd_bwd_ms", "vs_naive", "vs_panels", "vs_panels_rounds", "library_takes"],
         rows, env=environment(torch.device("cpu")), out=args.out,
         command="python benchmarks/bench_gram_paths.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
