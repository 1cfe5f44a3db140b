"""WideLinear / wide_linear: nn.Linear's parameters and values, the CPU chunked path, and
which path runs when.

The Triton kernel (the CUDA path) runs under Triton's interpreter in
tests/test_triton_kernels.py and compiled on a GPU in tests/test_cuda.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import func, nn

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
    # nn.Linear's forward takes `input`: called by keyword (generic wrappers, hooks with
    # kwargs) it raised "unexpected keyword argument 'input'"
    torch.testing.assert_close(wide(input=x), plain(input=x), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("requires_grad", list(itertools.product([False, True], repeat=3)))
def test_backward_keeps_what_f_linear_keeps(requires_grad):
    """At a size that takes the chunked path, autograd keeps the same tensors as for
    F.linear: x only for the weight's gradient, the weight only for x's (a frozen
    classifier keeps no B x D features), nothing for the bias's; gradients equal."""
    g = torch.Generator().manual_seed(1)
    d = 1 << 21
    leaves = [
        torch.randn(2, d, generator=g, dtype=torch.float64),
        torch.randn(4, d, generator=g, dtype=torch.float64) / 2**10.5,
        torch.randn(4, generator=g, dtype=torch.float64),
    ]
    x, w, b = (t.requires_grad_(r) for t, r in zip(leaves, requires_grad))
    assert L._path(x, w, b) == "chunks"
    names = {t.untyped_storage().data_ptr(): name for t, name in zip((x, w, b), "xwb")}

    def run(fn):
        kept: list[str] = []

        def pack(t):
            kept.append(names.get(t.untyped_storage().data_ptr(), f"other {tuple(t.shape)}"))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x, w, b)
        return out, sorted(kept)

    (out, kept), (ref, ref_kept) = run(wide_linear), run(F.linear)
    assert kept == ref_kept == sorted(n for n, r in zip("xw", requires_grad[1::-1]) if r)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-10)
    needs = [t for t in (x, w, b) if t.requires_grad]
    if needs:
        dz = torch.randn(out.shape, generator=g, dtype=torch.float64)
        for a, c in zip(torch.autograd.grad(out, needs, dz), torch.autograd.grad(ref, needs, dz)):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-10)


