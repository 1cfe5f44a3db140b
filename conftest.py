"""Doctest namespace: every docstring example may use ``torch`` and ``nn`` unimported.

The Triton kernels module has no doctests and imports Triton, which not every platform
has (it comes with torch's Linux CUDA wheels): it is left out of doctest collection.
"""

import pytest
import torch

collect_ignore = ["bilinearpool/functional/_triton_kernels.py"]


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    doctest_namespace["torch"] = torch
    doctest_namespace["nn"] = torch.nn
    torch.manual_seed(0)
