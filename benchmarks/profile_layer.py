"""Host or device bound? Per fwd+bwd of a pooling: synchronised time, host time and kernel count.

On a GPU a small pooling step can cost more host time (Python, autograd, kernel launches)
than device time; then fewer launches, not faster kernels, make it faster. For each
shape and case (the naive chain, the bare product, the fused poolings) this prints:

* ``synced_ms``: median time of one fwd+bwd with a device synchronisation after it;
* ``host_ms``: wall time per call of ``--calls`` calls issued back to back, synchronised
  once at the end: the host's cost per call when the device keeps up;
* ``kernels``: device kernels launched per fwd+bwd (torch.profiler, CUDA only).

When ``host_ms`` is close to ``synced_ms``, the step is host bound::

    python benchmarks/profile_layer.py --device cuda            # gpu_check.sh runs this
    python benchmarks/profile_layer.py --device cpu --shapes 2x64x7x7 --calls 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bilinearpool import BilinearPool, FastBilinearPool  # noqa: E402
from _results import report  # noqa: E402
from bilinearpool.bench import matmul_floor, naive_bilinear_chain, synchronize  # noqa: E402

CASES = {
    "naive": (naive_bilinear_chain, 1),
    "matmul-floor": (matmul_floor, 1),
    "fast-bcnn": (FastBilinearPool(), 1),
    "fast-bcnn-triu": (FastBilinearPool(triu=True), 1),
    "bcnn-2stream": (BilinearPool(normalize=True), 2),
}


def _step(fn, inputs: list[torch.Tensor]):
    def call() -> None:
        for x in inputs:  # as a training step after zero_grad(set_to_none=True): no accumulation
            x.grad = None
        out = fn(*inputs)
        torch.autograd.backward(out, torch.ones_like(out))

    return call


def _host_profile(shape: str, device: torch.device, calls: int) -> str:
    import cProfile
    import io
    import pstats

    b, c, h, w = (int(v) for v in shape.split("x"))
    call = _step(CASES["fast-bcnn"][0], [torch.randn(b, c, h, w, device=device).relu_().requires_grad_()])
    with torch.autograd.set_multithreading_enabled(False):  # the Python backward in this thread
        for _ in range(3):
            call()
        synchronize(device)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(calls):
            call()
        synchronize(device)
        profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    return f"fast-bcnn at {shape}, {calls} fwd+bwd calls, cProfile by own time:\n\n```\n{text.getvalue().strip()}\n```"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["8x2048x7x7", "8x1536x5x5", "16x512x28x28", "32x256x14x14"],
                        help="input shapes BxCxHxW (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=50, help="calls per measurement")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument(
        "--cprofile", metavar="BxCxHxW", default=None,
        help="also profile the host side of fast-bcnn fwd+bwd at this shape with cProfile "
        "(backward in the calling thread) and list the 25 functions of most own time",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    lines = [
        f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}; "
        f"float32; {args.calls} calls per measurement; fwd+bwd with an all-ones incoming gradient",
        "",
        "| shape | case | synced_ms | host_ms | host / synced | kernels |",
        "|---|---|---|---|---|---|",
    ]
    for shape in args.shapes:
        b, c, h, w = (int(v) for v in shape.split("x"))
        for name, (fn, streams) in CASES.items():
            inputs = [torch.randn(b, c, h, w, device=device).relu_().requires_grad_() for _ in range(streams)]
            call = _step(fn, inputs)
            for _ in range(3):
                call()
            synchronize(device)
            synced = []
            for _ in range(args.calls):
                start = time.perf_counter()
                call()
                synchronize(device)
                synced.append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            host = (time.perf_counter() - start) / args.calls
            synchronize(device)
            kernels = "-"
            if device.type == "cuda":
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        call()
                    synchronize(device)
                count = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
                kernels = f"{count / 5:.0f}"
            s = statistics.median(synced)
            lines.append(f"| {shape} | {name} | {s * 1e3:.3f} | {host * 1e3:.3f} | {host / s:.2f} | {kernels} |")
            print(lines[-1], flush=True)
    if args.cprofile:
        lines += ["", _host_profile(args.cprofile, device, args.calls)]
    return report(lines, args.out, command=f"python benchmarks/profile_layer.py "
                  + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
