"""bilinearpool.functional: the math, checked against plain definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bilinearpool.functional.bilinear as FB
from bilinearpool import FastBilinearPool
from bilinearpool.functional import (
    bilinear_pool,
    fast_bilinear_linear,
    fast_bilinear_pool,
    l2_normalize,
    signed_sqrt,
    signed_sqrt_grad_bound,
    triu_pack,
    triu_size,
    triu_unpack,
)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def naive_bilinear(x_a: torch.Tensor, x_b: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over locations of the outer products, one location at a time."""
    x_b = x_a if x_b is None else x_b
    a, b = x_a.flatten(2), x_b.flatten(2)
    n = a.shape[2]
    out = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=a.dtype)
    for loc in range(n):
        out += a[:, :, loc, None] * b[:, None, :, loc]
    return out / n


def naive_chain(x_a, x_b=None, *, triu=False, eps=FB.SIGNED_SQRT_EPS, sqrt=True, l2=True):
    """The documented definition, op by op, differentiated by autograd."""
    y = bilinear_pool(x_a, x_b)
    if sqrt:
        y = signed_sqrt(y, eps=eps)
    y = triu_pack(y) if triu else y.flatten(1)
    return l2_normalize(y) if l2 else y


@pytest.fixture(params=["whole", "samples", "blocked", "blocked-dots", "blocked-rebuilt", "matrices"])
def blocking(request, monkeypatch):
    """Run the fused op on CPU with all samples in one block; with two samples per block
    (one-stream groups: :func:`_sample_groups`, the second group smaller than the first);
    with a few rows per block (one-stream panels), also with a per-sample BLAS dot for
    every per-sample sum, or with the backward keeping only a few blocks (rebuilding the
    others); or as off the CPU, on whole matrices with the elementwise passes of
    ``_elementwise`` (torch ops)."""
    if request.param == "matrices":
        monkeypatch.setattr(FB, "_whole_matrices", lambda device: True)
    if request.param == "samples":
        # The one-stream inputs below: 3 samples of 11 x 11 = 121 entries, 2 per group.
        monkeypatch.setattr(FB, "_block_elements", lambda device: 250)
    if request.param.startswith("blocked"):
        monkeypatch.setattr(FB, "_block_elements", lambda device: 40)
    if request.param == "blocked-dots":
        monkeypatch.setattr(FB, "_DOT_PER_SAMPLE_FROM", 1)
    if request.param == "blocked-rebuilt":
        monkeypatch.setattr(FB, "_KEEP_BYTES", 600)
    return request.param


def test_elementwise_passes_check_their_buffers():
    """The in-place passes of the fused op (torch ops here, Triton kernels on CUDA) refuse
    buffers of the wrong layout, and ``norms`` receives each sample's norm unclamped."""
    from bilinearpool.functional import _elementwise

    g = torch.randn(2, 9, dtype=torch.float64)
    for bad, kwargs in (
        (torch.randn(2, 10), dict(diag=4)),  # 10 is not (diag - 1)^2
        (torch.randn(2, 3, 3), {}),  # not (B, n)
        (torch.randn(9, 2).t(), {}),  # strided
    ):
        with pytest.raises(ValueError, match="expected contiguous|needs"):
            _elementwise.normalize_(bad, 1e-12, 1e-12, **kwargs)
    with pytest.raises(ValueError, match="expected contiguous"):
        _elementwise.normalize_grad_(g.clone(), torch.randn(2, 8, dtype=torch.float64), 1e-12, 1e-12)
    with pytest.raises(ValueError, match="norms needs l2_eps"):
        _elementwise.normalize_(g.clone(), 1e-12, None, norms=torch.empty(2, dtype=torch.float64))
    g[0] *= 1e-3  # sample 0 below the floor l2_eps = 0.5, sample 1 above it
    norms = torch.empty(2, dtype=torch.float64)
    y = _elementwise.normalize_(g.clone(), None, 0.5, norms=norms)
    torch.testing.assert_close(norms, g.norm(dim=1))
    assert norms[0] < 0.5 < norms[1]
    torch.testing.assert_close(y, g / g.norm(dim=1, keepdim=True).clamp_min(0.5))


def test_keep_stops_at_its_budget_and_counts_views_as_free():
    kept: list = []
    room = FB._keep(kept, torch.zeros(10), 100)  # 40 bytes
    room = FB._keep(kept, (torch.zeros(10), torch.zeros(20)[5:15]), room)  # 40 + a view
    room = FB._keep(kept, torch.zeros(10), room)  # 40 bytes: no room left
    assert room == 20 and kept[2] is None and kept[0] is not None and kept[1] is not None
    assert FB._take(kept, 0) is not None and kept[0] is None and FB._take(None, 0) is None


@pytest.mark.parametrize("dot_from", [1, 1 << 30], ids=["per-sample-dot", "vecdot"])
@pytest.mark.parametrize("layout", ["contiguous", "panel-view", "rows-view"])
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_rowdot_equals_sum_of_products(dot_from, layout, batch, monkeypatch):
    """_rowdot's three ways (per-sample dots, one vecdot, row by row for strided blocks)."""
    monkeypatch.setattr(FB, "_DOT_PER_SAMPLE_FROM", dot_from)
    g = torch.Generator().manual_seed(batch)
    x, y = (torch.randn(batch, 7, 9, generator=g, dtype=torch.float64) for _ in range(2))
    if layout == "panel-view":  # rows 2:5, columns 2: of each sample, as the CPU panels use
        x, y = x[:, 2:5, 2:], y[:, 2:5, 2:]
    elif layout == "rows-view":  # (b, n) rows of a wider matrix, as packed-triangle slices
        x, y = x.flatten(1)[:, 5:40], y.flatten(1)[:, 5:40]
    expected = (x * y).flatten(1).sum(dim=1)
    torch.testing.assert_close(FB._rowdot(x, y), expected)


