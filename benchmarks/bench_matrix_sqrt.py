"""Benchmark: matrix square root normalisation, forward + backward, side by side in one run.

Compares, on the same inputs, device and thread count:

- ``ns-auto``: ``matrix_sqrt`` defaults (Newton-Schulz, 5 iterations; "auto" evaluation,
  which is spectral on CPU and iterative on GPU);
- ``ns-iterative`` and ``ns-spectral``: the two Newton-Schulz evaluations, forced;
- ``eig``: ``matrix_sqrt(method="eig")``;
- ``isqrt-ref``: a plain reference of the public iSQRT-COV algorithm (Li et al., CVPR
  2018), written out below from the paper's equations, with its per-iteration backward
  that keeps every iterate :math:`Y_k, Z_k` for the backward pass;
- ``eig-autograd``: the eigendecomposition square root as usually written,
  ``U diag(sqrt(max(lam, 0))) U^T`` from ``torch.linalg.eigh``, differentiated by autograd
  (its gradient is not finite when eigenvalues repeat, e.g. the zeros of a rank-deficient
  matrix: the ``grad_finite`` column says so; the time is still what it costs).

The input is the covariance (``covariance_pool``) of a ReLU feature map of ``HxW``
locations, so for C above HW-1 it is rank-deficient, as in practice. Reported: median
forward+backward time after warm-up (methods interleaved, one run of each per round, so
that load from other processes hits them alike, in balanced orders,
``bilinearpool.bench.balanced_orders``, so that each runs right after each other one
equally often), the ratio to ``isqrt-ref`` and to ``eig``, the bytes
saved for backward (``saved_tensors_hooks``, exact), and whether the gradient is finite.

Usage::

    python benchmarks/bench_matrix_sqrt.py                   # B=32, C in {64, 256, 512}, 14x14
    python benchmarks/bench_matrix_sqrt.py --channels 256 --repeats 7 --out results/sqrtm-cpu
    python benchmarks/bench_matrix_sqrt.py --device cuda     # synchronised timings on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import emit  # noqa: E402
from bilinearpool.bench import SavedTensorCounter, environment, round_robin  # noqa: E402
from bilinearpool.functional.covariance import covariance_pool  # noqa: E402
from bilinearpool.functional.sqrtm import matrix_sqrt  # noqa: E402


class ISqrtCovReference(torch.autograd.Function):
    """iSQRT-COV as published: pre-normalise by the trace, Newton-Schulz, post-compensate.

    Forward (paper, Sec. 3): :math:`Y_0 = A / \\operatorname{tr}A`, :math:`Z_0 = I`,
    :math:`Y_k = \\frac12 Y_{k-1}(3I - Z_{k-1}Y_{k-1})`, :math:`Z_k = \\frac12(3I - Z_{k-1}Y_{k-1})Z_{k-1}`,
    :math:`C = \\sqrt{\\operatorname{tr}A}\\, Y_K`. Every iterate is kept for backward.
    Backward (paper, eqs. for :math:`\\partial l/\\partial Y_{k-1}`, :math:`\\partial l/\\partial Z_{k-1}`):

    .. math::
        \\frac{\\partial l}{\\partial Y_{k-1}} = \\tfrac12\\Big(\\frac{\\partial l}{\\partial Y_k}(3I - Y_{k-1}Z_{k-1})
            - Z_{k-1}\\frac{\\partial l}{\\partial Z_k}Z_{k-1} - Z_{k-1}Y_{k-1}\\frac{\\partial l}{\\partial Y_k}\\Big)

        \\frac{\\partial l}{\\partial Z_{k-1}} = \\tfrac12\\Big((3I - Y_{k-1}Z_{k-1})\\frac{\\partial l}{\\partial Z_k}
            - Y_{k-1}\\frac{\\partial l}{\\partial Y_k}Y_{k-1} - \\frac{\\partial l}{\\partial Z_k}Z_{k-1}Y_{k-1}\\Big)

    then the trace terms of pre-normalisation and post-compensation.
    """

    @staticmethod
    def forward(ctx, a: Tensor, num_iters: int) -> Tensor:  # type: ignore[override]
        b, c, _ = a.shape
        eye = torch.eye(c, dtype=a.dtype, device=a.device).expand(b, c, c)
        tr = a.diagonal(dim1=1, dim2=2).sum(-1).view(b, 1, 1)
        ys = [a / tr]
        zs = [eye]
        for _ in range(num_iters):
            t = 0.5 * (3.0 * eye - zs[-1].bmm(ys[-1]))
            ys.append(ys[-1].bmm(t))
            zs.append(t.bmm(zs[-1]))
        out = ys[-1] * tr.sqrt()
        ctx.save_for_backward(a, tr, torch.stack(ys, 1), torch.stack(zs, 1))
        ctx.num_iters = num_iters
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, tr, ys, zs = ctx.saved_tensors
        b, c, _ = a.shape
        eye = torch.eye(c, dtype=a.dtype, device=a.device).expand(b, c, c)
        d_y = grad * tr.sqrt()
        d_z = torch.zeros_like(d_y)
        for k in range(ctx.num_iters, 0, -1):
            y, z = ys[:, k - 1], zs[:, k - 1]
            yz, zy = y.bmm(z), z.bmm(y)
            d_y_new = 0.5 * (d_y.bmm(3.0 * eye - yz) - z.bmm(d_z).bmm(z) - zy.bmm(d_y))
            d_z_new = 0.5 * ((3.0 * eye - yz).bmm(d_z) - y.bmm(d_y).bmm(y) - d_z.bmm(zy))
            d_y, d_z = d_y_new, d_z_new
        # A -> Y_0 = A / tr(A), and the post-compensation sqrt(tr(A)).
        d_a = d_y / tr - eye * ((d_y * a).sum((1, 2)) / tr.view(b) ** 2).view(b, 1, 1)
        d_a = d_a + eye * ((grad * ys[:, -1]).sum((1, 2)) / (2 * tr.view(b).sqrt())).view(b, 1, 1)
        return d_a, None


def eig_autograd_sqrt(a: Tensor) -> Tensor:
    """``U diag(sqrt(max(lam, 0))) U^T`` of ``sym(a)``, differentiated by autograd through ``eigh``."""
    lam, u = torch.linalg.eigh(0.5 * (a + a.transpose(1, 2)))
    return (u * lam.clamp_min(0).sqrt().unsqueeze(1)) @ u.transpose(1, 2)


def _methods(num_iters: int) -> dict[str, Callable[[Tensor], Tensor]]:
    return {
        "ns-auto": lambda a: matrix_sqrt(a, num_iters=num_iters),
        "ns-iterative": lambda a: matrix_sqrt(a, num_iters=num_iters, impl="iterative"),
        "ns-spectral": lambda a: matrix_sqrt(a, num_iters=num_iters, impl="spectral"),
        "eig": lambda a: matrix_sqrt(a, method="eig"),
        "isqrt-ref": lambda a: ISqrtCovReference.apply(a, num_iters),
        "eig-autograd": eig_autograd_sqrt,
    }


def _saved_and_finite(fn: Callable[[Tensor], Tensor], a: Tensor, g: Tensor) -> tuple[float, bool]:
    """MiB autograd keeps for backward (distinct storages, via saved_tensors_hooks:
    :class:`bilinearpool.bench.SavedTensorCounter`) and gradient finiteness."""
    leaf = a.detach().clone().requires_grad_()
    with SavedTensorCounter() as saved:
        out = fn(leaf)
    out.backward(g)
    return saved.nbytes / 2**20, bool(torch.isfinite(out).all() and torch.isfinite(leaf.grad).all())


def _step(fn: Callable[[Tensor], Tensor], a: Tensor, g: Tensor) -> Callable[[], None]:
    """One forward + backward of ``fn`` on a leaf made once (its gradient reset each call)."""
    leaf = a.detach().clone().requires_grad_()

    def step() -> None:
        leaf.grad = None
        fn(leaf).backward(g)

    return step


def _measure_all(
    methods: dict[str, Callable[[Tensor], Tensor]], a: Tensor, g: Tensor, warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Time all methods interleaved (``bilinearpool.bench.round_robin``: one run of each per
    round, in balanced orders), so load changes and each other's after-effects hit all alike."""
    times = round_robin({name: _step(fn, a, g) for name, fn in methods.items()},
                        warmup=warmup, repeats=repeats, device=a.device)
    out = {}
    for name, fn in methods.items():
        saved, finite = _saved_and_finite(fn, a, g)
        out[name] = {"saved_mb": saved, "finite": finite, "median_s": statistics.median(times[name])}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="batch size B (default 32)")
    parser.add_argument("--channels", type=int, nargs="+", default=[256, 64, 512], help="channel counts C")
    parser.add_argument("--size", type=int, default=14, help="feature map side: HxW = size x size (default 14)")
    parser.add_argument("--iters", type=int, default=5, help="Newton-Schulz iterations for all NS methods")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per method")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--methods", nargs="+", default=list(_methods(1)), help="subset of methods to run")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.csv / results.json / results.md")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = {  # versions, commit, switches (THP), CPU or GPU name, threads, load: as bilinearpool-bench
        **environment(device),
        "batch": args.batch,
        "hw": args.size * args.size,
        "iters": args.iters,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    methods = {k: v for k, v in _methods(args.iters).items() if k in args.methods}
    rows = []
    gen = torch.Generator().manual_seed(0)
    for c in args.channels:
        x = torch.relu(torch.randn(args.batch, c, args.size, args.size, generator=gen)).to(device)
        a = covariance_pool(x)
        g = torch.randn(args.batch, c, c, generator=gen).to(device)
        print(f"C={c}: timing {', '.join(methods)} ...", file=sys.stderr, flush=True)
        results = _measure_all(methods, a, g, args.warmup, args.repeats)
        for name, r in results.items():
            rows.append(
                {
                    "C": c,
                    "method": name,
                    "median_ms": round(r["median_s"] * 1e3, 2),
                    "vs_isqrt_ref": round(r["median_s"] / results["isqrt-ref"]["median_s"], 3) if "isqrt-ref" in results else None,
                    "vs_eig": round(r["median_s"] / results["eig"]["median_s"], 3) if "eig" in results else None,
                    "vs_eig_autograd": (
                        round(r["median_s"] / results["eig-autograd"]["median_s"], 3) if "eig-autograd" in results else None
                    ),
                    "saved_MiB": round(r["saved_mb"], 2),
                    "grad_finite": r["finite"],
                }
            )

    header = ["C", "method", "median_ms", "vs_isqrt_ref", "vs_eig", "vs_eig_autograd", "saved_MiB", "grad_finite"]
    title = (
        f"Matrix square root, forward+backward, B={args.batch}, HW={args.size}x{args.size}, "
        f"{args.iters} NS iterations; torch {env['torch']}, {device.type} ({env['device']}), "
        f"{env['threads']} threads; median of {args.repeats} after {args.warmup} warm-up runs."
    )
    cmd = "python benchmarks/bench_matrix_sqrt.py " + " ".join(sys.argv[1:] if argv is None else argv)
    emit(title, header, rows, env=env, out=args.out, command=cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
