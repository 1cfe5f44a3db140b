from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bilinearpool.functional.lowrank import low_rank_bilinear_pool
from bilinearpool.lowrank import LowRankBilinearPool

from _onnx import run_onnx


def features(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def naive(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: z_j = u_j^T G v_j with the full bilinear matrix G = X Y^T / N."""
    a, b = x.flatten(2), y.flatten(2)
    g = a @ b.transpose(1, 2) / a.shape[2]
    return torch.einsum("ri,bij,rj->br", u, g, v)


class TestLowRankBilinearPool:
    def test_smoke(self) -> None:
        out = LowRankBilinearPool(in_channels=8, rank=4)(features(2, 8, 3, 3))
        assert out.shape == (2, 4)
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 4, 2), (2, 16, 7, 7), (2, 9, 6)])
    @pytest.mark.parametrize("rank", [1, 7])
    @pytest.mark.parametrize("out_features", [None, 3])
    @pytest.mark.parametrize("shared", [False, True])
    def test_cardinality(self, shape: tuple[int, ...], rank: int, out_features: int | None, shared: bool) -> None:
        c = shape[1] if len(shape) == 4 else shape[2]
        pool = LowRankBilinearPool(in_channels=c, rank=rank, out_features=out_features, shared=shared)
        assert pool(features(*shape)).shape == (shape[0], pool.output_dim(c)) == (shape[0], out_features or rank)
        if not shared:
            y_shape = (*shape[:1], 2, *shape[2:]) if len(shape) == 4 else (*shape[:2], 2)
            two = LowRankBilinearPool(in_channels=c, in_channels_b=2, rank=rank, out_features=out_features)
            assert two(features(*shape), features(*y_shape)).shape == (shape[0], out_features or rank)

    def test_initialisation_is_nn_linears(self) -> None:
        """Projections uniform in +-1/sqrt(C) of their own stream (as nn.Linear)."""
        torch.manual_seed(0)
        layer = LowRankBilinearPool(in_channels=256, in_channels_b=16, rank=64)
        for w, c in ((layer.weight_a, 256), (layer.weight_b, 16)):
            bound = c**-0.5
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
            assert abs(w.std().item() - bound / 3**0.5) < 0.1 * bound

    def test_out_bias_of_the_wrong_length_is_refused(self) -> None:
        a, wa, wb, ow = torch.randn(2, 4, 3, 3), torch.randn(5, 4), torch.randn(5, 4), torch.randn(10, 5)
        with pytest.raises(ValueError, match=r"out_bias must have shape \(10,\), but got \(1,\)"):
            low_rank_bilinear_pool(a, weight_a=wa, weight_b=wb, out_weight=ow, out_bias=torch.randn(1))

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="rank must be a positive int, but got 0"):
            LowRankBilinearPool(in_channels=4, rank=0)
        with pytest.raises(ValueError, match="out_features must be a positive int, but got -2"):
            LowRankBilinearPool(in_channels=4, rank=2, out_features=-2)
        with pytest.raises(ValueError, match="shared=True uses one projection for one stream, but got in_channels_b=3"):
            LowRankBilinearPool(in_channels=4, in_channels_b=3, rank=2, shared=True)
        pool = LowRankBilinearPool(in_channels=4, rank=2)
        with pytest.raises(ValueError, match=r"x \(in_channels\) must have 4 channels, but got shape \(1, 5, 2, 2\)"):
            pool(torch.zeros(1, 5, 2, 2))
        with pytest.raises(ValueError, match=r"feature map \(B, C, H, W\) or a token sequence"):
            pool(torch.zeros(4, 4))
        with pytest.raises(ValueError, match="shared=True pools one stream"):
            LowRankBilinearPool(in_channels=4, rank=2, shared=True)(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))
        with pytest.raises(ValueError, match=r"two streams \(in_channels_b=3\)"):
            LowRankBilinearPool(in_channels=4, in_channels_b=3, rank=2)(torch.zeros(1, 4, 2, 2))
        with pytest.raises(ValueError, match=r"weight_b must have shape \(2, 4\).*got \(3, 4\)"):
            low_rank_bilinear_pool(torch.zeros(1, 4, 2, 2), weight_a=torch.ones(2, 4), weight_b=torch.ones(3, 4))
        with pytest.raises(ValueError, match=r"out_weight must have shape \(D, 2\), but got \(5, 3\)"):
            low_rank_bilinear_pool(torch.zeros(1, 4, 2, 2), weight_a=torch.ones(2, 4), out_weight=torch.ones(5, 3))
        with pytest.raises(TypeError, match=r"out_weight must be a torch.Tensor or None, but got list"):
            low_rank_bilinear_pool(torch.zeros(1, 4, 2, 2), weight_a=torch.ones(2, 4), out_weight=[[1.0, 1.0]])

    def test_noncontiguous_and_channels_last(self) -> None:
        pool = LowRankBilinearPool(in_channels=6, rank=5, out_features=3, dtype=torch.float64)
        x = features(2, 6, 5, 4, dtype=torch.float64)
        ref = pool(x)
        torch.testing.assert_close(pool(x.to(memory_format=torch.channels_last)), ref)
        strided = torch.zeros(2, 12, 5, 8, dtype=torch.float64)[:, ::2, :, ::2].copy_(x)
        torch.testing.assert_close(pool(strided), ref)
        torch.testing.assert_close(pool(x.flatten(2).transpose(1, 2)), ref)

    @pytest.mark.parametrize("kwargs", [{}, {"shared": True}, {"act_layer": nn.Tanh, "out_features": 2}])
    def test_gradcheck(self, kwargs: dict) -> None:
        pool = LowRankBilinearPool(in_channels=3, rank=4, dtype=torch.float64, **kwargs)
        x = features(2, 3, 2, 2, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(pool, (x,))
        params = tuple(pool.parameters())
        assert torch.autograd.gradcheck(lambda *p: torch.func.functional_call(pool, dict(zip(dict(pool.named_parameters()), p)), (x,)), params)

    def test_module_equals_function(self) -> None:
        pool = LowRankBilinearPool(in_channels=5, in_channels_b=3, rank=4, out_features=2, act_layer=nn.Tanh)
        x, y = features(2, 5, 3, 3), features(2, 3, 3, 3, seed=1)
        ref = low_rank_bilinear_pool(
            x, y, weight_a=pool.weight_a, weight_b=pool.weight_b, out_weight=pool.proj.weight,
            out_bias=pool.proj.bias, activation=torch.tanh,
        )
        torch.testing.assert_close(pool(x, y), ref)

    @settings(max_examples=20, deadline=None)
    @given(c1=st.integers(1, 6), c2=st.integers(1, 6), n=st.integers(1, 9), r=st.integers(1, 5), seed=st.integers(0, 2**16))
    def test_equals_projection_of_full_bilinear_matrix(self, c1: int, c2: int, n: int, r: int, seed: int) -> None:
        x, y = features(2, c1, n, 1, dtype=torch.float64, seed=seed), features(2, c2, n, 1, dtype=torch.float64, seed=seed + 1)
        u, v = features(r, c1, dtype=torch.float64, seed=seed + 2), features(r, c2, dtype=torch.float64, seed=seed + 3)
        torch.testing.assert_close(low_rank_bilinear_pool(x, y, weight_a=u, weight_b=v), naive(x, y, u, v))
        # Shared projection (Kong & Fowlkes): z_j = u_j^T G u_j >= 0.
        z = low_rank_bilinear_pool(x, weight_a=u)
        torch.testing.assert_close(z, naive(x, x, u, u))
        assert (z >= 0).all()

    def test_pickle_and_state_dict(self) -> None:
        pool = LowRankBilinearPool(in_channels=6, rank=4, out_features=3, act_layer=nn.Tanh)
        x = features(2, 6, 3, 3)
        torch.testing.assert_close(pickle.loads(pickle.dumps(pool))(x), pool(x))
        other = LowRankBilinearPool(in_channels=6, rank=4, out_features=3, act_layer=nn.Tanh)
        other.load_state_dict(pool.state_dict())
        torch.testing.assert_close(other(x), pool(x))
        assert set(pool.state_dict()) == {"weight_a", "weight_b", "proj.weight", "proj.bias"}
        assert "rank=4, out_features=3" in repr(pool)

    @pytest.mark.parametrize("shared", [False, True])
    def test_compile(self, shared: bool) -> None:
        pool = LowRankBilinearPool(in_channels=6, rank=4, out_features=3, shared=shared, act_layer=nn.Tanh)
        compiled = torch.compile(pool, backend="aot_eager")
        x = features(2, 6, 3, 3).requires_grad_()
        torch.testing.assert_close(compiled(x), pool(x))
        compiled(x).sum().backward()
        assert torch.isfinite(x.grad).all() and pool.weight_a.grad is not None

    def test_autocast(self) -> None:
        # Stated behaviour: computed in float32 under autocast and for bfloat16 input; float32 out.
        pool = LowRankBilinearPool(in_channels=6, rank=4, out_features=3)
        x = features(2, 6, 3, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pool(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, pool(x))
        assert pool(x.bfloat16()).dtype == torch.float32

    def test_float64_layer_on_float32_maps_is_computed_in_float64(self) -> None:
        """The weights were cut down to the maps' float32 (nn.Linear refuses the pair;
        the pools promote, as torch's type promotion would, and lose nothing)."""
        pool = LowRankBilinearPool(in_channels=6, rank=4, out_features=3, dtype=torch.float64)
        x = features(2, 6, 3, 3)
        out = pool(x)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, pool(x.double()), rtol=0, atol=0)

    @pytest.mark.parametrize("shared", [False, True])
    def test_onnx(self, shared: bool) -> None:
        pool = LowRankBilinearPool(in_channels=6, rank=4, out_features=3, shared=shared, act_layer=nn.Tanh)
        x = features(2, 6, 3, 3)
        torch.testing.assert_close(torch.from_numpy(run_onnx(pool, x)), pool(x), atol=1e-5, rtol=1e-4)


def test_out_bias_of_the_wrong_type_is_a_type_error():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(TypeError, match="out_bias must be a torch.Tensor or None, but got list"):
        low_rank_bilinear_pool(x, weight_a=torch.randn(6, 4), out_weight=torch.randn(2, 6), out_bias=[0.0, 0.0])


def test_flags_and_act_layer_are_validated():
    with pytest.raises(TypeError, match="shared must be True or False, but got 'no'"):
        LowRankBilinearPool(in_channels=4, rank=2, shared="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bias must be True or False, but got 0"):
        LowRankBilinearPool(in_channels=4, rank=2, out_features=3, bias=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"act_layer must be a factory .* but got Tanh\(\)"):
        LowRankBilinearPool(in_channels=4, rank=2, act_layer=nn.Tanh())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"act_layer must be a factory .* calling .*tanh.* without arguments failed"):
        LowRankBilinearPool(in_channels=4, rank=2, act_layer=torch.tanh)  # type: ignore[arg-type]


