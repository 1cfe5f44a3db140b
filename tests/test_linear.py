"""WideLinear / wide_linear: nn.Linear's parameters and values, the CPU chunked path, and
which path runs when.

The Triton kernel (the CUDA path) runs under Triton's interpreter in
tests/test_triton_kernels.py and compiled on a GPU in tests/test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilinearpool import FastBCNN, GAPClassifier, WideLinear
from bilinearpool.functional import linear as L
from bilinearpool.functional import wide_linear

WIDE = L.WIDE_MIN_FEATURES


def test_wide_linear_is_a_linear_with_the_same_state_dict():
    torch.manual_seed(0)
    wide, plain = WideLinear(40000, 8), nn.Linear(40000, 8)
    assert isinstance(wide, nn.Linear)
    assert list(wide.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    wide.load_state_dict(plain.state_dict())
    x = torch.randn(3, 40000)
    torch.testing.assert_close(wide(x), plain(x), rtol=1e-5, atol=1e-5)
    no_bias = WideLinear(40000, 2, bias=False)
    assert no_bias.bias is None and no_bias(x).shape == (3, 2)


@pytest.mark.parametrize("d", [WIDE, 3 * L._CHUNK, 3 * L._CHUNK + 17])  # below one chunk; chunks; + a remainder
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_cpu_path_equals_f_linear_values_and_gradients(d, bias):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(5, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    out, ref = L._WideLinear.apply(x, w, b, False), F.linear(x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-10)
    leaves = [t for t in (x, w, b) if t is not None]
    dz = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad(out, leaves, dz), torch.autograd.grad(ref, leaves, dz)):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-10)


def test_the_chunked_path_runs_for_large_products():
    """wide_linear takes the chunks from 2 rows and 2**24 products on (a classifier on
    4.2M features), and its values are F.linear's."""
    x, w, b = torch.randn(2, 1 << 21), torch.randn(4, 1 << 21) / 2**10.5, torch.randn(4)  # outputs ~1
    assert L._path(x, w, b) == "chunks"
    torch.testing.assert_close(wide_linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(40000,), (2, 40000), (2, 3, 40000)])
def test_wide_linear_leading_dimensions(shape):
    x, w, b = torch.randn(shape), torch.randn(5, 40000), torch.randn(5)
    out = wide_linear(x, w, b)
    assert out.shape == (*shape[:-1], 5)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-4, atol=1e-4)


def test_strided_rows_and_a_column_slice():
    x = torch.randn(4, 2 * WIDE)[:, ::2]
    w = torch.randn(3, 2 * WIDE)[:, :WIDE]
    torch.testing.assert_close(wide_linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_which_path():
    def wide(rows, d, out=8, dtype=torch.float32):  # x, w, bias; shapes only: no memory behind them
        return torch.empty(1, d, dtype=dtype).expand(rows, d), torch.empty(1, d, dtype=dtype).expand(out, d), None

    x, w, _ = wide(2, 1 << 21)
    assert L._path(x, w, None) == "chunks" and not L._use_kernel(x, w, None)
    assert L._path(*wide(1, 1 << 22)) is None  # one row: F.linear is as fast
    assert L._path(*wide(2, 1 << 20, 4)) is None  # 2 x 2^20 x 4 < 2^24 products
    assert L._path(*wide(8, 1 << 20, 2)) == "chunks"  # 2^24 products
    assert L._path(*wide(8, WIDE - 1)) is None  # too narrow
    assert L._path(*wide(8, 1 << 21, 65)) is None  # too many outputs
    assert L._path(*wide(8, 1 << 21, dtype=torch.float16)) is None  # half precision
    assert L._path(x, w.double(), None) is None  # mixed dtypes: F.linear says what is wrong
    assert L._path(x, w, torch.randn(3)) is None  # a bias of the wrong size likewise
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert L._path(x, w, None) is None
        assert wide_linear(torch.randn(2, WIDE), torch.randn(3, WIDE)).dtype == torch.bfloat16  # autocast's F.linear


def test_traced_graphs_keep_a_plain_linear(monkeypatch):
    """While torch.compile or an exporter traces it, the layer is F.linear (bitwise)."""
    x, w, b = torch.randn(2, WIDE), torch.randn(3, WIDE), torch.randn(3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert L._path(x, w, b) is None
    assert torch.equal(wide_linear(x, w, b), F.linear(x, w, b))


def test_bad_input_gets_f_linears_error():
    with pytest.raises(RuntimeError, match="shape|size"):
        wide_linear(torch.randn(2, WIDE + 1), torch.randn(3, WIDE))


def test_classifiers_use_wide_linear():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    for model in (FastBCNN(conv, num_classes=3), GAPClassifier(conv, num_classes=3)):
        assert type(model.classifier) is WideLinear
        assert model.classifier.in_features == model.embedding_dim


def test_exports_to_onnx_as_a_plain_linear_layer():
    """While exported the layer is F.linear: the exported model runs in onnxruntime."""
    from _onnx import run_onnx

    torch.manual_seed(0)
    layer, x = WideLinear(WIDE + 5, 3), torch.randn(2, WIDE + 5)
    torch.testing.assert_close(torch.from_numpy(run_onnx(layer, x)), layer(x), rtol=1e-4, atol=1e-4)
