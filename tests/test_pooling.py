"""BilinearPool, FastBilinearPool, SignedSqrt, L2Normalize: module behaviour."""

from __future__ import annotations

import copy

import io
import pickle

import pytest
import torch
from _compile import assert_compiled_matches

from bilinearpool import (
    BilinearPool,
    CompactBilinearPool,
    CovariancePool,
    FastBilinearPool,
    L2Normalize,
    LowRankBilinearPool,
    MatrixSqrt,
    SignedSqrt,
)
from bilinearpool.functional import bilinear_pool, fast_bilinear_pool, l2_normalize, signed_sqrt

SHAPES = [(1, 1, 1, 1), (2, 3, 7, 7), (4, 16, 5, 3), (3, 64, 2, 9)]


def roundtrip(module: torch.nn.Module) -> torch.nn.Module:
    clone = pickle.loads(pickle.dumps(module))
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    clone.load_state_dict(torch.load(buffer))
    return clone


class TestBilinearPoolModule:
    def test_smoke(self):
        pool = BilinearPool()
        assert pool(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3)).shape == (2, 4, 5)
        assert "reduction='mean'" in repr(pool)

    @pytest.mark.parametrize("shape", SHAPES)
    def test_cardinality(self, shape):
        b, c, h, w = shape
        x_a, x_b = torch.randn(*shape), torch.randn(b, c + 2, h, w)
        assert BilinearPool()(x_a, x_b).shape == (b, c, c + 2)
        assert BilinearPool(normalize=True)(x_a, x_b).shape == (b, c * (c + 2))
        assert BilinearPool()(x_a).shape == (b, c, c)
        assert BilinearPool().output_dim(c, c + 2) == c * (c + 2)

    def test_module_equals_function(self):
        x_a, x_b = torch.randn(2, 4, 3, 3).relu(), torch.randn(2, 5, 3, 3).relu()
        torch.testing.assert_close(BilinearPool(reduction="sum")(x_a, x_b), bilinear_pool(x_a, x_b, reduction="sum"))
        torch.testing.assert_close(BilinearPool(normalize=True)(x_a, x_b), fast_bilinear_pool(x_a, x_b))
        # reduction reaches the fused op too (sum and mean differ through the signed sqrt's eps)
        x_a, x_b = x_a.double(), x_b.double()
        summed = BilinearPool(normalize=True, reduction="sum", eps=1e-2)(x_a, x_b)
        torch.testing.assert_close(summed, fast_bilinear_pool(x_a, x_b, reduction="sum", eps=1e-2))
        assert not torch.allclose(summed, fast_bilinear_pool(x_a, x_b, eps=1e-2))
        x_a, x_b = x_a.float(), x_b.float()
        # eps reaches the op (default and another value give different features)
        torch.testing.assert_close(
            BilinearPool(normalize=True, eps=1e-1)(x_a, x_b), fast_bilinear_pool(x_a, x_b, eps=1e-1)
        )
        assert not torch.allclose(BilinearPool(normalize=True, eps=1e-1)(x_a, x_b), fast_bilinear_pool(x_a, x_b))

    def test_same_tensor_twice_is_self_pooling(self):
        x = torch.randn(2, 6, 4, 4).relu()
        torch.testing.assert_close(BilinearPool(normalize=True)(x, x), fast_bilinear_pool(x))

    @pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic", "area"])
    def test_resize(self, mode):
        x_a, x_b = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 3, 3)
        with pytest.raises(ValueError, match=r"same spatial size .* \(2, 3, 3, 3\)"):
            BilinearPool()(x_a, x_b)
        align = False if mode in ("bilinear", "bicubic") else None
        up = torch.nn.functional.interpolate(x_b, size=(8, 8), mode=mode, align_corners=align)
        torch.testing.assert_close(BilinearPool(resize=mode)(x_a, x_b), bilinear_pool(x_a, up))
        others = [m for m in ("nearest", "bilinear") if m != mode][0]  # the modes differ here
        assert not torch.allclose(BilinearPool(resize=others)(x_a, x_b), bilinear_pool(x_a, up))

    def test_exception(self):
        with pytest.raises(ValueError, match="resize must be None or one of"):
            BilinearPool(resize="cubic")
        with pytest.raises(ValueError, match="reduction must be one of"):
            BilinearPool(reduction="max")
        with pytest.raises(ValueError, match=r"same batch size, but got 2 .* and 3"):
            BilinearPool()(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))

    def test_gradcheck(self):
        x_a = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
        x_b = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(BilinearPool(normalize=True, eps=1e-2), (x_a, x_b))

    def test_state_dict_pickle(self):
        pool = BilinearPool(resize="nearest", normalize=True)
        x_a, x_b = torch.randn(2, 4, 6, 6), torch.randn(2, 3, 3, 3)
        torch.testing.assert_close(roundtrip(pool)(x_a, x_b), pool(x_a, x_b))

    def test_compile(self):
        pool = BilinearPool(normalize=True)
        x_a, x_b = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3)
        torch.testing.assert_close(torch.compile(pool, backend="eager")(x_a, x_b), pool(x_a, x_b))

    def test_save_output(self):
        x_a = torch.randn(2, 4, 3, 3, dtype=torch.float64).relu().requires_grad_()
        x_b = torch.randn(2, 5, 3, 3, dtype=torch.float64).relu().requires_grad_()
        pool = BilinearPool(normalize=True, save_output=True)
        assert "save_output=True" in repr(pool)
        out, ref = pool(x_a, x_b), BilinearPool(normalize=True)(x_a, x_b)
        torch.testing.assert_close(out, ref)
        dz = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, (x_a, x_b), dz), torch.autograd.grad(ref, (x_a, x_b), dz)):
            torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match="save_output=True applies to the fused normalized op"):
            BilinearPool(save_output=True)


