"""Benchmark: the Fast BCNN head for inference, in one step against pooling then classifier.

Compares, interleaved on the same inputs (median after warm-up, no autograd), for
feature maps ``B x C x N`` (N locations) and an 8-class classifier:

- ``composition``: :func:`~bilinearpool.functional.fast_bilinear_pool` then
  :func:`~bilinearpool.functional.wide_linear` (the embedding written, then read);
- ``fused``: :func:`~bilinearpool.functional.fast_bilinear_linear`, what
  ``FastBCNN.forward`` calls (on CPU, up to 64 locations: row panels of the matrix, each
  multiplied with its rows of the weight, no embedding stored; on CUDA: ``G`` by one
  batched product, then one Triton kernel that reads ``G`` once for the signed square
  root, the squared norm and the classifier's products; elsewhere the composition);

each with the full output (``C^2`` features) and the packed triangle (``triu``). On CUDA
two candidate Triton kernels defined here (not in the library) are timed for the full
output too (``--no-candidates`` leaves them out):

- ``sqrt-linear``: ``G`` by one batched product, then one kernel that reads ``G`` once,
  as a flat ``B x C^2`` matrix, applies the signed square root, and accumulates both the
  squared norm and the products with the classifier's rows, reducing each chunk per
  class (the library's kernel goes row by row of each matrix, reads only the upper
  triangle for ``triu``, and adds the products up elementwise, reducing once); on an H200
  1.06x-1.15x the composition at a batch of 32 and 0.69x-0.75x at 8, against the
  composition of then (``results/gpu-h200-head/run1/head-candidates``);
- ``gram-linear``: no ``G`` in memory at all: each program builds the (64 x 64) tiles
  ``A_I A_J^T`` of the upper triangle with ``tl.dot`` (float32, ``ieee`` precision), for
  every sample, and multiplies them with the classifier's matching tiles on the spot
  (those of both ``W[:, I, J]`` and the mirror ``W[:, J, I]``); ``gram-linear-128`` the
  same with (128 x 128) tiles and 8 warps.

Each candidate is checked against the composition first. ``*_vs_composition``: ratios of
the medians.

With ``--train`` it times a training step of the head instead (forward and backward,
the map and the classifier's weight and bias needing gradients, gradients checked
against each other first): ``composition`` is the pooling with ``save_output=False``
(its backward rebuilds the matrices) then the classifier; ``fused`` is
:func:`~bilinearpool.functional.fast_bilinear_linear`, which there is the composition
with the pooling keeping its output (the classifier keeps it anyway). Usage::

    python benchmarks/bench_head.py --device cpu --threads 1 --out benchmarks/results/cpu-2core-fastbcnn/head
    python benchmarks/bench_head.py --device cpu --threads 1 --train --out benchmarks/results/cpu-2core-fastbcnn/head-train
    python benchmarks/bench_head.py --device cuda --shapes 32x2048x49 32x2048x25 32x1536x25 8x2048x49
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import check_candidate, emit  # noqa: E402
from bilinearpool.bench import environment, round_robin  # noqa: E402
from bilinearpool.functional import fast_bilinear_linear, fast_bilinear_pool, triu_size, wide_linear  # noqa: E402
from bilinearpool.functional._elementwise import next_pow2  # noqa: E402

SIGNED_SQRT_EPS, L2_EPS = 1e-5, 1e-12  # the library's defaults

try:  # the candidate kernels need Triton (they run on CUDA, and under its interpreter in the tests)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _f(y, eps, sqrt_eps):
        """The signed square root, ``y / (sqrt(|y| + eps) + sqrt(eps))``."""
        return y / (tl.sqrt(tl.abs(y) + eps) + sqrt_eps)

    @triton.jit
    def sqrt_linear_kernel(g_ptr, w_ptr, part_ptr, sq_ptr, eps, sqrt_eps, rows, d, stride_g, stride_w,
                           OUT: tl.constexpr, OUT_P2: tl.constexpr, BB: tl.constexpr, BLOCK_D: tl.constexpr,
                           STEPS: tl.constexpr):
        """Program (p, r): rows r*BB.. of G (B x C^2), columns p*STEPS*BLOCK_D..; writes its
        (BB, OUT) partial products f(G) W^T to part[p] and its partial squared norms to sq[p]."""
        pid = tl.program_id(0)
        r = tl.program_id(1) * BB + tl.arange(0, BB)
        outs = tl.arange(0, OUT_P2)
        acc = tl.zeros([BB, OUT_P2], dtype=tl.float32)
        sq = tl.zeros([BB], dtype=tl.float32)
        for step in range(STEPS):
            cols = (pid * STEPS + step) * BLOCK_D + tl.arange(0, BLOCK_D)
            cmask = cols < d
            y = tl.load(g_ptr + r[:, None].to(tl.int64) * stride_g + cols[None, :],
                        mask=(r[:, None] < rows) & cmask[None, :], other=0.0)
            y = _f(y, eps, sqrt_eps)
            sq += tl.sum(y * y, axis=1)
            for k in tl.static_range(OUT):
                w = tl.load(w_ptr + k * stride_w + cols, mask=cmask, other=0.0)
                acc += tl.where(outs[None, :] == k, tl.sum(y * w[None, :], axis=1)[:, None], 0.0)
        rmask = r < rows
        tl.store(part_ptr + (pid * rows + r[:, None]).to(tl.int64) * OUT + outs[None, :], acc,
                 mask=rmask[:, None] & (outs[None, :] < OUT))
        tl.store(sq_ptr + pid * rows + r, sq, mask=rmask)

    @triton.jit
    def gram_linear_kernel(a_ptr, w_ptr, part_ptr, sq_ptr, tile_i_ptr, tile_j_ptr, scale, eps, sqrt_eps,
                           batch, c, n, stride_ab, stride_ac, stride_an,
                           OUT: tl.constexpr, OUT_P2: tl.constexpr, BM: tl.constexpr, NP: tl.constexpr):
        """Program t: tile (I, J), I <= J, of G = scale A A^T for every sample. Writes the
        tile's products f(G_IJ) . (W[:, I, J] + W[:, J, I]^T) (W[:, I, I] alone on the
        diagonal) to part[t, b] and its squared entries (twice off the diagonal) to sq[t, b]."""
        t = tl.program_id(0)
        ti = tl.load(tile_i_ptr + t)
        tj = tl.load(tile_j_ptr + t)
        i = ti * BM + tl.arange(0, BM)
        j = tj * BM + tl.arange(0, BM)
        loc = tl.arange(0, NP)
        outs = tl.arange(0, OUT_P2)
        imask = i < c
        jmask = j < c
        tile_mask = imask[:, None] & jmask[None, :]
        off_diag = ti != tj
        twice = tl.where(off_diag, 2.0, 1.0)
        for b in range(batch):
            base = a_ptr + b * stride_ab  # B x C x N entries: int32 is enough
            ai = tl.load(base + i[:, None] * stride_ac + loc[None, :] * stride_an,
                         mask=imask[:, None] & (loc[None, :] < n), other=0.0)
            aj = tl.load(base + j[:, None] * stride_ac + loc[None, :] * stride_an,
                         mask=jmask[:, None] & (loc[None, :] < n), other=0.0)
            y = _f(tl.dot(ai, tl.trans(aj), input_precision="ieee") * scale, eps, sqrt_eps)
            y = tl.where(tile_mask, y, 0.0)
            tl.store(sq_ptr + t * batch + b, tl.sum(tl.sum(y * y, axis=1), axis=0) * twice)
            acc = tl.zeros([OUT_P2], dtype=tl.float32)
            for k in tl.static_range(OUT):
                wk = w_ptr + k * c * c
                w = tl.load(wk + i[:, None].to(tl.int64) * c + j[None, :], mask=tile_mask, other=0.0)
                w += tl.load(wk + j[None, :].to(tl.int64) * c + i[:, None], mask=tile_mask & off_diag, other=0.0)
                acc += tl.where(outs == k, tl.sum(tl.sum(y * w, axis=1), axis=0), 0.0)
            tl.store(part_ptr + (t * batch + b) * OUT + outs, acc, mask=outs < OUT)


def candidate(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """A zero-argument callable giving the logits of the (full-output) Fast BCNN head of the
    feature map ``x`` (B, C, H, W) with candidate kernel ``name``: float32, mean over
    locations, the library's default eps."""
    if triton is None:
        raise SystemExit("the candidate kernels need Triton")
    a = x.flatten(2)
    batch, c, n = a.shape
    out = weight.shape[0]
    scale = 1.0 / n
    if name == "sqrt-linear":
        d = c * c
        bb = min(32, next_pow2(batch))
        block_d, steps = 16384 // bb, 4
        programs = -(-d // (block_d * steps))
        grid = (programs, -(-batch // bb))

        def call() -> torch.Tensor:
            g = torch.bmm(a, a.transpose(1, 2)).mul_(scale).view(batch, d)
            parts = torch.empty(programs, batch, out, device=x.device)
            sq = torch.empty(programs, batch, device=x.device)
            sqrt_linear_kernel[grid](g, weight, parts, sq, SIGNED_SQRT_EPS, SIGNED_SQRT_EPS**0.5, batch, d,
                                     g.stride(0), weight.stride(0), OUT=out, OUT_P2=next_pow2(out), BB=bb,
                                     BLOCK_D=block_d, STEPS=steps, num_warps=8)
            return parts.sum(0) / sq.sum(0).sqrt().clamp_min(L2_EPS)[:, None] + bias

        return call
    if name.startswith("gram-linear"):
        bm, warps = (128, 8) if name == "gram-linear-128" else (64, 4)
        tiles = -(-c // bm)
        ti, tj = torch.triu_indices(tiles, tiles, device=x.device).to(torch.int32)
        np_ = max(16, next_pow2(n))

        def call() -> torch.Tensor:
            parts = torch.empty(ti.numel(), batch, out, device=x.device)
            sq = torch.empty(ti.numel(), batch, device=x.device)
            gram_linear_kernel[(ti.numel(),)](a, weight, parts, sq, ti, tj, scale, SIGNED_SQRT_EPS, SIGNED_SQRT_EPS**0.5,
                                              batch, c, n, a.stride(0), a.stride(1), a.stride(2), OUT=out,
                                              OUT_P2=next_pow2(out), BM=bm, NP=np_, num_warps=warps)
            return parts.sum(0) / sq.sum(0).sqrt().clamp_min(L2_EPS)[:, None] + bias

        return call
    raise ValueError(f"unknown candidate {name!r}")

# B x C x N: ResNet-50 / Inception-v3 maps at 224 px (7x7, 5x5) for batches 1-32,
# Inception-ResNet-v2 (1536 channels, 5x5), fewer channels, and 14x14 (not fused).
CANDIDATES = ("sqrt-linear", "gram-linear", "gram-linear-128")
DEFAULT_SHAPES = [
    "1x2048x49", "2x2048x25", "2x2048x49", "8x2048x25", "8x2048x49", "32x2048x49",
    "2x1536x25", "8x512x49", "32x256x49", "8x2048x196",
]


def _train_row(shape: str, triu: bool, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, args, device) -> dict:
    """One training step of the head (forward and backward), composition against fused."""
    w, bias = w.requires_grad_(), bias.requires_grad_()
    dz = torch.randn(x.shape[0], w.shape[0], device=device, generator=torch.Generator(device=device).manual_seed(1))

    def step(fused: bool):
        def call() -> list[torch.Tensor]:
            leaf = x.detach().requires_grad_()
            if fused:
                out = fast_bilinear_linear(leaf, w, bias, triu=triu)
            else:
                out = wide_linear(fast_bilinear_pool(leaf, triu=triu, save_output=False), w, bias)
            return list(torch.autograd.grad(out, (leaf, w, bias), dz))

        return call

    fns = {"composition": step(False), "fused": step(True)}
    for got, want in zip(fns["fused"](), fns["composition"]()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    times = round_robin(fns, warmup=args.warmup, repeats=args.repeats, device=device)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": shape,
        "triu": triu,
        "composition_ms": round(med["composition"] * 1e3, 2),
        "fused_ms": round(med["fused"] * 1e3, 2),
        "fused_vs_composition": round(med["fused"] / med["composition"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxCxN (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=8, help="classifier outputs (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds, median reported (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.csv / results.json / results.md")
    parser.add_argument("--train", action="store_true", help="time a training step (forward and backward) instead")
    parser.add_argument(
        "--candidates", action=argparse.BooleanOptionalAction, default=None,
        help="also time the candidate Triton kernels (default: on CUDA only; elsewhere they need TRITON_INTERPRET=1)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    candidates = CANDIDATES if (device.type == "cuda" if args.candidates is None else args.candidates) else ()
    if args.train:
        candidates = ()
    rows = []
    for shape in args.shapes:
        b, c, n = (int(v) for v in shape.split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(b, c, n, 1, device=device, generator=g).relu_()
        for triu in (False, True):
            d = triu_size(c) if triu else c * c
            w = torch.randn(args.classes, d, device=device, generator=g) / d**0.5
            bias = torch.randn(args.classes, device=device, generator=g)
            if args.train:
                rows.append(_train_row(shape, triu, x, w, bias, args, device))
                continue
            fns = {
                "composition": lambda w=w, bias=bias, triu=triu: wide_linear(fast_bilinear_pool(x, triu=triu), w, bias),
                "fused": lambda w=w, bias=bias, triu=triu: fast_bilinear_linear(x, w, bias, triu=triu),
            }
            if not triu:  # the candidates compute the full output only
                fns.update({name: candidate(name, x, w, bias) for name in candidates})
            failed: dict[str, str] = {}
            with torch.no_grad():
                ref = fns["composition"]()
                for name in list(fns):
                    why = check_candidate(
                        name, fns[name], ref, tol=1e-4, where=f"{shape} (triu={triu})", candidate=name in CANDIDATES
                    )
                    if why:
                        failed[name] = why
                        del fns[name]
                times = round_robin(fns, warmup=args.warmup, repeats=args.repeats, device=device)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"shape": shape, "triu": triu, "composition_ms": round(med["composition"] * 1e3, 2)}
            for name in ("fused", *candidates):
                row[f"{name}_ms"] = round(med[name] * 1e3, 2) if name in med else failed.get(name, "")
                row[f"{name}_vs_composition"] = round(med[name] / med["composition"], 2) if name in med else ""
            rows.append(row)
    header = ["shape", "triu", "composition_ms", "fused_ms", "fused_vs_composition"]
    header += [f"{name}_{what}" for name in candidates for what in ("ms", "vs_composition")]
    emit(
        f"Fast BCNN head for {'a training step' if args.train else 'inference'}, {args.classes} classes, float32, {device} "
        f"(median of {args.repeats} interleaved rounds)",
        header,
        rows,
        env=environment(device),
        out=args.out,
        command="python benchmarks/bench_head.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
