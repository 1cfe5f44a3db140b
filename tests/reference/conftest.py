"""Shared fixtures: small synthetic BreaKHis trees of real PNG files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from breakhis.synthetic import make_synthetic_breakhis

#: Small images so that indexing and training take well under a second.
TREE_SIZE = (40, 28)


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread here and in child processes.

    On a shared 2-core machine, spinning OpenMP threads slow tiny models tenfold; and
    the kill-and-resume test compares weights from a child process bit for bit, which
    needs the same thread count on both sides.
    """
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """An official-layout tree with the irregular files and dsfold tables."""
    root = tmp_path_factory.mktemp("breakhis") / "official"
    meta = make_synthetic_breakhis(root, images_per_magnification=2, size=TREE_SIZE, seed=1)
    return root, meta


@pytest.fixture(scope="session")
def kaggle_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A Kaggle-layout tree (one level deeper, Folds.csv at the root)."""
    root = tmp_path_factory.mktemp("breakhis") / "kaggle"
    meta = make_synthetic_breakhis(root, images_per_magnification=1, size=TREE_SIZE,
                                   layout="kaggle", seed=2)
    return root, meta