class TestFastBilinearPoolModule:
    def test_smoke(self):
        pool = FastBilinearPool()
        assert pool(torch.randn(2, 8, 3, 3)).shape == (2, 64)
        assert "triu=False" in repr(pool)

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("triu", [False, True])
    def test_cardinality(self, shape, triu):
        b, c, h, w = shape
        pool = FastBilinearPool(triu=triu)
        out = pool(torch.randn(*shape))
        assert out.shape == (b, pool.output_dim(c))
        assert out.shape[1] == (c * (c + 1) // 2 if triu else c * c)
        assert pool(torch.randn(b, h * w, c)).shape == out.shape  # tokens

    def test_module_equals_function(self):
        x = torch.randn(3, 5, 4, 4).relu()
        pool = FastBilinearPool(triu=True, eps=1e-3, reduction="sum")
        torch.testing.assert_close(pool(x), fast_bilinear_pool(x, triu=True, eps=1e-3, reduction="sum"))

    def test_noncontiguous(self):
        x = torch.randn(2, 10, 5, 5).relu()
        pool = FastBilinearPool()
        torch.testing.assert_close(pool(x[:, ::2]), pool(x[:, ::2].contiguous()))
        torch.testing.assert_close(pool(x.to(memory_format=torch.channels_last)), pool(x))

    def test_exception(self):
        with pytest.raises(ValueError, match="eps must be a finite number >= 1.175e-38"):
            FastBilinearPool(eps=0)
        with pytest.raises(ValueError, match="eps applies to signed_sqrt=True only, but signed_sqrt=False"):
            FastBilinearPool(signed_sqrt=False, eps=1e-5)
        with pytest.raises(ValueError, match="eps applies to normalize=True only, but normalize=False; drop eps"):
            BilinearPool(eps=1e-5)
        assert BilinearPool().eps is None and BilinearPool(normalize=True).eps == 1e-5
        assert FastBilinearPool(signed_sqrt=False).eps is None and FastBilinearPool().eps == 1e-5
        # a layer pickled before holds the old default there: it still runs, as before
        old = pickle.loads(pickle.dumps(FastBilinearPool(signed_sqrt=False)))
        old.eps = 1e-5
        x = torch.randn(2, 3, 4, 4).relu()
        torch.testing.assert_close(old(x), FastBilinearPool(signed_sqrt=False)(x), rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"\(B, C, H, W\) .* 5-D tensor"):
            FastBilinearPool()(torch.randn(1, 2, 3, 4, 5))
        with pytest.raises(TypeError, match="floating-point"):
            FastBilinearPool()(torch.ones(1, 2, 3, 3, dtype=torch.int32))
        with pytest.raises(ValueError, match="one stream"):
            FastBilinearPool().output_dim(3, 4)

    @pytest.mark.parametrize("triu", [False, True])
    def test_gradcheck(self, triu):
        x = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(FastBilinearPool(triu=triu, eps=1e-2), (x,))

    def test_state_dict_pickle(self):
        pool = FastBilinearPool(triu=True)
        x = torch.randn(2, 6, 3, 3)
        clone = roundtrip(pool)
        assert clone.triu and torch.equal(clone(x), pool(x))

    @pytest.mark.parametrize("save_output", [False, True])
    @pytest.mark.parametrize("triu", [False, True])
    def test_compile(self, triu, save_output):
        pool = FastBilinearPool(triu=triu, save_output=save_output)
        x = torch.randn(2, 6, 3, 3).relu().requires_grad_()
        out = torch.compile(pool, backend="eager")(x)
        torch.testing.assert_close(out, pool(x))
        dz = torch.randn_like(out)
        (got,) = torch.autograd.grad(out, x, dz)
        (want,) = torch.autograd.grad(FastBilinearPool(triu=triu)(x), x, dz)
        torch.testing.assert_close(got, want)

    @pytest.mark.parametrize("pool", [FastBilinearPool(), BilinearPool(normalize=True)], ids=["fast", "two-stream"])
    def test_modules_pickled_before_save_output_load(self, pool):
        old = copy.deepcopy(pool)
        del old.__dict__["save_output"]  # as pickled by a version without the option
        clone = pickle.loads(pickle.dumps(old))
        assert clone.save_output is False
        x = torch.randn(2, 4, 3, 3).relu()
        torch.testing.assert_close(clone(x), pool(x))

    @pytest.mark.parametrize("triu", [False, True])
    def test_save_output(self, triu):
        x = torch.randn(3, 5, 4, 4, dtype=torch.float64).relu().requires_grad_()
        pool = FastBilinearPool(triu=triu, save_output=True)
        assert "save_output=True" in repr(pool) and "save_output" not in repr(FastBilinearPool())
        assert pool.options()["save_output"] is True
        out, ref = pool(x), FastBilinearPool(triu=triu)(x)
        torch.testing.assert_close(out, ref)
        dz = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, x, dz)[0], torch.autograd.grad(ref, x, dz)[0])
        clone = roundtrip(pool)
        assert clone.save_output


