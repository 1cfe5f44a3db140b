"""WideLinear / wide_linear: nn.Linear's parameters and values; the Triton path off CPU.

The kernel itself runs under Triton's interpreter in tests/test_triton_kernels.py and
compiled on a GPU in tests/test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilinearpool import FastBCNN, GAPClassifier, WideLinear
from bilinearpool.functional import linear as L
from bilinearpool.functional import wide_linear


def test_wide_linear_is_a_linear_with_the_same_state_dict():
    torch.manual_seed(0)
    wide, plain = WideLinear(40000, 8), nn.Linear(40000, 8)
    assert isinstance(wide, nn.Linear)
    assert list(wide.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    wide.load_state_dict(plain.state_dict())
    x = torch.randn(3, 40000)
    assert torch.equal(wide(x), plain(x))  # on CPU: F.linear itself
    no_bias = WideLinear(40000, 2, bias=False)
    assert no_bias.bias is None and no_bias(x).shape == (3, 2)


@pytest.mark.parametrize("shape", [(40000,), (2, 40000), (2, 3, 40000)])
def test_wide_linear_leading_dimensions(shape):
    x, w, b = torch.randn(shape), torch.randn(5, 40000), torch.randn(5)
    out = wide_linear(x, w, b)
    assert out.shape == (*shape[:-1], 5)
    assert torch.equal(out, F.linear(x, w, b))


def test_kernel_only_on_cuda():
    x, w = torch.randn(2, 1 << 15), torch.randn(8, 1 << 15)
    assert not L._use_kernel(x, w, None)  # CPU: F.linear


def test_classifiers_use_wide_linear():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    for model in (FastBCNN(conv, num_classes=3), GAPClassifier(conv, num_classes=3)):
        assert type(model.classifier) is WideLinear
        assert model.classifier.in_features == model.embedding_dim