@pytest.fixture
def chunked(monkeypatch):
    """Small float64 arguments for which wide_linear takes the chunked path (its size
    threshold lowered), and a count of the chunked products it runs."""
    monkeypatch.setattr(L, "_CHUNKS_FROM", 0)
    calls = [0]
    product = L._chunked

    def counted(*args):
        calls[0] += 1
        return product(*args)

    monkeypatch.setattr(L, "_chunked", counted)
    g = torch.Generator().manual_seed(2)
    d = WIDE + 5  # a chunk-sized remainder path as well
    x = torch.randn(3, d, generator=g, dtype=torch.float64)
    w = torch.randn(2, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(2, generator=g, dtype=torch.float64)
    assert L._path(x, w, b) == "chunks"
    return x, w, b, calls


def _agree(run):
    """``run(linear)`` gives the same tensors with wide_linear as with F.linear."""
    torch.testing.assert_close(run(wide_linear), run(F.linear), rtol=1e-12, atol=1e-10)


class TestTransforms:
    """torch.func transforms and forward-mode AD through the chunked path equal F.linear's."""

    @pytest.mark.parametrize("argnums", [0, 1, 2, (0, 1, 2)])
    def test_grad(self, chunked, argnums):
        x, w, b, calls = chunked
        _agree(lambda linear: func.grad(lambda *a: linear(*a).sin().sum(), argnums)(x, w, b))
        assert calls[0] > 0

    def test_jvp(self, chunked):
        x, w, b, calls = chunked
        g = torch.Generator().manual_seed(3)
        primals = (x, w, b)
        tangents = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in primals)
        _agree(lambda linear: func.jvp(linear, primals, tangents))
        for i in range(3):  # one tangent at a time: the other two are None

            def one(linear, i=i):
                def f(p):
                    return linear(*primals[:i], p, *primals[i + 1 :])

                return func.jvp(f, (primals[i],), (tangents[i],))

            _agree(one)
        assert calls[0] > 0

    def test_jacrev_and_hessian_vector_product(self, chunked):
        x, w, b, calls = chunked
        _agree(lambda linear: func.jacrev(linear, (0, 1, 2))(x, w, b))

        def hvp(linear):  # forward over reverse
            def loss(x):
                return linear(x, w, b).pow(2).sum()

            return func.jvp(func.grad(loss), (x,), (torch.ones_like(x),))[1]

        _agree(hvp)
        assert calls[0] > 0

    @pytest.mark.parametrize("in_dim", [0, 1])
    def test_vmap_over_inputs_runs_the_fast_path(self, chunked, in_dim):
        x, w, b, calls = chunked
        xs = torch.stack([x, x.flip(0), 2 * x], in_dim)
        _agree(lambda linear: func.vmap(linear, (in_dim, None, None))(xs, w, b))
        assert calls[0] == 1  # the batch as more rows of one product

    def test_per_sample_gradients(self, chunked):
        """vmap over grad, and grad over vmap."""
        x, w, b, calls = chunked
        xs = torch.stack([x, 2 * x])

        def per_sample(linear):
            def loss(x, w):
                return linear(x, w, b).sin().sum()

            return func.vmap(func.grad(loss, (0, 1)), (0, None))(xs, w)

        def of_batch(linear):
            def loss(xs, w):
                return func.vmap(linear, (0, None, None))(xs, w, b).sin().sum()

            return func.grad(loss, (0, 1))(xs, w)

        _agree(per_sample)
        _agree(of_batch)
        assert calls[0] > 0

    @pytest.mark.parametrize("stacked", [("weight", "bias"), ("weight",), ("bias",)])
    def test_vmap_over_a_stack_of_weights(self, chunked, stacked):
        """An ensemble (torch.func.stack_module_state) of WideLinear against nn.Linear; the
        parameters not stacked are the first layer's, shared."""
        x, w, _, _ = chunked
        out_features, in_features = w.shape
        layers = [WideLinear(in_features, out_features, dtype=torch.float64) for _ in range(3)]
        params, _ = func.stack_module_state(layers)
        params = {k: v if k in stacked else v[0] for k, v in params.items()}
        in_dims = {k: 0 if k in stacked else None for k in params}
        plain = nn.Linear(in_features, out_features, dtype=torch.float64)

        def ensemble(module):
            return func.vmap(lambda p: func.functional_call(module, p, (x,)), (in_dims,))(params)

        out = ensemble(layers[0])
        assert out.shape == (3, x.shape[0], out_features)
        torch.testing.assert_close(out, ensemble(plain), rtol=1e-12, atol=1e-10)

    def test_forward_ad_dual_tensors(self, chunked):
        x, w, b, calls = chunked
        g = torch.Generator().manual_seed(4)
        tx, tw = (torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (x, w))
        layer = WideLinear(w.shape[1], w.shape[0], dtype=torch.float64)
        plain = nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
        with fwAD.dual_level():
            duals = [
                fwAD.unpack_dual(linear(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw), b))
                for linear in (wide_linear, F.linear)
            ]
            for module in (layer, plain):  # a dual input, plain parameters
                module.load_state_dict({"weight": w, "bias": b})
                duals.append(fwAD.unpack_dual(module(fwAD.make_dual(x, tx))))
        for got, ref in (duals[:2], duals[2:]):
            torch.testing.assert_close(got.primal, ref.primal, rtol=1e-12, atol=1e-10)
            torch.testing.assert_close(got.tangent, ref.tangent, rtol=1e-12, atol=1e-10)
        assert calls[0] == 2


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
    assert L._path(x, w, None) == "chunks"
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


@pytest.mark.parametrize("rows", [2, 16])  # F.linear's path; the chunked one (the sizes below)
@pytest.mark.parametrize("extra", [(1, 0), (0, 5)])  # a wider input; a wider weight
def test_bad_input_gets_f_linears_error(rows, extra):
    d = 3 * 2**16  # 16 x 3 * 2**16 x 8 reaches the chunked product: a mismatch must not be cut to fit
    x, weight = torch.randn(rows, d + extra[0]), torch.randn(8, d + extra[1])
    assert L._path(torch.randn(16, d), torch.randn(8, d), None) == "chunks"
    with pytest.raises(RuntimeError, match="shape|size"):
        wide_linear(x, weight)


@pytest.mark.parametrize("value", [None, [[1.0] * 16], np.ones((2, 16), dtype=np.float32)])
def test_non_tensor_arguments_raise_type_error(value):
    """As nn.Linear does (a TypeError), naming what arrived; the path choice read its
    device first (an AttributeError)."""
    kind = type(value).__name__
    with pytest.raises(TypeError, match=rf"^input must be a torch.Tensor, but got {kind}$"):
        WideLinear(16, 2)(value)
    x, weight = torch.randn(2, 16), torch.randn(2, 16)
    with pytest.raises(TypeError, match=rf"^weight must be a torch.Tensor, but got {kind}$"):
        wide_linear(x, value)
    if value is not None:
        with pytest.raises(TypeError, match=rf"^bias must be a torch.Tensor, but got {kind}$"):
            wide_linear(x, weight, value)


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