@pytest.mark.parametrize(
    "case",
    [
        dict(module=FastBilinearPool(), streams=1),
        dict(module=FastBilinearPool(triu=True), streams=1),
        dict(module=FastBilinearPool(signed_sqrt=False, l2_normalize=False), streams=1),
        dict(module=BilinearPool(normalize=True), streams=2),
    ],
    ids=["fast", "fast-triu", "fast-plain", "two-stream"],
)
def test_fused_pooling_exports_to_onnx(case):
    """The fused op exports (its forward as plain operations) and onnxruntime agrees."""
    from _onnx import run_onnx

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 6 + i, 3, 4, generator=g).relu() for i in range(case["streams"])]
    exported = torch.from_numpy(run_onnx(case["module"], *inputs))
    torch.testing.assert_close(exported, case["module"](*inputs), rtol=1e-5, atol=1e-6)


class TestNormModules:
    def test_signed_sqrt_module(self):
        x = torch.randn(3, 7)
        torch.testing.assert_close(SignedSqrt(eps=1e-3)(x), signed_sqrt(x, eps=1e-3))
        assert "eps=0.001" in repr(SignedSqrt(eps=1e-3))
        with pytest.raises(ValueError, match="eps must be a finite number >= 1.175e-38"):
            SignedSqrt(eps=-1.0)

    def test_l2_module(self):
        x = torch.randn(3, 4, 4)
        torch.testing.assert_close(L2Normalize()(x), l2_normalize(x))
        # eps reaches the function: a norm below it is divided by eps, not by the norm
        small = x / x.flatten(1).norm(dim=1).view(-1, 1, 1) * torch.tensor([0.5, 2.0, 5.0]).view(-1, 1, 1)
        torch.testing.assert_close(L2Normalize(eps=1.0)(small), l2_normalize(small, eps=1.0))
        torch.testing.assert_close(L2Normalize(eps=1.0)(small)[0], small[0])
        assert "eps=1.0" in repr(L2Normalize(eps=1.0))
        for eps in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="eps must be a finite number >= 1.175e-38"):
                L2Normalize(eps=eps)

    def test_gradcheck(self):
        x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(torch.nn.Sequential(SignedSqrt(), L2Normalize()), (x,))

    def test_compile_and_pickle(self):
        chain = torch.nn.Sequential(SignedSqrt(), L2Normalize())
        x = torch.randn(4, 9)
        torch.testing.assert_close(torch.compile(chain, backend="eager")(x), chain(x))
        torch.testing.assert_close(roundtrip(chain)(x), chain(x))


