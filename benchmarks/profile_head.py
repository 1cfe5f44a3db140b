"""Where a Fast BCNN head's inference time goes: backbone, pooling and classifier, timed apart.

The model benchmark gives whole-model throughput; this splits one inference batch of
``FastBCNN(backbone)`` into its three parts, and the head as the model runs it (each timed alone on the same inputs,
interleaved in balanced orders, median of the timed rounds) and lists the kernels or ops
of the head under ``torch.profiler``. Used to decide what to speed up next, on CPU or GPU::

    python benchmarks/profile_head.py --device cuda --batch-size 32          # H100: see gpu_check.sh
    python benchmarks/profile_head.py --device cpu --batch-size 2 --threads 1

Prints a Markdown table (ms per batch, and each part's share of the full model's time)
and the profiler's table; ``--out FILE`` also writes them to FILE.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bilinearpool import FastBCNN, GAPClassifier  # noqa: E402
from bilinearpool.functional import fast_bilinear_linear  # noqa: E402
from _results import report  # noqa: E402
from bilinearpool.bench import round_robin  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50", help="backbone name, random weights (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=224, help="input side in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--triu", action="store_true", help="FastBCNN(triu=True)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds, median reported (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    fast = FastBCNN(args.backbone, num_classes=8, triu=args.triu).to(device).eval()
    plain = GAPClassifier(args.backbone, num_classes=8).to(device).eval()
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device)
    with torch.no_grad():
        features = fast.forward_features(x)
        embedding = fast.pool(features)

    def run(fn):
        def call() -> None:
            with torch.no_grad():
                fn()
        return call

    parts = {
        "plain model": run(lambda: plain(x)),
        "fast-bcnn model": run(lambda: fast(x)),
        "backbone": run(lambda: fast.forward_features(x)),
        "pooling": run(lambda: fast.pool(features)),
        "classifier": run(lambda: fast.classifier(embedding)),
    }
    # The classifier (WideLinear: a Triton kernel on CUDA for wide inputs) against the
    # same product by F.linear (cuBLAS), the nn.Linear of earlier versions.
    linear = fast.classifier
    parts["classifier as F.linear"] = run(lambda: torch.nn.functional.linear(embedding, linear.weight, linear.bias))
    # The head as FastBCNN.forward runs it: one call that, for inference on CPU, never
    # stores the embedding (on other devices it is the pooling, then the classifier).
    parts["head (pooling + classifier), as the model runs it"] = run(
        lambda: fast_bilinear_linear(features, linear.weight, linear.bias, triu=args.triu)
    )
    times = round_robin(parts, warmup=args.warmup, repeats=args.repeats, device=device)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    total = med["fast-bcnn model"]
    lines = [
        f"{args.backbone}, {args.resolution}px, batch {args.batch_size}, {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}, median of {args.repeats} interleaved rounds; triu={args.triu}; "
        f"embedding {tuple(embedding.shape)}",
        "",
        "| part | ms per batch | share of the Fast BCNN model |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} | {v / total:.2f} |" for k, v in med.items()]
    lines += ["", f"fast-bcnn / plain throughput ratio: {med['plain model'] / total:.2f}", ""]

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            parts["head (pooling + classifier), as the model runs it"]()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines += ["Head as the model runs it, 5 batches, torch.profiler:", "", "```",
              prof.key_averages().table(sort_by=key, row_limit=20), "```"]
    return report(lines, args.out, command=f"python benchmarks/profile_head.py "
                  + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
