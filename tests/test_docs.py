"""Checks of the Sphinx sources: the API page lists every public name, and the layer snippets run."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import bilinearpool
import bilinearpool.functional

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_api_page_lists_every_public_name() -> None:
    api = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. auto(?:class|function):: (\S+)$", api, flags=re.M))
    skip = {"__version__", "functional"}
    wanted = {f"bilinearpool.{n}" for n in bilinearpool.__all__ if n not in skip}
    wanted |= {f"bilinearpool.functional.{n}" for n in bilinearpool.functional.__all__}
    assert wanted - documented == set()


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