class TestBilinearPool:
    def test_smoke(self):
        assert bilinear_pool(torch.randn(2, 3, 4, 4)).shape == (2, 3, 3)

    @pytest.mark.parametrize("shape_a,shape_b", [((1, 5, 3, 4), (1, 2, 3, 4)), ((3, 1, 1, 1), None), ((2, 7, 2, 9), (2, 7, 2, 9))])
    def test_equals_outer_product_loop(self, shape_a, shape_b):
        x_a = torch.randn(*shape_a, dtype=torch.float64)
        x_b = None if shape_b is None else torch.randn(*shape_b, dtype=torch.float64)
        torch.testing.assert_close(bilinear_pool(x_a, x_b), naive_bilinear(x_a, x_b))

    def test_sum_reduction(self):
        x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
        torch.testing.assert_close(bilinear_pool(x, reduction="sum"), naive_bilinear(x) * 15)

    def test_symmetric(self):
        g = bilinear_pool(torch.randn(3, 6, 5, 5))
        torch.testing.assert_close(g, g.transpose(1, 2))

    def test_tokens_equal_maps(self):
        x = torch.randn(2, 6, 3, 4)
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        torch.testing.assert_close(bilinear_pool(tokens), bilinear_pool(x))

    def test_noncontiguous_and_channels_last(self):
        x = torch.randn(2, 8, 5, 6)
        ref = bilinear_pool(x)
        torch.testing.assert_close(bilinear_pool(x.to(memory_format=torch.channels_last)), ref)
        torch.testing.assert_close(bilinear_pool(x.transpose(2, 3)), ref)  # same locations, other order

    def test_gradcheck(self):
        x_a = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
        x_b = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(bilinear_pool, (x_a, x_b))

    @pytest.mark.parametrize(
        "x_a,x_b,match",
        [
            (torch.randn(2, 3, 4), torch.randn(2, 3, 4, 4), "same layout"),
            (torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4), r"same batch size, but got 2 .* and 3"),
            (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 5, 4), r"spatial size .* \(2, 3, 5, 4\)"),
            (torch.randn(3, 4), None, r"\(B, C, H, W\) .* 2-D tensor of shape \(3, 4\)"),
            (torch.randn(2, 0, 4, 4), None, "at least one channel"),
        ],
    )
    def test_exception(self, x_a, x_b, match):
        with pytest.raises(ValueError, match=match):
            bilinear_pool(x_a, x_b)

    def test_integer_input(self):
        with pytest.raises(TypeError, match="floating-point .* torch.int64"):
            bilinear_pool(torch.ones(2, 3, 4, 4, dtype=torch.long))

    def test_bad_reduction(self):
        with pytest.raises(ValueError, match=r"reduction must be one of .* 'max'"):
            bilinear_pool(torch.randn(1, 2, 2, 2), reduction="max")

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_reduced_precision_accumulates_in_float32(self, dtype):
        x = torch.rand(2, 16, 7, 7) * 1e3  # squares reach 1e6, beyond float16's 65504
        out = bilinear_pool(x.to(dtype))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out, bilinear_pool(x.to(dtype).float()))


class TestSignedSqrt:
    def test_values(self):
        x = torch.tensor([-9.0, -1e-3, 0.0, 2.5, 16.0], dtype=torch.float64)
        eps = 1e-5
        expected = torch.sign(x) * (torch.sqrt(x.abs() + eps) - math.sqrt(eps))
        torch.testing.assert_close(signed_sqrt(x, eps=eps), expected)

    def test_gradient_closed_form_everywhere_including_zero(self):
        x = torch.tensor([-4.0, -1e-12, 0.0, 1e-12, 3.0], dtype=torch.float64, requires_grad=True)
        eps = 1e-5
        (g,) = torch.autograd.grad(signed_sqrt(x, eps=eps).sum(), x)
        torch.testing.assert_close(g, 0.5 / torch.sqrt(x.detach().abs() + eps))
        assert g[2] == pytest.approx(signed_sqrt_grad_bound(eps))

    @settings(max_examples=50, deadline=None)
    @given(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([1e-10, 1e-5, 1e-2]))
    def test_gradient_bounded_and_odd(self, value, eps):
        x = torch.tensor([value, -value], dtype=torch.float64, requires_grad=True)
        y = signed_sqrt(x, eps=eps)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(g).all() and (g > 0).all()
        assert (g <= signed_sqrt_grad_bound(eps) * (1 + 1e-12)).all()
        assert y[0] == -y[1]

    def test_infinities_give_nan_as_in_the_fused_pool(self):
        # Documented: the quotient is inf / inf, on every path (the public function, the
        # fused op's in-place step), so that SignedSqrt and FastBilinearPool agree.
        from bilinearpool.functional import _elementwise

        x = torch.tensor([float("inf"), -float("inf"), 4.0])
        y = signed_sqrt(x, eps=1e-12)
        assert y[:2].isnan().all() and y[2].item() == pytest.approx(2.0, rel=1e-5)
        torch.testing.assert_close(_elementwise.signed_sqrt_(x.clone(), 1e-12), y, equal_nan=True)

    def test_continuous_at_zero(self):
        x = torch.tensor([-1e-14, 0.0, 1e-14], dtype=torch.float64)
        assert signed_sqrt(x, eps=1e-5).abs().max() < 1e-11

    @pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf"), 1e-100])
    def test_bad_eps(self, eps):
        # 1e-100: sqrt(eps) is 0 in float32, and an exact zero of the pooled matrix gave
        # 0 / 0 = NaN for the whole sample after the L2 normalisation
        with pytest.raises(ValueError, match=r"eps must be a finite number >= 1.175e-38 \(float32's smallest "
                           r"normal number\), but got"):
            signed_sqrt(torch.ones(2), eps=eps)
        with pytest.raises(ValueError, match=r"eps must be a finite number >= 1.175e-38"):
            FastBilinearPool(eps=eps)

    def test_smallest_eps_keeps_zeros_finite(self):
        x = torch.zeros(1, 4, 3, 3)
        x[0, 0] = 1.0  # the other channels' products are exact zeros
        out = FastBilinearPool(eps=torch.finfo(torch.float32).tiny)(x)
        torch.testing.assert_close(out, torch.tensor([[1.0] + [0.0] * 15]))

    @pytest.mark.parametrize("eps, kind", [(True, "bool"), ("1e-5", "str"), (torch.tensor(1e-5), "Tensor")])
    def test_eps_of_another_type(self, eps, kind):
        with pytest.raises(TypeError, match=rf"^eps must be a finite number >= 1.175e-38 \(float32's smallest "
                           rf"normal number\), but got .* \({kind}\)$"):
            signed_sqrt(torch.ones(2), eps=eps)

    def test_numpy_eps(self):
        x = torch.tensor([-4.0, 9.0])
        torch.testing.assert_close(signed_sqrt(x, eps=np.float32(1e-6)), signed_sqrt(x, eps=float(np.float32(1e-6))))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_input_small_eps_gradient_at_zero(self, dtype):
        # In float16, |x| + 1e-8 rounds to 0 at x = 0: sqrt's infinite derivative gave NaN.
        x = torch.tensor([0.0, -2.0, 1.0, 300.0], dtype=dtype, requires_grad=True)
        y = signed_sqrt(x, eps=1e-8)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert y.dtype == dtype and g.dtype == dtype and torch.isfinite(g).all()
        ref = x.detach().double().requires_grad_()
        (g_ref,) = torch.autograd.grad(signed_sqrt(ref, eps=1e-8).sum(), ref)
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-2, atol=0)
        torch.testing.assert_close(y.double(), signed_sqrt(ref, eps=1e-8).detach(), rtol=1e-2, atol=0)


