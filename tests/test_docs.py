"""Checks of the Sphinx sources: the API page lists every public name, and the layer snippets run."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

import bilinearpool
import bilinearpool.functional

DOCS = Path(__file__).resolve().parents[1] / "docs"


_DIRECTIVE = re.compile(r"^\.\. (autoclass|autofunction|automodule):: (\S+)[ \t]*$")
_OPTION = re.compile(r"^[ \t]+:([\w-]+):(.*)$")


def _names(value: str) -> set[str]:
    return {n.strip() for n in value.split(",") if n.strip()}


def autodoc_names(rst: str) -> set[str]:
    """Dotted names the autodoc directives of ``rst`` document.

    ``autoclass`` and ``autofunction`` document their target; ``automodule`` with
    ``:members:`` documents the names listed there or, when none are, the module's
    ``__all__``, less any ``:exclude-members:``. An ``automodule`` without ``:members:``
    (or with ``:no-members:``) documents none of the module's names.
    """
    documented: set[str] = set()
    lines = rst.splitlines()
    for i, line in enumerate(lines):
        match = _DIRECTIVE.match(line)
        if match is None:
            continue
        kind, target = match.groups()
        if kind != "automodule":
            documented.add(target)
            continue
        options: dict[str, str] = {}
        for opt in lines[i + 1 :]:
            opt_match = _OPTION.match(opt)
            if opt_match is None:
                break
            options[opt_match.group(1)] = opt_match.group(2).strip()
        if "members" not in options or "no-members" in options:
            continue
        members = _names(options["members"]) or set(importlib.import_module(target).__all__)
        members -= _names(options.get("exclude-members", ""))
        documented |= {f"{target}.{n}" for n in members}
    return documented


def _public_names() -> set[str]:
    skip = {"__version__", "functional"}  # the version string; the subpackage has its own section
    wanted = {f"bilinearpool.{n}" for n in bilinearpool.__all__ if n not in skip}
    wanted |= {f"bilinearpool.functional.{n}" for n in bilinearpool.functional.__all__}
    return wanted


def test_api_page_lists_every_public_name() -> None:
    documented = autodoc_names((DOCS / "api.rst").read_text())
    missing = sorted(_public_names() - documented)
    assert missing == [], f"public names missing from docs/api.rst's autodoc directives: {missing}"


def test_autodoc_names_reads_the_directives() -> None:
    rst = """
.. autoclass:: bilinearpool.BilinearPool
.. autofunction:: bilinearpool.functional.triu_size

.. automodule:: bilinearpool.functional
   :no-members:

.. automodule:: bilinearpool.norm
   :members:
   :exclude-members: L2Normalize

.. automodule:: bilinearpool.pooling
   :members: FastBilinearPool

.. automodule:: bilinearpool.attention
"""
    assert autodoc_names(rst) == {
        "bilinearpool.BilinearPool",
        "bilinearpool.functional.triu_size",
        "bilinearpool.norm.SignedSqrt",
        "bilinearpool.pooling.FastBilinearPool",
    }


def test_api_page_check_catches_a_missing_name() -> None:
    api = (DOCS / "api.rst").read_text()
    line = ".. autofunction:: bilinearpool.functional.triu_size\n"
    assert line in api
    missing = _public_names() - autodoc_names(api.replace(line, ""))
    assert "bilinearpool.functional.triu_size" in missing


def test_usage_layer_snippets_run() -> None:
    # The blocks of "Layers on your own feature maps" need no backbone or download.
    text = (DOCS / "usage.rst").read_text()
    section = text.split("Layers on your own feature maps", 1)[1].split("Classifiers around a backbone", 1)[0]
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", section)
    assert len(blocks) == 4
    ns: dict = {}
    torch.manual_seed(0)
    for block in blocks:
        exec("\n".join(line[3:] for line in block.splitlines()), ns)  # noqa: S102
    assert ns["z"].shape == (8, 512 * 513 // 2)
    assert ns["g"].shape == (8, 512, 256)
    torch.testing.assert_close(ns["logits"], ns["head"](ns["x"]), atol=1e-5, rtol=1e-4)