@pytest.mark.parametrize("two", [False, True])
def test_activation_and_output_map_against_the_formula(two):
    # (act(U X) * act(V Y)).mean over locations, then P z + b: written out independently.
    torch.manual_seed(0)
    pool = LowRankBilinearPool(
        in_channels=5, in_channels_b=3 if two else None, rank=4, out_features=6, act_layer=nn.Tanh
    ).double()
    x = features(2, 5, 3, 3, dtype=torch.float64)
    y = features(2, 3, 3, 3, dtype=torch.float64, seed=1) if two else x
    u = torch.tanh(torch.einsum("rc,bcn->brn", pool.weight_a, x.flatten(2)))
    v = torch.tanh(torch.einsum("rc,bcn->brn", pool.weight_b, y.flatten(2)))
    expected = (u * v).mean(-1) @ pool.proj.weight.T + pool.proj.bias
    torch.testing.assert_close(pool(x, y) if two else pool(x), expected)
    z = low_rank_bilinear_pool(
        x, y if two else None, weight_a=pool.weight_a, weight_b=pool.weight_b, out_weight=pool.proj.weight,
        out_bias=pool.proj.bias, activation=torch.tanh,
    )
    torch.testing.assert_close(z, expected)


def test_output_dim_checks_the_channels():
    """output_dim refuses channels the layer was not built for, as forward does (a
    classifier checks its pool through it when it is built)."""
    pool = LowRankBilinearPool(in_channels=4, rank=2, out_features=3)
    assert pool.output_dim(4) == pool.output_dim(4, 4) == 3
    with pytest.raises(ValueError, match=r"built for in_channels=4, but got streams of 5 channels"):
        pool.output_dim(5)
    two = LowRankBilinearPool(in_channels=4, in_channels_b=3, rank=2)
    assert two.output_dim(4, 3) == 2
    with pytest.raises(ValueError, match=r"but got streams of 4 and 4 channels"):
        two.output_dim(4, 4)
    with pytest.raises(ValueError, match=r"built for two streams"):
        two.output_dim(4)
    with pytest.raises(ValueError, match="shared=True, one stream, but got in_channels_b=4"):
        LowRankBilinearPool(in_channels=4, rank=2, shared=True).output_dim(4, 4)