class TestL2Normalize:
    def test_unit_norm_per_sample(self):
        x = torch.randn(4, 3, 5)
        out = l2_normalize(x)
        torch.testing.assert_close(out.flatten(1).norm(dim=1), torch.ones(4))
        torch.testing.assert_close(out, x / x.flatten(1).norm(dim=1)[:, None, None])

    def test_zero_stays_zero(self):
        assert torch.equal(l2_normalize(torch.zeros(2, 3)), torch.zeros(2, 3))

    def test_exception(self):
        with pytest.raises(ValueError, match=r"at least 2 dimensions, but got shape \(3,\)"):
            l2_normalize(torch.ones(3))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_input_with_a_norm_beyond_float16(self, dtype):
        # 10000 entries of 1000: the norm 1e5 overflows float16 (inf), which gave zeros.
        x = torch.full((2, 100, 100), 1000.0, dtype=dtype, requires_grad=True)
        out = l2_normalize(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float().flatten(1).norm(dim=1), torch.ones(2), rtol=1e-2, atol=0)
        (g,) = torch.autograd.grad(out[:, 0, 0].sum(), x)
        assert g.dtype == dtype and torch.isfinite(g).all() and g.abs().max() > 0


class TestTriu:
    @settings(max_examples=30, deadline=None)
    @given(st.integers(1, 9), st.integers(1, 3), st.integers(0, 2**31 - 1))
    def test_norm_identity(self, c, b, seed):
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(b, c, c, generator=g, dtype=torch.float64)
        m = m + m.transpose(1, 2)
        torch.testing.assert_close(triu_pack(m).norm(dim=1), m.flatten(1).norm(dim=1))
        torch.testing.assert_close(triu_unpack(triu_pack(m)), m)

    def test_size_and_order(self):
        m = torch.arange(9.0).view(1, 3, 3)
        m = m + m.transpose(1, 2)
        r2 = math.sqrt(2)
        expected = torch.tensor([[0.0, 4 * r2, 8 * r2, 8.0, 12 * r2, 16.0]])
        torch.testing.assert_close(triu_pack(m), expected)
        assert triu_size(3) == 6

    def test_gradcheck_and_noncontiguous(self):
        m = torch.randn(2, 4, 4, dtype=torch.float64)
        assert torch.autograd.gradcheck(triu_pack, (m.requires_grad_(),))
        assert torch.autograd.gradcheck(triu_unpack, (torch.randn(2, 10, dtype=torch.float64, requires_grad=True),))
        wide = torch.randn(2, 4, 8, dtype=torch.float64)
        torch.testing.assert_close(triu_pack(wide[:, :, ::2]), triu_pack(wide[:, :, ::2].contiguous()))
        torch.testing.assert_close(triu_unpack(wide.flatten(1)[:, ::3][:, :10]),
                                   triu_unpack(wide.flatten(1)[:, ::3][:, :10].contiguous()))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_compile_keeps_the_dtype_of_the_weights(self, dtype):
        """Compiled, the sqrt(2) weights are those of the input's dtype (numpy's float64
        constants were traced in float32: float64 output 2e-8 off)."""
        m = torch.randn(2, 5, 5, dtype=dtype)
        m = m + m.transpose(1, 2)
        for op, x in ((triu_pack, m), (triu_unpack, triu_pack(m))):
            compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(x), op(x), rtol=0, atol=0)

    def test_exception(self):
        with pytest.raises(ValueError, match=r"square matrices \(B, C, C\), but got shape \(2, 3, 4\)"):
            triu_pack(torch.ones(2, 3, 4))
        with pytest.raises(ValueError, match="not C\\(C\\+1\\)/2"):
            triu_unpack(torch.ones(2, 5))


