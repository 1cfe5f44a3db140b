"""Output shared by the stand-alone benchmark scripts: a Markdown table, and CSV/JSON/MD files."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


def emit(
    title: str,
    header: Sequence[str],
    rows: Sequence[dict[str, Any]],
    *,
    env: dict[str, Any],
    out: Path | None,
    command: str,
) -> str:
    """Print ``title`` and the rows as a Markdown table; with ``out``, also write
    ``results.csv``, ``results.json`` (rows and environment) and ``results.md`` (the
    command that made them, then the table) there. Returns the table."""
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(header))
            writer.writeheader()
            writer.writerows(rows)
        (out / "results.json").write_text(json.dumps({"env": env, "rows": list(rows)}, indent=2))
        (out / "results.md").write_text(f"Command: `{command}`\n\n{table}\n")
        print(f"\nResults written to {out}/results.csv, results.json and results.md")
    return table


def report(lines: Sequence[str], out: Path | None, *, command: str) -> int:
    """Print ``lines`` as one text and, with ``out``, write it to that file after the
    ``command`` that made it (as :func:`emit` does); returns 0 (an exit status)."""
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"Command: `{command}`\n\n{text}\n")
    return 0


def check_candidate(
    name: str, fn: Callable[[], torch.Tensor], ref: torch.Tensor, *, tol: float, where: str, candidate: bool
) -> str:
    """Compare ``fn()`` with ``ref`` (largest absolute difference at most ``tol``).

    The library's own paths must match: the run stops otherwise. A candidate kernel
    defined in a benchmark that fails to compile or run, or gives other values, returns
    a short reason for its table cell (the details go to stderr), so that the caller can
    leave it out of the timing: one broken candidate must not cost a GPU session the other
    results. Returns ``""`` when ``fn`` matches.
    """
    try:
        err = (fn().to(ref.dtype) - ref).abs().max().item()
    except Exception as exc:  # a candidate's compile or launch error: reported, not hidden
        if not candidate:
            raise
        print(f"{name} at {where}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return f"failed ({type(exc).__name__})"
    if err <= tol:
        return ""
    message = f"{name} at {where}: largest difference {err:.3g} from the reference"
    if not candidate:
        raise SystemExit(message)
    print(message, file=sys.stderr)
    return f"wrong (max diff {err:.2g})"
