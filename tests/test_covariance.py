from __future__ import annotations

import io
import pickle
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st

from bilinearpool.covariance import CovariancePool
from bilinearpool.functional.bilinear import triu_pack
from bilinearpool.functional.covariance import covariance_pool
from bilinearpool.functional.sqrtm import matrix_sqrt
from bilinearpool.matrix_sqrt import MatrixSqrt

from _compile import assert_compiled_matches
from _onnx import run_onnx


def naive_covariance(x: torch.Tensor) -> torch.Tensor:
    """Reference: X Ibar X^T with the explicit N x N centring matrix of MPN-COV."""
    m = x.flatten(2) if x.dim() == 4 else x.transpose(1, 2)
    n = m.shape[2]
    ibar = (torch.eye(n, dtype=m.dtype) - torch.full((n, n), 1.0 / n, dtype=m.dtype)) / n
    return m @ ibar @ m.transpose(1, 2)


def features(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class TestCovariancePool:
    def test_smoke(self) -> None:
        out = CovariancePool()(features(2, 8, 5, 5))
        assert out.shape == (2, 36)
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 3, 4, 5), (3, 16, 7, 7), (2, 9, 1, 1), (2, 10, 6), (1, 1, 4)])
    @pytest.mark.parametrize("triu", [True, False])
    def test_cardinality(self, shape: tuple[int, ...], triu: bool) -> None:
        x = features(*shape)
        c = shape[1] if len(shape) == 4 else shape[2]
        layer = CovariancePool(triu=triu)
        assert covariance_pool(x).shape == (shape[0], c, c)
        assert layer(x).shape == (shape[0], layer.output_dim(c))
        reduced = CovariancePool(in_channels=c, reduced_channels=3, triu=triu).eval()
        assert reduced(x).shape == (shape[0], reduced.output_dim(c)) == (shape[0], 6 if triu else 9)

    def test_reduction_initialisation(self) -> None:
        """Kaiming normal over fan-out (ReLU gain): std sqrt(2 / reduced_channels)."""
        torch.manual_seed(0)
        weight = CovariancePool(in_channels=512, reduced_channels=16).reduce[0].weight
        assert weight.std().item() == pytest.approx((2 / 16) ** 0.5, rel=0.05)

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match=r"\(B, C, H, W\) or a token sequence \(B, N, C\).*2-D"):
            covariance_pool(torch.zeros(3, 4))
        with pytest.raises(TypeError, match="floating-point"):
            covariance_pool(torch.zeros(1, 2, 3, dtype=torch.int32))
        with pytest.raises(ValueError, match="reduced_channels=8 needs in_channels"):
            CovariancePool(reduced_channels=8)
        with pytest.raises(ValueError, match="in_channels must be a positive int or None, but got 0"):
            CovariancePool(in_channels=0)
        with pytest.raises(TypeError, match="norm must be an nn.Module or None, but got function"):
            CovariancePool(norm=matrix_sqrt)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"MatrixSqrt\(triu=False\)"):
            CovariancePool(norm=MatrixSqrt(triu=True))
        with pytest.raises(ValueError, match=r"in_channels=16 channels, but got shape \(2, 8, 3, 3\)"):
            CovariancePool(in_channels=16, reduced_channels=4)(torch.zeros(2, 8, 3, 3))
        with pytest.raises(ValueError, match="one stream, but got in_channels_b=3"):
            CovariancePool().output_dim(3, 3)
        # float64 input into a float32 reduction is refused, not computed in float32
        reduced = CovariancePool(in_channels=8, reduced_channels=4)
        for dtype, layer_dtype in ((torch.float64, torch.float32), (torch.bfloat16, torch.float16)):
            layer = CovariancePool(in_channels=8, reduced_channels=4, dtype=layer_dtype)
            message = rf"reduction's {layer_dtype} holds without loss .*but got {dtype}"
            with pytest.raises(TypeError, match=message):
                layer(torch.zeros(2, 8, 3, 3, dtype=dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="holds without loss"):
            reduced(torch.zeros(2, 8, 3, 3, dtype=torch.float64))  # autocast leaves float64 alone
        assert reduced.double()(torch.zeros(2, 8, 3, 3, dtype=torch.float64)).dtype == torch.float64

    @pytest.mark.parametrize("reduced_channels", [None, 2])
    @pytest.mark.parametrize("shape", [(2, 0, 4), (2, 4, 0, 3), (2, 4, 3, 0)])
    def test_no_locations_is_refused_before_the_reduction(self, shape, reduced_channels) -> None:
        """The 1x1 reduction ran first on empty input: torch's convolution error."""
        pool = CovariancePool(in_channels=4, reduced_channels=reduced_channels)
        message = rf"^input must have at least one channel and one location, but got shape {re.escape(str(shape))}$"
        with pytest.raises(ValueError, match=message):
            pool(torch.randn(shape))

    def test_noncontiguous_and_channels_last(self) -> None:
        x = features(2, 6, 5, 4, dtype=torch.float64)
        ref = covariance_pool(x)
        torch.testing.assert_close(covariance_pool(x.to(memory_format=torch.channels_last)), ref)
        strided = torch.zeros(2, 12, 5, 8, dtype=torch.float64)[:, ::2, :, ::2].copy_(x)
        assert not strided.is_contiguous()
        torch.testing.assert_close(covariance_pool(strided), ref)
        # Token layout of the same features.
        torch.testing.assert_close(covariance_pool(x.flatten(2).transpose(1, 2)), ref)

    def test_gradcheck(self) -> None:
        x = features(2, 4, 3, 3, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(covariance_pool, (x,))
        tokens = features(2, 5, 3, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: CovariancePool(norm=MatrixSqrt())(t), (tokens,))

    def test_module_equals_function(self) -> None:
        x = features(2, 7, 4, 4)
        torch.testing.assert_close(CovariancePool(triu=False)(x), covariance_pool(x).flatten(1))
        torch.testing.assert_close(CovariancePool(norm=MatrixSqrt())(x), triu_pack(matrix_sqrt(covariance_pool(x))))

    @settings(max_examples=20, deadline=None)
    @given(b=st.integers(1, 3), c=st.integers(1, 8), n=st.integers(1, 12), seed=st.integers(0, 2**16))
    def test_equals_centring_matrix_formula(self, b: int, c: int, n: int, seed: int) -> None:
        x = features(b, n, c, dtype=torch.float64, seed=seed).mul(3).add(1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        out, ref = covariance_pool(x), naive_covariance(x2)
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, x2.grad)

    def test_isqrt_cov_pipeline_rank_deficient(self) -> None:
        # iSQRT-COV on a 7x7 map with more channels than locations: finite values and gradients.
        layer = CovariancePool(in_channels=32, reduced_channels=128, norm=MatrixSqrt())
        x = features(2, 32, 7, 7).requires_grad_()
        out = layer(x)
        out.sum().backward()
        assert out.shape == (2, 128 * 129 // 2)
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()

    def test_pickle_and_state_dict(self) -> None:
        layer = CovariancePool(in_channels=8, reduced_channels=4, norm=MatrixSqrt(num_iters=3)).eval()
        x = features(2, 8, 5, 5)
        clone = pickle.loads(pickle.dumps(layer))
        torch.testing.assert_close(clone(x), layer(x))
        fresh = CovariancePool(in_channels=8, reduced_channels=4, norm=MatrixSqrt(num_iters=3)).eval()
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(fresh(x), layer(x))
        assert "reduced_channels=4" in repr(layer)

    @pytest.mark.parametrize("impl", ["iterative", "spectral"])
    def test_compile(self, impl: str) -> None:
        """One graph for iSQRT-COV, backward included."""
        layer = CovariancePool(in_channels=8, reduced_channels=4, norm=MatrixSqrt(impl=impl))
        assert_compiled_matches(layer, features(2, 8, 5, 5).requires_grad_(), fullgraph=True)

    def test_autocast(self) -> None:
        # Stated behaviour: the covariance is accumulated in float32 and returned as float32;
        # the reduction's convolution itself runs in bfloat16 under autocast.
        x = features(2, 6, 5, 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = covariance_pool(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, covariance_pool(x))
        low = covariance_pool(x.bfloat16())
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, covariance_pool(x.bfloat16().float()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled = CovariancePool(in_channels=6, reduced_channels=4, norm=MatrixSqrt())(x)
        assert pooled.dtype == torch.float32 and torch.isfinite(pooled).all()

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_input_into_a_float32_reduction(self, dtype) -> None:
        """Stated: float32 output for half input, with a reduction too (it runs in float32)."""
        layer = CovariancePool(in_channels=6, reduced_channels=4, norm=MatrixSqrt()).eval()
        x = features(2, 6, 5, 5).to(dtype)
        out = layer(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, layer(x.float()), rtol=0, atol=0)
        tokens = x.flatten(2).transpose(1, 2)
        torch.testing.assert_close(layer(tokens), layer(tokens.float()), rtol=0, atol=0)
        own = CovariancePool(in_channels=6, reduced_channels=4, dtype=dtype).eval()
        assert own(x).dtype == torch.float32  # a reduction built in the input's dtype runs in it

    def test_onnx(self) -> None:
        layer = CovariancePool(in_channels=8, reduced_channels=4, norm=MatrixSqrt(), triu=False).eval()
        x = features(2, 8, 5, 5)
        torch.testing.assert_close(torch.from_numpy(run_onnx(layer, x)), layer(x), atol=1e-5, rtol=1e-4)

    @pytest.mark.parametrize("reduced", [False, True])
    def test_jit_trace_save_load(self, reduced: bool) -> None:
        # MatrixSqrt's impl="auto" and the covariance trace as plain ops (no Python autograd
        # function): the trace saves, loads, and gives the layer's values and input gradients.
        kwargs = {"in_channels": 8, "reduced_channels": 4} if reduced else {}
        layer = CovariancePool(norm=MatrixSqrt(), **kwargs).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings
            traced = torch.jit.trace(layer, features(2, 8, 5, 5))
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
            buffer.seek(0)
            loaded = torch.jit.load(buffer)
        x1 = features(3, 8, 5, 5, seed=1).requires_grad_()
        x2 = x1.detach().clone().requires_grad_()
        out, ref = loaded(x1), layer(x2)
        torch.testing.assert_close(out, ref)
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)

    def test_rank_is_at_most_n_minus_one(self) -> None:
        # The docstring's bound: centring leaves rank <= min(C, N - 1) (N = 3 locations here).
        cov = covariance_pool(features(2, 6, 3, dtype=torch.float64).transpose(1, 2))
        assert (torch.linalg.matrix_rank(cov) == 2).all()
        assert (covariance_pool(features(2, 6, 1, 1, dtype=torch.float64)) == 0).all()

    def test_onnx_triu(self) -> None:
        # triu_pack's indices are constants in the exported graph.
        layer = CovariancePool().eval()
        x = features(2, 4, 3, 3)
        torch.testing.assert_close(torch.from_numpy(run_onnx(layer, x)), layer(x), atol=1e-5, rtol=1e-4)


class TestCovariancePoolConfiguration:
    def test_integer_input_is_a_type_error_with_reduction(self) -> None:
        pool = CovariancePool(in_channels=4, reduced_channels=2)
        with pytest.raises(TypeError, match="floating-point tensor"):
            pool(torch.zeros(1, 4, 3, 3, dtype=torch.int64))

    def test_in_channels_without_reduction_is_checked_and_shown(self) -> None:
        pool = CovariancePool(in_channels=4)
        assert "in_channels=4" in repr(pool)
        assert pool(torch.randn(2, 9, 4)).shape == (2, 10)
        with pytest.raises(ValueError, match=r"in_channels=4 channels, but got shape \(2, 5, 3, 3\)"):
            pool(torch.randn(2, 5, 3, 3))

    def test_output_dim_checks_in_channels(self) -> None:
        # As forward: a pool built for in_channels takes no other count; one without takes any.
        with pytest.raises(ValueError, match="built for in_channels=8, but output_dim got in_channels=16"):
            CovariancePool(in_channels=8).output_dim(16)
        with pytest.raises(ValueError, match="built for in_channels=8, but output_dim got in_channels=16"):
            CovariancePool(in_channels=8, reduced_channels=4).output_dim(16)
        assert CovariancePool(in_channels=8).output_dim(8) == 36
        assert CovariancePool(in_channels=8, reduced_channels=4).output_dim(8) == 10
        assert CovariancePool(triu=False).output_dim(16) == 256

    @pytest.mark.parametrize("reduced_channels", [None, 2])
    def test_act_layer_function_is_a_clear_type_error(self, reduced_channels: int | None) -> None:
        expected = r"act_layer must be a factory .*nn\.ReLU.*calling .*relu.* failed"
        with pytest.raises(TypeError, match=expected):
            CovariancePool(in_channels=4, reduced_channels=reduced_channels, act_layer=F.relu)
        pool = CovariancePool(in_channels=4, reduced_channels=2, act_layer=nn.GELU)
        assert isinstance(pool.reduce[2], nn.GELU)

    def test_reduction_settings_without_a_reduction_are_refused(self) -> None:
        """act_layer, device and dtype configure the reduction block: without one they would do nothing."""
        with pytest.raises(ValueError, match=r"act_layer applies to the reduction block .* drop act_layer=Tanh \(it would do nothing\), or give reduced_channels"):
            CovariancePool(in_channels=4, act_layer=nn.Tanh)
        with pytest.raises(ValueError, match=r"act_layer applies to the reduction block .* drop act_layer=None \(it would do nothing\)"):
            CovariancePool(act_layer=None)
        with pytest.raises(ValueError, match=r"dtype applies to the reduction's parameters, but reduced_channels is None"):
            CovariancePool(in_channels=4, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"device and dtype apply to the reduction's parameters.*drop device and dtype \(they would do nothing\), or give reduced_channels"):
            CovariancePool(device="cpu", dtype=torch.float64)
        with pytest.raises(TypeError, match="dtype must be a floating-point"):  # the dtype's own check first
            CovariancePool(dtype=torch.int64)
        # the defaults and every setting with a reduction are accepted
        CovariancePool(in_channels=4, act_layer=nn.ReLU)
        pool = CovariancePool(in_channels=4, reduced_channels=2, act_layer=nn.Tanh, device="cpu", dtype=torch.float64)
        assert pool.reduce[0].weight.dtype == torch.float64

    def test_act_layer_none_means_no_activation(self) -> None:
        pool = CovariancePool(in_channels=4, reduced_channels=2, act_layer=None).eval()
        assert isinstance(pool.reduce[2], nn.Identity)
        with pytest.raises(TypeError, match="act_layer must be a factory"):
            CovariancePool(in_channels=4, reduced_channels=2, act_layer=nn.ReLU())  # type: ignore[arg-type]
