"""Output shared by the stand-alone benchmark scripts: a Markdown table, and CSV/JSON/MD files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence


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


def report(lines: Sequence[str], out: Path | None) -> int:
    """Print ``lines`` as one text and, with ``out``, write it to that file; returns 0 (an exit status)."""
    text = "\n".join(lines)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0