@pytest.mark.parametrize(
    "module",
    [FastBilinearPool(), FastBilinearPool(triu=True), BilinearPool(normalize=True), SignedSqrt(), L2Normalize()],
    ids=["fast", "fast-triu", "two-stream", "signed-sqrt", "l2"],
)
def test_compile_dynamic_fullgraph(module):
    """torch.compile(dynamic=True, fullgraph=True): the modules' eps is then a symbolic
    float, which the argument checks must take (math.isfinite on it broke the graph)."""
    x = torch.randn(3, 6, 4, 4).relu().requires_grad_()
    if isinstance(module, (SignedSqrt, L2Normalize)):
        x = x.detach().flatten(1).requires_grad_()
    compiled = assert_compiled_matches(module, x, dynamic=True, fullgraph=True)
    torch.testing.assert_close(compiled(x[:2]), module(x[:2]))  # another batch size, same graph


@pytest.mark.slow
@pytest.mark.parametrize("module", [FastBilinearPool(triu=True), BilinearPool(normalize=True)], ids=["fast", "two-stream"])
def test_compile_inductor(module):
    """Full torch.compile (inductor code generation): about a minute on 2 CPU cores."""
    x = torch.randn(2, 6, 4, 4).relu().requires_grad_()
    out = torch.compile(module)(x)
    torch.testing.assert_close(out, module(x))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "build,dim",
    [
        (lambda: FastBilinearPool(), 256),
        (lambda: FastBilinearPool(triu=True), 136),
        (lambda: CompactBilinearPool(in_channels=16, out_features=64, algorithm="fft"), 64),
        (lambda: CompactBilinearPool(in_channels=16, out_features=64, algorithm="gram"), 64),
        (lambda: CompactBilinearPool(in_channels=16, out_features=64, method="random_maclaurin"), 64),
        (lambda: CovariancePool(norm=MatrixSqrt()), 136),
        (lambda: CovariancePool(norm=MatrixSqrt(method="eig")), 136),
        (lambda: LowRankBilinearPool(in_channels=16, rank=8, out_features=4), 4),
    ],
    ids=["fast", "fast-triu", "sketch-fft", "sketch-gram", "maclaurin", "cov-ns", "cov-eig", "lowrank"],
)
def test_empty_batch(build, dim):
    """A batch of zero samples gives (0, D), and backward runs (e.g. the last shard of a split)."""
    x = torch.randn(0, 16, 4, 4, requires_grad=True)
    out = build()(x)
    assert out.shape == (0, dim)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
