"""The documented ``breakhis-repro`` command sequences parse and hang together.

Each example sequence (the README's, the reference page's, the CLI's docstring) must
be accepted by the parser, and every run folder that a later command reads (``table``'s
run folders, ``--checkpoint`` files) must be written by an earlier command's ``--out``.
Nothing is run: this is a consistency check of the text.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from breakhis import cli
from breakhis.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def _commands(text: str) -> list[list[str]]:
    """``breakhis-repro`` command lines of ``text`` (continuations joined), as argv."""
    joined = re.sub(r"\\\s*\n", " ", text)
    commands = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ").strip()
        if line.startswith("breakhis-repro "):
            commands.append(shlex.split(line, comments=True)[1:])
    return commands


def _readme_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Reproducing the paper: `breakhis-repro`", 1)[1]
    return section.split("```bash", 1)[1].split("```", 1)[0]


def _rst_blocks() -> str:
    return (REPO / "docs" / "reference" / "breakhis.rst").read_text()


SOURCES = {
    "README.md": _readme_block,
    "docs/reference/breakhis.rst": _rst_blocks,
    "breakhis/cli.py docstring": lambda: cli.__doc__ or "",
}


def _check_sequence(commands: list[list[str]]) -> list[str]:
    """Problems of a command sequence: folders read before any command wrote them, and
    option pairs the commands refuse."""
    parser = build_parser()
    written: set[Path] = set()
    problems = []
    for argv in commands:
        args = parser.parse_args(argv)
        if args.command in ("train", "cv", "index"):
            try:  # option pairs the commands refuse before they start
                cli._check_combinations(args)
            except ValueError as err:
                problems.append(f"`{' '.join(argv)}` is refused: {err}")
        if args.command == "table":
            needed = [Path(d) for d in args.run_dirs]
        elif getattr(args, "checkpoint", None):
            needed = [Path(args.checkpoint).parent]
        else:
            needed = []
        for folder in needed:
            if folder not in written:
                problems.append(f"`{' '.join(argv)}` reads {folder}, which no earlier "
                                f"command writes with --out (written: {sorted(map(str, written))})")
        if args.command in ("train", "cv") and args.out:
            written.add(Path(args.out))
    return problems


class TestDocumentedCommands:
    @pytest.mark.parametrize("source", list(SOURCES))
    def test_sequence_is_consistent(self, source: str) -> None:
        commands = _commands(SOURCES[source]())
        assert any(argv[0] == "table" for argv in commands), source
        assert _check_sequence(commands) == []

    def test_check_catches_a_cv_without_out(self) -> None:
        commands = _commands("breakhis-repro cv --data-root d --task MIFC\n"
                             "breakhis-repro table runs/mifc-cv\n")
        problems = _check_sequence(commands)
        assert len(problems) == 1 and "runs/mifc-cv" in problems[0]

    def test_check_catches_a_refused_option_pair(self) -> None:
        commands = _commands("breakhis-repro train --data-root d --no-pretrained \\\n"
                             "    --weights w.pt --out runs/a\n")
        problems = _check_sequence(commands)
        assert len(problems) == 1 and "is refused: --weights 'w.pt'" in problems[0]


class TestWithoutTheReferenceExtra:
    """breakhis comes with every install; without its extra it failed on `from PIL import
    Image` (a traceback) instead of naming the extra to install."""

    def test_cli_names_the_extra_in_one_line(self, monkeypatch, capsys) -> None:
        import sys

        monkeypatch.setitem(sys.modules, "captum", None)
        monkeypatch.setitem(sys.modules, "sklearn", None)
        assert cli.main(["index", "--data-root", "data"]) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [
            "breakhis-repro: error: it needs scikit-learn, captum, which are not installed: "
            "pip install 'bilinearpool[reference]' (from a clone: pip install '.[reference]')"]
        # the help can be read without them (it exited 1 with the line above)
        with pytest.raises(SystemExit) as info:
            cli.main(["index", "--help"])
        assert info.value.code == 0 and "usage: breakhis-repro index" in capsys.readouterr().out

    def test_import_is_light_and_names_the_extra_on_use(self) -> None:
        import subprocess
        import sys

        code = (
            "import sys; sys.modules['PIL'] = None; import breakhis\n"
            "assert 'sklearn' not in sys.modules\n"
            "try:\n"
            "    breakhis.index_breakhis\n"
            "except ImportError as err:\n"
            "    print(err)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout
        assert out.strip() == ("breakhis.index_breakhis needs pillow, which is not installed: "
                               "pip install 'bilinearpool[reference]' (from a clone: "
                               "pip install '.[reference]')")
        # the others missing are named too: installing pillow alone got the next error
        code = code.replace("sys.modules['PIL'] = None;", "sys.modules['PIL'] = sys.modules['captum'] = None;")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout
        assert out.strip() == ("breakhis.index_breakhis needs pillow, which is not installed (of the "
                               "reference extra, captum too): pip install 'bilinearpool[reference]' "
                               "(from a clone: pip install '.[reference]')")
