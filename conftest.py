"""Doctests run in their module's namespace only, as ``python -m doctest`` and a reader see
them: an example imports what its module does not (``torch``, ``nn``); the seed is fixed.

The Triton kernels module has no doctests and imports Triton, which not every platform
has (it comes with torch's Linux CUDA wheels): it is left out of doctest collection.
"""

import pytest
import torch

collect_ignore = ["bilinearpool/functional/_triton_kernels.py"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
