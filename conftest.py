"""Doctest namespace: every docstring example may use ``torch`` and ``nn`` unimported."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    doctest_namespace["torch"] = torch
    doctest_namespace["nn"] = torch.nn
    torch.manual_seed(0)
