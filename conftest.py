"""Doctests run in their module's namespace only, as ``python -m doctest`` and a reader see
them: an example imports what its module does not (``torch``, ``nn``); the seed is fixed.

The Triton kernels module has no doctests and imports Triton, which not every platform
has (it comes with torch's Linux CUDA wheels): it is left out of doctest collection.

Under pytest-xdist each worker takes its share of torch's intra-op threads (``make test``:
2 workers on 2 cores, 1 thread each), as ``tests/reference/conftest.py`` does for its
tests: two workers of 2 threads each on 2 cores spent a quarter to a third of their CPU
time spinning (tests/test_backbones.py and test_attention.py: 126 s of CPU, 77 s wall ->
84-99 s, 73 s). Subprocesses keep torch's default (no OMP_NUM_THREADS is set).
"""

import os

import pytest
import torch

collect_ignore = ["bilinearpool/functional/_triton_kernels.py"]


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if os.environ.get("PYTEST_XDIST_WORKER") and workers:
        torch.set_num_threads(max(1, torch.get_num_threads() // int(workers)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
