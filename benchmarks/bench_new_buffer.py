"""Benchmark: the first write of a new large CPU buffer, with and without huge pages.

The fused pooling's output on CPU is large and new on every call (``B C^2`` floats:
128 MiB at 8x2048x7x7). glibc serves allocations of 32 MiB and more with fresh pages,
which Linux zeroes at their first write, one 4 KiB page fault at a time. The op asks
for transparent huge pages on such a buffer before writing it
(``bilinearpool.functional._memory.huge_pages_hint``, ``madvise(MADV_HUGEPAGE)``); this
script measures what that buys, interleaved in the same rounds (median after warm-up):

- ``fresh``: a new buffer (``torch.empty``) filled once, as the op's output is written;
- ``fresh-hinted``: the same with the library's hint given first;
- ``refill``: an existing buffer filled again (no page faults: the floor).

The hint is taken only where the kernel's THP mode is ``madvise`` or ``always`` (recorded
in the results); ``PyTorch`` itself hints every large allocation when
``THP_MEM_ALLOC_ENABLE=1`` is set, which would make ``fresh`` hinted too: the script
refuses to run with it. Usage::

    python benchmarks/bench_new_buffer.py --threads 1 --out benchmarks/results/cpu-2core-new-buffer
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import emit  # noqa: E402
from bilinearpool.bench import environment, round_robin  # noqa: E402
from bilinearpool.functional._memory import huge_pages_hint  # noqa: E402


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode (the bracketed word), or ``unknown``."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1:text.find("]")] if "[" in text else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, nargs="+", default=[32, 128],
                        help="buffer sizes in MiB (default: 32 128; 128 MiB is the op's output at 8x2048x7x7)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds, median reported (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="also write results.{md,csv,json} to this folder")
    args = parser.parse_args(argv)
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        parser.error("THP_MEM_ALLOC_ENABLE=1 makes PyTorch hint every large buffer, 'fresh' too: unset it")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    mode = _thp_mode()
    rows = []
    for mib in args.mib:
        n = mib * 2**20 // 4
        kept = torch.empty(n)
        kept.fill_(0.0)
        hinted = []

        def fresh() -> None:
            torch.empty(n).fill_(1.0)

        def fresh_hinted() -> None:
            buf = torch.empty(n)
            hinted.append(huge_pages_hint(buf))
            buf.fill_(1.0)

        times = round_robin({"fresh": fresh, "fresh-hinted": fresh_hinted, "refill": lambda: kept.fill_(1.0)},
                            warmup=args.warmup, repeats=args.repeats, device=torch.device("cpu"))
        base = statistics.median(times["fresh"])
        for name, t in times.items():
            med = statistics.median(t)
            rows.append({"MiB": mib, "case": name, "ms": round(med * 1e3, 2), "vs_fresh": round(med / base, 2),
                         "hint_taken": all(hinted) if name == "fresh-hinted" else ""})
    env = {**environment(torch.device("cpu")), "thp_mode": mode}
    emit(f"First write of a new float32 buffer on CPU (THP mode: {mode}; median of {args.repeats} interleaved rounds)",
         ["MiB", "case", "ms", "vs_fresh", "hint_taken"], rows, env=env, out=args.out,
         command="python benchmarks/bench_new_buffer.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
