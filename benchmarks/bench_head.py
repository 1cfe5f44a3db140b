"""Benchmark: the Fast BCNN head for inference, in one step against pooling then classifier.

Compares, interleaved on the same inputs (median after warm-up, no autograd), for
feature maps ``B x C x N`` (N locations) and an 8-class classifier:

- ``composition``: :func:`~bilinearpool.functional.fast_bilinear_pool` then
  :func:`~bilinearpool.functional.wide_linear` (the embedding written, then read);
- ``fused``: :func:`~bilinearpool.functional.fast_bilinear_linear`, what
  ``FastBCNN.forward`` calls (on CPU, up to 64 locations: row panels of the matrix, each
  multiplied with its rows of the weight, no embedding stored; elsewhere the composition);

each with the full output (``C^2`` features) and the packed triangle (``triu``). Each
candidate is checked against the composition first. ``fused_vs_composition``: the ratio of
the medians. Usage::

    python benchmarks/bench_head.py --device cpu --threads 1 --out benchmarks/results/cpu-2core-fastbcnn/head
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import emit  # noqa: E402
from bilinearpool.bench import environment, round_robin  # noqa: E402
from bilinearpool.functional import fast_bilinear_linear, fast_bilinear_pool, triu_size, wide_linear  # noqa: E402

# B x C x N: ResNet-50 / Inception-v3 maps at 224 px (7x7, 5x5) for batches 1-32,
# Inception-ResNet-v2 (1536 channels, 5x5), fewer channels, and 14x14 (not fused).
DEFAULT_SHAPES = [
    "1x2048x49", "2x2048x25", "2x2048x49", "8x2048x25", "8x2048x49", "32x2048x49",
    "2x1536x25", "8x512x49", "32x256x49", "8x2048x196",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxCxN (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.csv / results.json / results.md")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        b, c, n = (int(v) for v in shape.split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(b, c, n, 1, device=device, generator=g).relu_()
        for triu in (False, True):
            d = triu_size(c) if triu else c * c
            w = torch.randn(args.classes, d, device=device, generator=g) / d**0.5
            bias = torch.randn(args.classes, device=device, generator=g)
            fns = {
                "composition": lambda w=w, bias=bias, triu=triu: wide_linear(fast_bilinear_pool(x, triu=triu), w, bias),
                "fused": lambda w=w, bias=bias, triu=triu: fast_bilinear_linear(x, w, bias, triu=triu),
            }
            with torch.no_grad():
                ref = fns["composition"]()
                err = (fns["fused"]() - ref).abs().max().item()
                if err > 1e-4:
                    raise SystemExit(f"fused at {shape} (triu={triu}): largest difference {err:.3g} from the composition")
                times = round_robin(fns, warmup=args.warmup, repeats=args.repeats, device=device)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({
                "shape": shape, "triu": triu, "composition_ms": round(med["composition"] * 1e3, 2),
                "fused_ms": round(med["fused"] * 1e3, 2),
                "fused_vs_composition": round(med["fused"] / med["composition"], 2),
            })
    emit(
        f"Fast BCNN head for inference, {args.classes} classes, float32, {device} "
        f"(median of {args.repeats} interleaved rounds)",
        ["shape", "triu", "composition_ms", "fused_ms", "fused_vs_composition"],
        rows,
        env=environment(device),
        out=args.out,
        command="python benchmarks/bench_head.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