class TestFastBilinearPool:
    CASES = [
        dict(triu=False, two=False),
        dict(triu=True, two=False),
        dict(triu=False, two=True),
    ]

    @staticmethod
    def inputs(two: bool, dtype=torch.float64, zeros: bool = True, seed: int = 0, hw=(3, 4)):
        g = torch.Generator().manual_seed(seed)
        x_a = torch.randn(3, 11, *hw, generator=g, dtype=dtype)
        x_b = torch.randn(3, 6, *hw, generator=g, dtype=dtype) if two else None
        if zeros:  # ReLU features: exact zeros, and channels with disjoint support
            x_a = x_a.relu()
            x_b = None if x_b is None else x_b.relu()
        return (x_a, x_b) if two else (x_a,)

    @pytest.mark.parametrize("save_output", [False, True], ids=["save-input", "save-output"])
    @pytest.mark.parametrize("case", CASES, ids=str)
    @pytest.mark.parametrize("sqrt,l2", [(True, True), (True, False), (False, True), (False, False)])
    def test_values_and_gradients_equal_naive(self, case, sqrt, l2, save_output, blocking):
        inputs = [x.requires_grad_() for x in self.inputs(case["two"])]
        kwargs = dict(triu=case["triu"], signed_sqrt=sqrt, l2_normalize=l2, save_output=save_output)
        fast = fast_bilinear_pool(*inputs, **kwargs)
        slow = naive_chain(*inputs, triu=case["triu"], sqrt=sqrt, l2=l2)
        torch.testing.assert_close(fast, slow, **TOL[torch.float64])
        weights = torch.randn_like(fast)
        g_fast = torch.autograd.grad((fast * weights).sum(), inputs)
        g_slow = torch.autograd.grad((slow * weights).sum(), inputs)
        for a, b in zip(g_fast, g_slow):
            torch.testing.assert_close(a, b, **TOL[torch.float64])

    @pytest.mark.parametrize("save_output", [False, True], ids=["save-input", "save-output"])
    @pytest.mark.parametrize("case", CASES, ids=str)
    @pytest.mark.parametrize("layout", ["transposed", "expanded"])
    def test_strided_incoming_gradient(self, case, save_output, layout, blocking):
        """The incoming gradient as autograd may pass it: a transposed view, or one row
        expanded over the batch (stride 0, as from ``out.sum()``)."""
        inputs = [x.requires_grad_() for x in self.inputs(case["two"])]
        fast = fast_bilinear_pool(*inputs, triu=case["triu"], save_output=save_output)
        batch, dim = fast.shape
        if layout == "transposed":
            dz = torch.randn(dim, batch, dtype=fast.dtype).t()
        else:
            dz = torch.randn(1, dim, dtype=fast.dtype).expand(batch, dim)
        g_fast = torch.autograd.grad(fast, inputs, dz)
        g_slow = torch.autograd.grad(naive_chain(*inputs, triu=case["triu"]), inputs, dz.contiguous())
        for a, b in zip(g_fast, g_slow):
            torch.testing.assert_close(a, b, **TOL[torch.float64])

    @pytest.mark.parametrize("save_output", [False, True], ids=["save-input", "save-output"])
    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_gradcheck(self, case, save_output, blocking):
        # No exact zeros here: finite differences are inaccurate where f'' jumps. 2 x 3
        # locations: the blocks and panels are of the C x C matrices (the channels, as in
        # the other tests); the locations set only the cost, two finite differences each.
        inputs = [x.requires_grad_() for x in self.inputs(case["two"], zeros=False, hw=(2, 3))]
        fn = lambda *xs: fast_bilinear_pool(*xs, triu=case["triu"], eps=1e-2, save_output=save_output)  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs)

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_save_output_below_the_l2_floor(self, case, blocking):
        """A sample whose norm is below l2_eps (all zeros but one tiny entry): the saved
        output was divided by l2_eps, not by its norm, and the backward must undo that."""
        inputs = [x.requires_grad_() for x in self.inputs(case["two"])]
        with torch.no_grad():
            for x in inputs:
                x[1].zero_()
                x[1, 0, 0, 0] = 1e-4
        kwargs = dict(triu=case["triu"], eps=1e-9, l2_eps=1e-4)
        # The floor is reached for sample 1 only (else this test checks nothing of it).
        unnormalised = signed_sqrt(bilinear_pool(*inputs), eps=1e-9).flatten(1).norm(dim=1)
        assert unnormalised[1] < 1e-4 < unnormalised[0]
        weights = torch.randn_like(fast_bilinear_pool(*inputs, **kwargs))
        expected = torch.autograd.grad((fast_bilinear_pool(*inputs, **kwargs) * weights).sum(), inputs)
        got = torch.autograd.grad((fast_bilinear_pool(*inputs, **kwargs, save_output=True) * weights).sum(), inputs)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
        # Both against the definition with the same floor (l2_eps was only checked for
        # consistency between the two).
        fresh = [x.detach().clone().requires_grad_() for x in inputs]
        g = bilinear_pool(*fresh)
        z = signed_sqrt(g, eps=1e-9)
        ref = l2_normalize(triu_pack(z) if case["triu"] else z.flatten(1), eps=1e-4)
        torch.testing.assert_close(fast_bilinear_pool(*inputs, **kwargs), ref.detach(), **TOL[torch.float64])
        by_definition = torch.autograd.grad((ref * weights).sum(), fresh)
        for a, b in zip(expected, by_definition):
            torch.testing.assert_close(a, b, **TOL[torch.float64])

    def test_float32_equals_float64(self, blocking):
        (x,) = self.inputs(False)
        torch.testing.assert_close(fast_bilinear_pool(x.float()), fast_bilinear_pool(x).float(), **TOL[torch.float32])

    def test_gradient_finite_with_zero_entries_and_zero_input(self):
        x = torch.zeros(2, 4, 3, 3, requires_grad=True)
        with torch.no_grad():
            x[0, 0, 0, 0] = 1.0  # sample 0: one nonzero entry; sample 1: all zeros
            x[0, 1, 2, 2] = 2.0  # disjoint support: G[0, 0, 1] == 0 exactly
        y = fast_bilinear_pool(x)
        (g,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
        assert torch.isfinite(g).all()
        x_ref = x.detach().clone().requires_grad_()
        torch.testing.assert_close(y, naive_chain(x_ref))

    @pytest.mark.parametrize("two", [False, True])
    def test_saves_only_the_inputs(self, two):
        inputs = [x.float().requires_grad_() for x in self.inputs(two)]
        saved: list[int] = []

        def pack(t):
            saved.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fast_bilinear_pool(*inputs)
        assert sum(saved) == sum(x.numel() * x.element_size() for x in inputs)

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_save_output_saves_the_output_and_one_norm_per_sample(self, case, blocking):
        two, triu = case["two"], case["triu"]
        inputs = [x.float().requires_grad_() for x in self.inputs(two)]
        saved: list[torch.Tensor] = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fast_bilinear_pool(*inputs, triu=triu, save_output=True)
        assert any(t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for t in saved)
        expected = sum(x.numel() for x in inputs) + out.numel() + out.shape[0]
        assert sum(t.untyped_storage().nbytes() for t in saved) == 4 * expected

    @pytest.mark.parametrize("save_output", [False, True], ids=["save-input", "save-output"])
    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_empty_batch_on_every_path(self, case, save_output, blocking):
        inputs = [x[:0].requires_grad_() for x in self.inputs(case["two"])]
        out = fast_bilinear_pool(*inputs, triu=case["triu"], save_output=save_output)
        assert out.shape[0] == 0
        grads = torch.autograd.grad(out.sum(), inputs)
        assert [g.shape for g in grads] == [x.shape for x in inputs]

    @pytest.mark.parametrize("two", [False, True])
    def test_save_output_refuses_an_output_changed_in_place(self, two):
        inputs = [x.requires_grad_() for x in self.inputs(two)]
        out = fast_bilinear_pool(*inputs, save_output=True)
        out.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_save_output_half_inputs(self, dtype):
        (x,) = self.inputs(False, dtype=torch.float32)
        x = x.to(dtype).requires_grad_()
        ref = x.detach().clone().requires_grad_()
        out = fast_bilinear_pool(x, save_output=True)
        assert out.dtype == dtype
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (got,) = torch.autograd.grad((out.float() * weights).sum(), x)
        (expected,) = torch.autograd.grad((fast_bilinear_pool(ref).float() * weights).sum(), ref)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    def test_tokens_channels_last_noncontiguous(self):
        x = torch.randn(2, 12, 5, 6).relu()
        ref = fast_bilinear_pool(x)
        torch.testing.assert_close(fast_bilinear_pool(x.to(memory_format=torch.channels_last)), ref)
        torch.testing.assert_close(fast_bilinear_pool(x.flatten(2).transpose(1, 2)), ref)
        wide = torch.randn(2, 24, 5, 6).relu()[:, ::2]
        torch.testing.assert_close(fast_bilinear_pool(wide), fast_bilinear_pool(wide.contiguous()))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("triu", [False, True])
    def test_autocast_large_features(self, dtype, triu):
        x = (torch.rand(2, 32, 7, 7) * 1e3).requires_grad_()  # outer products up to 1e6
        ref = fast_bilinear_pool(x, triu=triu)
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        with torch.autocast("cpu", dtype=dtype):
            x_low = x.to(dtype)
            out = fast_bilinear_pool(x_low, triu=triu)
        (g,) = torch.autograd.grad(out.float().sum(), x)
        assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(g).all()
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(g, g_ref, rtol=5e-2, atol=5e-2 * g_ref.abs().max().item())

    def test_sum_reduction(self):
        (x,) = self.inputs(False)
        expected = l2_normalize(signed_sqrt(bilinear_pool(x, reduction="sum")).flatten(1))
        torch.testing.assert_close(fast_bilinear_pool(x, reduction="sum"), expected)
        # as documented: without the signed square root the L2 norm cancels the 1/N
        torch.testing.assert_close(fast_bilinear_pool(x, reduction="sum", signed_sqrt=False),
                                   fast_bilinear_pool(x, signed_sqrt=False))

    def test_exception(self):
        x = torch.randn(2, 3, 4, 4)
        with pytest.raises(ValueError, match="triu=True needs a symmetric matrix"):
            fast_bilinear_pool(x, x.clone(), triu=True)
        with pytest.raises(ValueError, match="l2_eps must be a finite number >= 1.175e-38"):
            fast_bilinear_pool(x, l2_eps=0.0)
        with pytest.raises(TypeError, match="floating-point"):
            fast_bilinear_pool(x.int())

    @pytest.mark.parametrize("fn", ["pool", "linear"])
    def test_eps_of_a_step_that_is_off_is_refused(self, fn):
        """An eps for a step that does not run would do nothing: refused, the default value too."""
        x = torch.randn(2, 3, 4, 4).relu()
        w = torch.randn(2, 9)

        def call(**kw):
            return fast_bilinear_pool(x, **kw) if fn == "pool" else fast_bilinear_linear(x, w, **kw)

        for eps in (1e-3, 1e-5):
            with pytest.raises(ValueError, match=r"eps applies to signed_sqrt=True only, but signed_sqrt=False; drop eps"):
                call(signed_sqrt=False, eps=eps)
        with pytest.raises(ValueError, match=r"l2_eps applies to l2_normalize=True only, but l2_normalize=False; drop l2_eps"):
            call(l2_normalize=False, l2_eps=1e-12)
        with pytest.raises(ValueError, match=r"\(it would do nothing\), or set l2_normalize=True$"):
            call(l2_normalize=False, l2_eps=1e-12)
        # None is the default: the step's own when it runs, nothing when it does not
        with torch.no_grad():
            torch.testing.assert_close(call(eps=None, l2_eps=None), call(eps=1e-5, l2_eps=1e-12), rtol=0, atol=0)
            torch.testing.assert_close(call(signed_sqrt=False, l2_normalize=False, eps=None, l2_eps=None),
                                       call(signed_sqrt=False, l2_normalize=False))

    def test_block_partition_covers_everything(self):
        for batch, rows, cols, target in [(3, 21, 21, 40), (8, 2048, 2048, 1 << 18), (5, 4, 4, 1000), (2, 3, 7, 1)]:
            blocks = FB._blocks(batch, rows, cols, target)
            seen = torch.zeros(batch, rows, dtype=torch.int64)
            for b0, b1, r0, r1 in blocks:
                seen[b0:b1, r0:r1] += 1
            assert torch.equal(seen, torch.ones_like(seen))

    @pytest.mark.parametrize("batch,channels,target", [(3, 11, 40), (8, 2048, 1 << 18), (32, 256, 1 << 18), (2, 3, 1), (16, 512, 1 << 26)])
    def test_panels_cover_the_upper_triangle_once(self, batch, channels, target):
        seen = torch.zeros(batch, channels, channels, dtype=torch.int64)
        panels = FB._panels(batch, channels, target)
        for b0, b1, r0, r1 in panels:
            seen[b0:b1, r0:r1, r0:] += 1
        # Every entry on or above the diagonal exactly once (panels also hold the lower
        # half of their diagonal block, which the op does not use).
        assert torch.equal(seen.triu(), torch.ones_like(seen).triu()) and seen.max() == 1
        rows = {r1 - r0 for _, _, r0, r1 in panels}
        if channels >= 1024:  # large matrices are cut into several panels
            assert len({r0 for _, _, r0, _ in panels}) >= 8 and max(rows) <= target // channels

    @pytest.mark.parametrize(
        "batch,channels,target,groups",
        [
            (3, 11, 250, [(0, 2), (2, 3)]),
            (32, 256, 1 << 18, [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24), (24, 28), (28, 32)]),
            (5, 128, 1 << 18, [(0, 5)]),
            (0, 11, 250, []),
            (8, 12, 140, None),  # one matrix is more than a block: panels
            (8, 257, 1 << 26, None),  # more than _GROUPS_UP_TO entries
            (16, 512, 1 << 18, None),
            (8, 2048, 1 << 18, None),
        ],
    )
    def test_sample_groups_cover_the_batch_once(self, batch, channels, target, groups):
        assert FB._sample_groups(batch, channels, target) == groups

    @pytest.mark.parametrize("channels", [1, 2, 7, 256])
    def test_unpack_fills_both_triangles(self, channels):
        """The packed groups' backward unpacks with one gather: every entry of the square
        from the packed upper triangle, the diagonal once (what triu_unpack gives before
        the weights)."""
        m = torch.randn(3, channels, channels, dtype=torch.float64)
        m = m + m.transpose(1, 2)
        index = torch.from_numpy(FB._triu_numpy(channels, channels))
        packed = m.flatten(1)[:, index]
        square = torch.full_like(m, float("nan"))  # nothing may be left unwritten
        FB._unpack_into(square, packed, torch.from_numpy(FB._triu_source(channels)))
        torch.testing.assert_close(square, m, rtol=0, atol=0)

    @pytest.mark.parametrize("channels,path", [(11, "groups"), (12, "panels")])
    def test_one_stream_cpu_path_follows_the_block_size(self, channels, path, monkeypatch):
        """Whole-sample groups while one C x C matrix fits in a block, else panels of the
        upper triangle; for the full and the packed output alike."""
        monkeypatch.setattr(FB, "_block_elements", lambda device: 121)
        called = []
        for name in ("_gram_groups_forward", "_gram_groups_backward"):
            real = getattr(FB, name)
            monkeypatch.setattr(FB, name, lambda *a, _real=real, _name=name, **k: called.append(_name) or _real(*a, **k))
        x = torch.randn(2, channels, 3, 3, dtype=torch.float64, requires_grad=True)
        for triu in (False, True):
            called.clear()
            out = fast_bilinear_pool(x, triu=triu)
            (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
            (g_ref,) = torch.autograd.grad(naive_chain(x, triu=triu), x, torch.ones_like(out))
            torch.testing.assert_close(g, g_ref, **TOL[torch.float64])
            grouped = "_gram_groups_forward" in called and "_gram_groups_backward" in called
            assert grouped == (path == "groups"), (triu, called)

    @pytest.mark.parametrize("triu", [False, True])
    def test_transposes_as_views_leave_the_incoming_gradient_alone(self, triu, monkeypatch, blocking):
        """Off CPU the panels' transposes are views of the incoming gradient; it must stay unchanged."""
        monkeypatch.setattr(FB, "_transposed", lambda x: x.transpose(1, 2))
        (x,) = [t.requires_grad_() for t in self.inputs(False)]
        out = fast_bilinear_pool(x, triu=triu)
        dz = torch.randn_like(out)
        dz_copy = dz.clone()
        (g,) = torch.autograd.grad(out, x, dz)
        (g_ref,) = torch.autograd.grad(naive_chain(x, triu=triu), x, dz)
        assert torch.equal(dz, dz_copy)
        torch.testing.assert_close(g, g_ref, **TOL[torch.float64])

    def test_transposed_blocks(self):
        x = torch.randn(3, 9, 130)[:, 2:, 5:]  # strided rows, as the panels' slices
        torch.testing.assert_close(FB._transposed(x), x.transpose(1, 2), rtol=0, atol=0)

    @pytest.mark.parametrize("triu", [False, True])
    def test_compile_traces_whole_matrices(self, triu, monkeypatch):
        """Under torch.compile the op takes the whole-matrix path, on CPU too: one graph
        (fullgraph) with one product in forward, not the panel loop unrolled."""
        monkeypatch.setattr(FB, "_block_elements", lambda device: 40)  # eager: dozens of panels
        graphs = []

        def recording(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        x = torch.randn(2, 12, 4, 4, dtype=torch.float64).relu()
        compiled = torch.compile(lambda t: fast_bilinear_pool(t, triu=triu), backend=recording, fullgraph=True)
        leaf = x.clone().requires_grad_()
        out = compiled(leaf)
        torch.testing.assert_close(out, naive_chain(x, triu=triu), **TOL[torch.float64])
        (g,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
        leaf_ref = x.clone().requires_grad_()
        (g_ref,) = torch.autograd.grad(naive_chain(leaf_ref, triu=triu), leaf_ref, torch.ones_like(out))
        torch.testing.assert_close(g, g_ref, **TOL[torch.float64])
        targets = [
            str(node.target)
            for gm in graphs
            for module in gm.modules()
            if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes
            if node.op in ("call_function", "call_method")
        ]
        products = [t for t in targets if "bmm" in t]
        # Forward: one product; backward: the rebuild and dG A + dG^T A.
        assert 1 <= len(products) <= 4, products
        eager_panels = FB._panels(2, 12, 40)
        assert len(eager_panels) > 4  # the panel loop would have put one product per panel

    def test_compile(self):
        x = torch.randn(2, 6, 4, 4).relu().requires_grad_()
        compiled = torch.compile(fast_bilinear_pool, backend="eager", fullgraph=False)
        out = compiled(x)
        torch.testing.assert_close(out, fast_bilinear_pool(x))
        out.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_naive_published_chain_differs_only_by_the_shift():
    """Our signed sqrt is the published sign(x)*sqrt(|x|+eps) shifted towards zero by sqrt(eps)."""
    x = torch.randn(2, 8, 5, 5).relu()
    eps = 1e-10
    g = bilinear_pool(x).flatten(1)
    published = F.normalize(torch.sign(g) * torch.sqrt(g.abs() + eps))
    ours = fast_bilinear_pool(x, eps=eps)
    torch.testing.assert_close(ours, published, rtol=1e-4, atol=1e-4)


# --- Higher derivatives, tracing, dtypes of two streams, flags -----------------------------


@pytest.mark.parametrize("save_output", [False, True], ids=["rebuild", "save-output"])
@pytest.mark.parametrize("config", ["one", "triu", "two"])
def test_gradient_penalty_matches_the_definition(config, save_output, blocking):
    """A backward with create_graph=True gives a gradient with history, so a gradient
    penalty's second derivative equals the op-by-op chain's (it was silently missing:
    the fused backward runs under no_grad)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64, generator=g).relu_().requires_grad_()
    y = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g).requires_grad_() if config == "two" else None
    inputs = (x,) if y is None else (x, y)
    triu = config == "triu"

    def penalised(f):
        out = f(*inputs)
        w = torch.linspace(-1.0, 1.0, out.shape[1], dtype=torch.float64)
        loss = (out * w).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        assert all(gr.requires_grad for gr in grads)
        return torch.autograd.grad(loss + sum(gr.square().sum() for gr in grads), inputs)

    got = penalised(lambda *t: fast_bilinear_pool(*t, triu=triu, save_output=save_output))
    want = penalised(lambda *t: naive_chain(*t, triu=triu))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_gradgradcheck_of_the_fused_op():
    # No exact zeros in G (f'' jumps at 0): features of both signs, no ReLU.
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fast_bilinear_pool(t, triu=True), (x,))
    assert torch.autograd.gradgradcheck(lambda s, t: fast_bilinear_pool(s, t), (x, y))


def test_first_derivative_unchanged_under_create_graph():
    x = torch.randn(2, 6, 4, 4).relu_().requires_grad_()
    w = torch.randn(36)
    plain = torch.autograd.grad((fast_bilinear_pool(x) * w).sum(), x)[0]
    graph = torch.autograd.grad((fast_bilinear_pool(x) * w).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(graph.detach(), plain, **TOL[torch.float32])


@pytest.mark.parametrize("kwargs", [{}, {"triu": True}, {"reduction": "sum"}], ids=["full", "triu", "sum"])
def test_jit_trace_records_the_definition(kwargs):
    """torch.jit.trace used to fail inside the autograd function (the mean's scale is a
    traced size there); the trace now holds the plain ops and follows new shapes."""
    x = torch.randn(2, 6, 3, 3).relu_()
    traced = torch.jit.trace(lambda t: fast_bilinear_pool(t, **kwargs), (x,), check_trace=False)
    x2 = torch.randn(3, 6, 5, 4).relu_().requires_grad_()
    torch.testing.assert_close(traced(x2), fast_bilinear_pool(x2, **kwargs), **TOL[torch.float32])
    g_traced = torch.autograd.grad(traced(x2).square().sum(), x2)[0]
    g_eager = torch.autograd.grad(fast_bilinear_pool(x2, **kwargs).square().sum(), x2)[0]
    torch.testing.assert_close(g_traced, g_eager, rtol=1e-4, atol=1e-5)


def test_jit_trace_of_two_streams():
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3)
    traced = torch.jit.trace(lambda s, t: fast_bilinear_pool(s, t), (a, b), check_trace=False)
    a2, b2 = torch.randn(1, 4, 6, 6), torch.randn(1, 5, 6, 6)
    torch.testing.assert_close(traced(a2, b2), fast_bilinear_pool(a2, b2), **TOL[torch.float32])


@pytest.mark.parametrize("fn", [bilinear_pool, fast_bilinear_pool])
def test_mixed_precision_streams_promote_in_either_order(fn):
    """The compute dtype used to come from x_a alone: (float32, float64) gave float32 and
    (float64, float32) float64. Now either order computes and returns float64."""
    a = torch.randn(2, 3, 4, 4)
    b = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    ab, ba = fn(a, b), fn(b, a)
    assert ab.dtype == ba.dtype == torch.float64
    torch.testing.assert_close(ab.reshape(2, 3, 5), ba.reshape(2, 5, 3).transpose(1, 2), **TOL[torch.float64])
    want = fn(a.double(), b)
    torch.testing.assert_close(ab, want, **TOL[torch.float64])


@pytest.mark.parametrize("flag", ["signed_sqrt", "l2_normalize", "triu", "save_output"])
def test_flags_must_be_bools(flag):
    with pytest.raises(TypeError, match=f"{flag} must be True or False, but got 'no'"):
        fast_bilinear_pool(torch.randn(1, 2, 2, 2), **{flag: "no"})


@pytest.mark.parametrize("flag", ["signed_sqrt", "l2_normalize", "triu", "save_output"])
def test_flags_of_numpy_or_torch_say_how_to_pass_them(flag):
    """A NumPy bool was refused as "np.True_ (bool)": refused for not being a bool while
    named one. The type is now named in full, with the fix."""
    np = pytest.importorskip("numpy")
    for value, kind in [(np.True_, "numpy.bool_?"), (torch.tensor(False), "torch.Tensor")]:
        with pytest.raises(TypeError, match=rf"{flag} must be True or False, but got .* \({kind}\): pass a "
                           rf"Python bool, bool\({flag}\)$"):
            fast_bilinear_pool(torch.randn(1, 2, 2, 2), **{flag: value})
    with pytest.raises(TypeError, match=r"but got tensor\(\[True\]\) \(torch.Tensor\)$"):  # not one bool
        fast_bilinear_pool(torch.randn(1, 2, 2, 2), **{flag: torch.tensor([True])})


def test_tokens_of_different_lengths_are_not_told_to_resize():
    from bilinearpool import BilinearPool

    with pytest.raises(ValueError, match="number of tokens N") as info:
        BilinearPool(resize="bilinear")(torch.randn(2, 9, 6), torch.randn(2, 4, 6))
    assert "resize=" not in str(info.value) and "cannot be resized" in str(info.value)
    with pytest.raises(ValueError, match="resize='bilinear'"):
        bilinear_pool(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))


class TestFunctionTransforms:
    """torch.func transforms and forward-mode AD: the fused ops run their op-by-op
    definition there (their autograd Functions have no rules for them)."""

    @staticmethod
    def reference(x, y=None, triu=False):
        g = bilinear_pool(x, y)
        z = signed_sqrt(g, eps=1e-5)
        return l2_normalize(triu_pack(z) if triu else z.flatten(1))

    CASES = [
        pytest.param({}, False, id="one-stream"),
        pytest.param({"triu": True}, False, id="triu"),
        pytest.param({"save_output": True}, False, id="save-output"),
        pytest.param({}, True, id="two-streams"),
    ]

    @pytest.mark.parametrize("options, two", CASES)
    def test_grad_vmap_jacrev_jvp_and_dual_tensors(self, options, two):
        torch.manual_seed(0)
        x = torch.relu(torch.randn(3, 5, 4, 4, dtype=torch.float64))
        y = torch.relu(torch.randn(3, 4, 4, 4, dtype=torch.float64)) if two else None
        triu = options.get("triu", False)
        ours = lambda x: fast_bilinear_pool(x, y, **options)  # noqa: E731
        ref = lambda x: self.reference(x, y, triu)  # noqa: E731
        loss = lambda f: lambda x: f(x).square().sum() + f(x)[:, 0].sum()  # noqa: E731
        torch.testing.assert_close(torch.func.grad(loss(ours))(x), torch.func.grad(loss(ref))(x))
        torch.testing.assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(ref)(x))
        t = torch.randn_like(x)
        expected = torch.func.jvp(ref, (x,), (t,))[1]
        torch.testing.assert_close(torch.func.jvp(ours, (x,), (t,))[1], expected)
        with torch.autograd.forward_ad.dual_level():
            out = ours(torch.autograd.forward_ad.make_dual(x, t))
            torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(out).tangent, expected)
        if not two:  # vmap over a stack of batches
            stack = torch.stack([x, x.flip(0)])
            torch.testing.assert_close(torch.func.vmap(ours)(stack), torch.stack([ref(x), ref(x.flip(0))]))

    def test_per_sample_gradients_of_a_linear_head(self):
        torch.manual_seed(0)
        x = torch.relu(torch.randn(4, 5, 3, 3, dtype=torch.float64))
        w = torch.randn(3, 25, dtype=torch.float64)
        per_sample = torch.func.vmap(
            torch.func.grad(lambda w, xi: fast_bilinear_linear(xi[None], w).logsumexp(1).sum()), in_dims=(None, 0)
        )(w, x)
        loop = torch.stack(
            [torch.func.grad(lambda w: (self.reference(xi[None]) @ w.T).logsumexp(1).sum())(w) for xi in x]
        )
        torch.testing.assert_close(per_sample, loop)


def test_triton_launches_switch_to_the_tensors_gpu(monkeypatch):
    """Triton launches on the current CUDA device: a tensor on another GPU (a model on
    cuda:1 without torch.cuda.set_device) needs that device made current for the launch;
    no switch when it is current, for the CPU, or for a device without an index."""
    import contextlib

    from bilinearpool.functional import _elementwise

    current = [0]  # the current device, as torch.cuda.device makes it
    launched = []

    @contextlib.contextmanager
    def device(d):
        current.append(torch.device(d).index)
        try:
            yield
        finally:
            current.pop()

    class Kernel:  # kernel[grid](*args, **kwargs), as Triton's JIT functions are called
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, current[-1], args, kwargs))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[-1])
    monkeypatch.setattr(torch.cuda, "device", device)
    _elementwise.launch(Kernel(), (2, 3), torch.device("cuda", 1), "x", 7, BLOCK=16)
    assert launched == [((2, 3), 1, ("x", 7), {"BLOCK": 16})] and current == [0]
    for other in (torch.device("cuda", 0), torch.device("cuda"), torch.device("cpu")):
        launched.clear()
        _elementwise.launch(Kernel(), (1,), other)
        assert launched == [((1,), 0, (), {})], other


def test_every_triton_launch_goes_through_the_device_switch(monkeypatch):
    """The four launch sites (the normalisation's two steps forward and backward, the
    head's kernel, wide_linear's) launch by _elementwise.launch, with their tensors' device:
    a kernel called directly fails here."""
    from types import SimpleNamespace

    from bilinearpool.functional import _elementwise as E
    from bilinearpool.functional import head as H
    from bilinearpool.functional import linear as L

    class Direct:
        def __getitem__(self, grid):
            raise AssertionError("a kernel launched without _elementwise.launch")

    names = ("sumsq_kernel", "normalize_kernel", "stats_kernel", "grad_kernel", "sqrt_linear_kernel",
             "wide_linear_kernel")  # fmt: skip
    kernels = SimpleNamespace(**{name: Direct() for name in names})
    launched = []
    monkeypatch.setattr(E, "_kernels", lambda: kernels)
    monkeypatch.setattr(E, "launch", lambda kernel, grid, device, *a, **k: launched.append((kernel, device)))
    g, dz = torch.randn(2, 9), torch.randn(2, 9)
    E.normalize_(g, 1e-5, 1e-10, use="triton")
    E.normalize_grad_(g, dz, 1e-5, 1e-10, use="triton")
    H._kernel_logits(torch.randn(2, 3, 4), torch.randn(2, 9), None, 0.25, 1e-5, 1e-10, False)
    L._forward(torch.randn(2, 9), torch.randn(2, 9), None)
    cpu = torch.device("cpu")
    assert launched == [(getattr(kernels, name), cpu) for name in names]
