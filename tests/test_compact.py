from __future__ import annotations

import pickle
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilinearpool.compact import CompactBilinearPool
from bilinearpool.functional.sketch import random_maclaurin, tensor_sketch

from _compile import assert_compiled_matches
from _onnx import run_onnx

METHODS = ("tensor_sketch", "random_maclaurin")
# Every way a CompactBilinearPool computes: both Tensor Sketch algorithms, and Random Maclaurin.
VARIANTS = {
    "ts-fft": {"method": "tensor_sketch", "algorithm": "fft"},
    "ts-gram": {"method": "tensor_sketch", "algorithm": "gram"},
    "rm": {"method": "random_maclaurin"},
}


def features(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def bilinear(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Full bilinear pooling G = X Y^T / N of (B, C, H, W) maps."""
    a, b = x.flatten(2), y.flatten(2)
    return a @ b.transpose(1, 2) / a.shape[2]


def naive_tensor_sketch(g: torch.Tensor, pool: CompactBilinearPool) -> torch.Tensor:
    """Reference: count sketch of the full matrix G with the hash (h1(i) + h2(j)) mod d, sign s1(i) s2(j)."""
    d = pool.out_features
    bucket = (pool.index_a[:, None] + pool.index_b[None, :]) % d
    sign = pool.sign_a[:, None] * pool.sign_b[None, :]
    sketch = torch.nn.functional.one_hot(bucket, d).to(g.dtype) * sign.to(g.dtype)[..., None]  # (C1, C2, d)
    return torch.einsum("bij,ijk->bk", g, sketch)


def naive_maclaurin(g: torch.Tensor, pool: CompactBilinearPool) -> torch.Tensor:
    """Reference: diag(W1 G W2^T) / sqrt(d)."""
    w1, w2 = pool.weight_a.to(g.dtype), pool.weight_b.to(g.dtype)
    return torch.einsum("ki,bij,kj->bk", w1, g, w2) / pool.out_features**0.5


def kernel_estimates(method: str, x: torch.Tensor, y: torch.Tensor, d: int, draws: int) -> torch.Tensor:
    """<phi(x, x), phi(y, y)> for ``draws`` independent seeds; estimates <x, y>^2."""
    pair = torch.stack([x, y]).unsqueeze(1)  # two samples of one token each
    out = []
    for seed in range(draws):
        z = CompactBilinearPool(in_channels=x.numel(), out_features=d, method=method, seed=seed, dtype=torch.float64)(pair)
        out.append(z[0] @ z[1])
    return torch.stack(out)


class TestCompactBilinearPool:
    @pytest.mark.parametrize("variant", VARIANTS)
    def test_smoke(self, variant: str) -> None:
        out = CompactBilinearPool(in_channels=8, out_features=32, **VARIANTS[variant])(features(2, 8, 3, 3))
        assert out.shape == (2, 32)
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 4, 2), (2, 16, 7, 7), (2, 9, 6), (1, 1, 3)])
    @pytest.mark.parametrize("d", [1, 17, 64])
    def test_cardinality(self, variant: str, shape: tuple[int, ...], d: int) -> None:
        x = features(*shape)
        c = shape[1] if len(shape) == 4 else shape[2]
        pool = CompactBilinearPool(in_channels=c, out_features=d, **VARIANTS[variant])
        assert pool(x).shape == (shape[0], d) == (shape[0], pool.output_dim(c))
        y_shape = (*shape[:1], 3, *shape[2:]) if len(shape) == 4 else (*shape[:2], 3)
        two = CompactBilinearPool(in_channels=c, in_channels_b=3, out_features=d, **VARIANTS[variant])
        assert two(x, features(*y_shape)).shape == (shape[0], d)

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="out_features must be a positive int, but got 0"):
            CompactBilinearPool(in_channels=4, out_features=0)
        with pytest.raises(ValueError, match="in_channels must be a positive int, but got -1"):
            CompactBilinearPool(in_channels=-1)
        with pytest.raises(ValueError, match="method must be one of .* but got 'fft'"):
            CompactBilinearPool(in_channels=4, method="fft")
        with pytest.raises(ValueError, match=r"algorithm must be one of \('auto', 'fft', 'gram'\), but got 'direct'"):
            CompactBilinearPool(in_channels=4, algorithm="direct")
        with pytest.raises(ValueError, match="algorithm='gram' applies to method='tensor_sketch' only"):
            CompactBilinearPool(in_channels=4, method="random_maclaurin", algorithm="gram")
        with pytest.raises(TypeError, match="seed must be an int, but got float"):
            CompactBilinearPool(in_channels=4, seed=1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="floating-point dtype, but got torch.int64"):
            CompactBilinearPool(in_channels=4, dtype=torch.long)
        pool = CompactBilinearPool(in_channels=4, out_features=8)
        with pytest.raises(ValueError, match=r"x \(in_channels\) must have 4 channels, but got shape \(2, 5, 3, 3\)"):
            pool(torch.zeros(2, 5, 3, 3))
        # Its arguments are x and y, and it cannot resize (the hint named BilinearPool's option).
        with pytest.raises(ValueError, match=r"x and y must have the same spatial size .*"
                           r"resize one of them first \(e\.g\. with torch\.nn\.functional\.interpolate\)"):
            pool(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 2, 3))
        with pytest.raises(ValueError, match=r"two streams \(in_channels_b=3\): call it as layer\(x, y\)"):
            CompactBilinearPool(in_channels=4, in_channels_b=3, out_features=8)(torch.zeros(1, 4, 2, 2))
        with pytest.raises(ValueError, match="weight_a and weight_b must have the same number of rows d"):
            random_maclaurin(torch.zeros(1, 4, 2, 2), weight_a=torch.ones(8, 4), weight_b=torch.ones(6, 4))

    def test_repr(self) -> None:
        pool = CompactBilinearPool(in_channels=4, out_features=8, algorithm="gram")
        assert "method='tensor_sketch', algorithm='gram', seed=0" in repr(pool)
        assert "algorithm" not in repr(CompactBilinearPool(in_channels=4, method="random_maclaurin"))

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_noncontiguous_and_channels_last(self, variant: str) -> None:
        pool = CompactBilinearPool(in_channels=6, out_features=16, dtype=torch.float64, **VARIANTS[variant])
        x = features(2, 6, 5, 4, dtype=torch.float64)
        ref = pool(x)
        torch.testing.assert_close(pool(x.to(memory_format=torch.channels_last)), ref)
        strided = torch.zeros(2, 12, 5, 8, dtype=torch.float64)[:, ::2, :, ::2].copy_(x)
        torch.testing.assert_close(pool(strided), ref)
        torch.testing.assert_close(pool(x.flatten(2).transpose(1, 2)), ref)

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_gradcheck(self, variant: str) -> None:
        pool = CompactBilinearPool(in_channels=3, in_channels_b=2, out_features=7, dtype=torch.float64, **VARIANTS[variant])
        x = features(2, 3, 2, 2, dtype=torch.float64).requires_grad_()
        y = features(2, 2, 2, 2, dtype=torch.float64, seed=1).requires_grad_()
        assert torch.autograd.gradcheck(pool, (x, y))

    @pytest.mark.parametrize("algorithm", ["auto", "fft", "gram"])
    def test_module_equals_function(self, algorithm: str) -> None:
        x = features(2, 5, 3, 3)
        ts = CompactBilinearPool(in_channels=5, out_features=16, seed=3, algorithm=algorithm)
        ref = tensor_sketch(
            x, index_a=ts.index_a, sign_a=ts.sign_a, index_b=ts.index_b, sign_b=ts.sign_b, out_features=16,
            algorithm=algorithm,
        )
        assert torch.equal(ts(x), ref)
        rm = CompactBilinearPool(in_channels=5, out_features=16, method="random_maclaurin", seed=3)
        torch.testing.assert_close(rm(x), random_maclaurin(x, weight_a=rm.weight_a, weight_b=rm.weight_b))

    @pytest.mark.parametrize("algorithm", ["fft", "gram"])
    @pytest.mark.parametrize("two_streams", [False, True])
    def test_equals_naive_sketch_of_full_matrix(self, algorithm: str, two_streams: bool) -> None:
        x = features(3, 6, 4, 4, dtype=torch.float64)
        y = features(3, 4, 4, 4, dtype=torch.float64, seed=1) if two_streams else None
        kw = {"in_channels": 6, "in_channels_b": 4 if two_streams else None, "out_features": 13, "dtype": torch.float64}
        g = bilinear(x, x if y is None else y)
        ts = CompactBilinearPool(algorithm=algorithm, **kw)
        torch.testing.assert_close(ts(x, y), naive_tensor_sketch(g, ts))
        rm = CompactBilinearPool(method="random_maclaurin", **kw)
        torch.testing.assert_close(rm(x, y), naive_maclaurin(g, rm))

    @pytest.mark.parametrize("method", METHODS)
    # derandomize: a 4-sigma bound on 400 heavy-tailed draws (kurtosis ~4.7 for Random
    # Maclaurin) fails about once in a few hundred random inputs (c=8, seed=823, corr=0.75
    # gave z = -4.1 at 400 draws and -0.65 at 4000: a fluctuation, not a bias), so the
    # inputs are drawn from a fixed seed and the test gives the same answer every run.
    @settings(max_examples=4, deadline=None, derandomize=True)
    @given(c=st.integers(2, 12), seed=st.integers(0, 2**16), corr=st.floats(-1, 1))
    def test_property_unbiased_kernel_estimate(self, method: str, c: int, seed: int, corr: float) -> None:
        # E <phi(x, x), phi(y, y)> = <x, y>^2 over the random projections.
        u, v = features(2, c, dtype=torch.float64, seed=seed).unbind(0)
        x = u / u.norm()
        y = corr * x + (1 - corr**2) ** 0.5 * (v - (v @ x) * x) / (v - (v @ x) * x).norm()
        truth = (x @ y) ** 2
        est = kernel_estimates(method, x, y, d=32, draws=400)
        stderr = est.std() / len(est) ** 0.5
        assert abs(est.mean() - truth) <= 4 * stderr + 1e-3

    @pytest.mark.parametrize("method", METHODS)
    def test_error_shrinks_with_dimension(self, method: str) -> None:
        u, v = features(2, 10, dtype=torch.float64, seed=7).unbind(0)
        x, y = u / u.norm(), v / v.norm()
        truth = (x @ y) ** 2
        mse = {d: ((kernel_estimates(method, x, y, d, draws=150) - truth) ** 2).mean() for d in (8, 128)}
        # Variance falls like 1/d (16x here); ask for a factor 4.
        assert mse[128] < mse[8] / 4

    @pytest.mark.parametrize("method", METHODS)
    def test_seeded_buffers_and_round_trip(self, method: str) -> None:
        pool = CompactBilinearPool(in_channels=6, out_features=32, method=method, seed=5)
        x = features(2, 6, 3, 3)
        assert torch.equal(CompactBilinearPool(in_channels=6, out_features=32, method=method, seed=5)(x), pool(x))
        assert not torch.equal(CompactBilinearPool(in_channels=6, out_features=32, method=method, seed=6)(x), pool(x))
        state = pool.state_dict()
        buffers = {"index_a", "sign_a", "index_b", "sign_b"} if method == "tensor_sketch" else {"weight_a", "weight_b"}
        assert set(state) == buffers | {"_extra_state"}
        assert state["_extra_state"].tolist() == [32, 5]
        other = CompactBilinearPool(in_channels=6, out_features=32, method=method, seed=99)
        other.load_state_dict(state)
        assert torch.equal(other(x), pool(x))
        assert other.seed == 5 and "seed=5" in repr(other)  # the buffers' seed, not its own
        other.reset_parameters()
        assert torch.equal(other(x), pool(x))
        assert torch.equal(pickle.loads(pickle.dumps(pool))(x), pool(x))
        before = pool(x)
        pool.reset_parameters()
        assert torch.equal(pool(x), before)

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_compile(self, variant: str) -> None:
        pool = CompactBilinearPool(in_channels=6, in_channels_b=3, out_features=16, **VARIANTS[variant])
        compiled = torch.compile(pool, backend="aot_eager")
        x, y = features(2, 6, 3, 3).requires_grad_(), features(2, 3, 3, 3, seed=1)
        torch.testing.assert_close(compiled(x, y), pool(x, y))
        compiled(x, y).sum().backward()
        assert torch.isfinite(x.grad).all()

    @pytest.mark.parametrize("algorithm", ["gram", "fft"])
    def test_compile_one_stream_fullgraph(self, algorithm: str) -> None:
        """One stream passed the input twice to the autograd function, which torch.compile
        refuses ("duplicate tensor input"): a graph break, an error with fullgraph=True."""
        pool = CompactBilinearPool(in_channels=6, out_features=16, algorithm=algorithm)
        assert_compiled_matches(pool, features(2, 6, 3, 3).requires_grad_(), fullgraph=True)

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_autocast(self, variant: str) -> None:
        # Stated behaviour: computed in float32 under autocast and for bfloat16 input; float32 out.
        pool = CompactBilinearPool(in_channels=6, out_features=16, **VARIANTS[variant])
        x = features(2, 6, 3, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pool(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, pool(x))
        assert pool(x.bfloat16()).dtype == torch.float32
        torch.testing.assert_close(pool(x.bfloat16()), pool(x.bfloat16().float()))

    def test_onnx_random_maclaurin(self) -> None:
        pool = CompactBilinearPool(in_channels=6, in_channels_b=4, out_features=16, method="random_maclaurin")
        x, y = features(2, 6, 3, 3), features(2, 4, 3, 3, seed=1)
        torch.testing.assert_close(torch.from_numpy(run_onnx(pool, x, y)), pool(x, y), atol=1e-5, rtol=1e-4)

    @pytest.mark.parametrize("algorithm", ["fft", "gram"])
    @pytest.mark.parametrize("two_streams", [False, True])
    def test_onnx_tensor_sketch(self, algorithm: str, two_streams: bool) -> None:
        # Exported through the Gram formula (the TorchScript exporter has no rfft), whatever the algorithm.
        pool = CompactBilinearPool(
            in_channels=6, in_channels_b=4 if two_streams else None, out_features=16, algorithm=algorithm
        )
        inputs = (features(2, 6, 3, 3), features(2, 4, 3, 3, seed=1)) if two_streams else (features(2, 6, 3, 3),)
        torch.testing.assert_close(torch.from_numpy(run_onnx(pool, *inputs)), pool(*inputs), atol=1e-5, rtol=1e-4)


def explicit_tensor_sketch(x: torch.Tensor, y: torch.Tensor, ia, sa, ib, sb, d: int) -> torch.Tensor:
    """Reference with autograd: the explicit count-sketch matrix of G = X Y^T / N, differentiable in x, y, signs."""
    g = bilinear(x, y)
    bucket = (ia[:, None] + ib[None, :]) % d
    sketch = torch.nn.functional.one_hot(bucket, d).to(g.dtype) * (sa[:, None] * sb[None, :])[..., None]
    return torch.einsum("bij,ijk->bk", g, sketch)


# (algorithm, blocking) pairs: how finely each custom autograd function splits its work.
# FFT: one location per chunk, or all; Gram: one row of G, two rows, two whole samples, or all.
SPLITS = [("fft", "fine"), ("fft", "whole"), ("gram", "fine"), ("gram", "rows"), ("gram", "samples"), ("gram", "whole")]


def set_blocks(monkeypatch, blocking: str, c1: int, c2: int) -> None:
    import bilinearpool.functional.sketch as sketch

    chunk, block = {"fine": (1, 1), "rows": (1, 2 * c2), "samples": (1, 2 * c1 * c2), "whole": (10**9, 10**9)}[blocking]
    monkeypatch.setattr(sketch, "_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(sketch, "_GRAM_BLOCK_ELEMENTS", block)


def set_fold(monkeypatch, fold: bool) -> None:
    """Force the Gram backward's one-stream fold (normally from 128 locations on) on or off."""
    import bilinearpool.functional.sketch as sketch

    monkeypatch.setattr(sketch, "_SYMMETRIC_MIN_LOCATIONS", 1 if fold else 10**9)


class TestTensorSketchAlgorithms:
    """The chunked FFT and the blocked Gram autograd functions against the explicit count-sketch matrix."""

    @staticmethod
    def draw(c1: int, c2: int, d: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ia, ib = torch.randint(0, d, (c1,), generator=g), torch.randint(0, d, (c2,), generator=g)
        sa = (torch.randint(0, 2, (c1,), generator=g) * 2 - 1).double()
        sb = (torch.randint(0, 2, (c2,), generator=g) * 2 - 1).double()
        return ia, sa, ib, sb

    @pytest.mark.parametrize("algorithm,blocking", SPLITS)
    @pytest.mark.parametrize("two_streams", [False, True])
    @pytest.mark.parametrize("sign_grad", [False, True])
    def test_values_and_gradients_match_explicit(
        self, monkeypatch, algorithm: str, blocking: str, two_streams: bool, sign_grad: bool
    ) -> None:
        d, c2 = 11, 4 if two_streams else 5
        set_blocks(monkeypatch, blocking, 5, c2)
        x = features(3, 5, 3, 4, dtype=torch.float64).requires_grad_()
        y = features(3, 4, 3, 4, dtype=torch.float64, seed=1).requires_grad_() if two_streams else None
        ia, sa, ib, sb = self.draw(5, c2, d)
        sa, sb = sa.requires_grad_(sign_grad), sb.requires_grad_(sign_grad)
        out = tensor_sketch(x, y, index_a=ia, sign_a=sa, index_b=ib, sign_b=sb, out_features=d, algorithm=algorithm)
        ref = explicit_tensor_sketch(x, x if y is None else y, ia, sa, ib, sb, d)
        torch.testing.assert_close(out, ref)
        inputs = [t for t in (x, y, sa, sb) if t is not None and t.requires_grad]
        go = features(3, d, dtype=torch.float64, seed=2)
        for got, want in zip(torch.autograd.grad(out, inputs, go), torch.autograd.grad(ref, inputs, go)):
            torch.testing.assert_close(got, want)

    @pytest.mark.parametrize("blocking", ["fine", "rows", "samples", "whole"])
    @pytest.mark.parametrize("fold", [False, True])
    def test_gram_one_stream_backward(self, monkeypatch, blocking: str, fold: bool) -> None:
        # One stream without sign gradients: the backward may fold its two products into one.
        d = 9
        set_blocks(monkeypatch, blocking, 5, 5)
        set_fold(monkeypatch, fold)
        x = features(3, 5, 2, 3, dtype=torch.float64).requires_grad_()
        ia, sa, ib, sb = self.draw(5, 5, d)

        def f(x):
            return tensor_sketch(x, index_a=ia, sign_a=sa, index_b=ib, sign_b=sb, out_features=d, algorithm="gram")

        go = features(3, d, dtype=torch.float64, seed=2)
        got = torch.autograd.grad(f(x), x, go)[0]
        want = torch.autograd.grad(explicit_tensor_sketch(x, x, ia, sa, ib, sb, d), x, go)[0]
        torch.testing.assert_close(got, want)
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))

    @pytest.mark.parametrize("algorithm", ["fft", "gram"])
    @pytest.mark.parametrize("two_streams", [False, True])
    def test_gradcheck_and_gradgradcheck_split(self, monkeypatch, algorithm: str, two_streams: bool) -> None:
        d, c2 = 7, 2 if two_streams else 5
        set_blocks(monkeypatch, "fine", 5, c2)
        x = features(2, 3, 5, dtype=torch.float64).requires_grad_()  # tokens (B, N, C)
        y = features(2, 3, 2, dtype=torch.float64, seed=1).requires_grad_() if two_streams else None
        ia, sa, ib, sb = self.draw(5, c2, d)
        sa, sb = sa.requires_grad_(), sb.requires_grad_()

        def f(x, y, sa, sb):
            return tensor_sketch(x, y, index_a=ia, sign_a=sa, index_b=ib, sign_b=sb, out_features=d, algorithm=algorithm)

        assert torch.autograd.gradcheck(f, (x, y, sa, sb))
        assert torch.autograd.gradgradcheck(f, (x, y, sa, sb))

    @settings(max_examples=15, deadline=None)
    @given(
        b=st.integers(1, 3), c1=st.integers(1, 9), c2=st.one_of(st.none(), st.integers(1, 9)),
        n=st.integers(1, 10), d=st.integers(1, 40), seed=st.integers(0, 2**16),
    )
    def test_property_fft_equals_gram(self, b: int, c1: int, c2: int | None, n: int, d: int, seed: int) -> None:
        x = features(b, n, c1, dtype=torch.float64, seed=seed).requires_grad_()
        y = None if c2 is None else features(b, n, c2, dtype=torch.float64, seed=seed + 1).requires_grad_()
        ia, sa, ib, sb = self.draw(c1, c1 if c2 is None else c2, d, seed)
        sa, sb = sa.requires_grad_(), sb.requires_grad_()
        inputs = [t for t in (x, y, sa, sb) if t is not None]
        go = features(b, d, dtype=torch.float64, seed=seed + 2)
        res = {}
        for algorithm in ("fft", "gram"):
            out = tensor_sketch(x, y, index_a=ia, sign_a=sa, index_b=ib, sign_b=sb, out_features=d, algorithm=algorithm)
            res[algorithm] = (out, *torch.autograd.grad(out, inputs, go))
        for got, want in zip(res["gram"], res["fft"]):
            torch.testing.assert_close(got, want)

    @pytest.mark.parametrize("two_streams", [False, True])
    def test_fft_and_gram_agree_float32(self, two_streams: bool) -> None:
        # Realistic sizes in float32: both are exact up to rounding (the FFT's is larger).
        pool = {a: CompactBilinearPool(in_channels=64, in_channels_b=32 if two_streams else None,
                                       out_features=1024, algorithm=a) for a in ("fft", "gram")}
        x = torch.relu(features(4, 64, 7, 7))
        y = torch.relu(features(4, 32, 7, 7, seed=1)) if two_streams else None
        out = {a: p(x, y) for a, p in pool.items()}
        scale = out["fft"].abs().max()
        torch.testing.assert_close(out["gram"], out["fft"], atol=1e-5 * scale, rtol=1e-4)

    @pytest.mark.parametrize("algorithm", ["fft", "gram"])
    @pytest.mark.parametrize("two_streams", [False, True])
    def test_saves_only_inputs(self, algorithm: str, two_streams: bool) -> None:
        # Nothing of size (B, N, d) (FFT) or (B, C1, C2) (Gram) is kept for backward: only inputs and buffers.
        pool = CompactBilinearPool(in_channels=8, in_channels_b=8 if two_streams else None, out_features=4096,
                                   algorithm=algorithm)
        x = features(2, 8, 6, 6).requires_grad_()
        y = features(2, 8, 6, 6, seed=1).requires_grad_() if two_streams else None
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = pool(x, y)
        buffers = sum(b.numel() * b.element_size() for b in pool.buffers())
        inputs = sum(t.numel() * t.element_size() for t in (x, y) if t is not None)
        assert sum(saved.values()) <= inputs + buffers
        out.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape

    @pytest.mark.parametrize("algorithm", ["fft", "gram"])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_low_precision_gradient_dtype(self, algorithm: str, dtype: torch.dtype) -> None:
        pool = CompactBilinearPool(in_channels=6, out_features=16, algorithm=algorithm)
        x = features(2, 6, 3, 3).to(dtype).requires_grad_()
        out = pool(x)
        assert out.dtype == torch.float32
        out.sum().backward()
        assert x.grad.dtype == dtype
        ref = features(2, 6, 3, 3).to(dtype).float().requires_grad_()
        torch.testing.assert_close(out, pool(ref))
        pool(ref).sum().backward()
        torch.testing.assert_close(x.grad, ref.grad.to(dtype))

    @pytest.mark.parametrize(
        "batch,channels,size,expected",
        [(2, 256, 14, "Gram"), (1, 512, 28, "Gram"), (1, 2048, 7, "FFT"), (1, 2048, 3, "FFT"), (2, 512, 1, "FFT")],
    )
    def test_auto_rule(self, batch: int, channels: int, size: int, expected: str) -> None:
        # d = 8192: Gram at small channel counts over many locations, FFT at C = 2048 or at one location.
        pool = CompactBilinearPool(in_channels=channels, out_features=8192)
        out = pool(features(batch, channels, size, size).requires_grad_())
        assert type(out.grad_fn).__name__ == ("_TensorSketchGramBackward" if expected == "Gram" else "_TensorSketchBackward")

    def test_auto_rule_cost_model(self) -> None:
        from bilinearpool.functional.sketch import _gram_is_cheaper

        for c, n in ((256, 196), (512, 784), (512, 49), (1024, 196)):
            assert _gram_is_cheaper(c, c, n, 8192, one_stream=True)
        for c, n in ((2048, 49), (2048, 784), (1536, 25), (512, 1), (512, 9)):
            assert not _gram_is_cheaper(c, c, n, 8192, one_stream=True)
        # Larger d favours Gram, smaller d the FFT.
        assert _gram_is_cheaper(1024, 1024, 196, 16384, one_stream=True)
        assert not _gram_is_cheaper(1024, 1024, 196, 2048, one_stream=True)

    def test_algorithm_exception(self) -> None:
        ia, sa, ib, sb = self.draw(4, 4, 8)
        with pytest.raises(ValueError, match=r"algorithm must be one of \('auto', 'fft', 'gram'\), but got 'FFT'"):
            tensor_sketch(torch.zeros(1, 4, 2, 2), index_a=ia, sign_a=sa, index_b=ib, sign_b=sb, out_features=8, algorithm="FFT")


@pytest.mark.parametrize("algorithm", ["fft", "gram"])
@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda h: h + 8, ValueError, r"index_a must hold bins in \[0, out_features=8\), but entry 0 is"),
        (lambda h: h - 8, ValueError, r"index_a must hold bins in \[0, out_features=8\)"),
        (lambda h: h.float(), TypeError, "index_a must hold integer bins"),
    ],
    ids=["too-large", "negative", "float"],
)
def test_tensor_sketch_checks_its_hash(algorithm, bad, error, match):
    """The Gram algorithm wrapped bad bins modulo d while the FFT one failed: which one
    "auto" picks depends on the shape, so the same bad hash gave wrong features or an
    error. Both refuse it now."""
    h = torch.arange(4) % 8
    s = torch.ones(4)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(error, match=match):
        tensor_sketch(x, index_a=bad(h), sign_a=s, index_b=h, sign_b=s, out_features=8, algorithm=algorithm)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int32])
def test_tensor_sketch_takes_any_integer_hash(dtype):
    # Only the Gram algorithm converted the bins; the FFT one needs int64 for index_add_.
    g = torch.Generator().manual_seed(0)
    h = [torch.randint(0, 16, (6,), generator=g) for _ in range(2)]
    s = [torch.randint(0, 2, (6,), generator=g) * 2.0 - 1 for _ in range(2)]
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    for algorithm in ("fft", "gram"):
        ours = tensor_sketch(x, index_a=h[0].to(dtype), sign_a=s[0], index_b=h[1].to(dtype), sign_b=s[1],
                             out_features=16, algorithm=algorithm)
        ref = tensor_sketch(x, index_a=h[0], sign_a=s[0], index_b=h[1], sign_b=s[1], out_features=16,
                            algorithm=algorithm)
        torch.testing.assert_close(ours, ref)
        ours.sum().backward()


@pytest.mark.parametrize(
    "kwargs", [{"algorithm": "fft"}, {"algorithm": "gram"}, {"method": "random_maclaurin"}], ids=str
)
def test_trace_can_be_saved_and_loaded(kwargs, tmp_path):
    # The autograd Functions cannot be saved with a trace: the trace records plain ops.
    pool = CompactBilinearPool(in_channels=6, in_channels_b=4, out_features=16, **kwargs)
    traced = torch.jit.trace(pool, (features(2, 6, 3, 3), features(2, 4, 3, 3, seed=1)))
    torch.jit.save(traced, tmp_path / "pool.pt")
    loaded = torch.jit.load(tmp_path / "pool.pt")
    x, y = features(3, 6, 5, 4, seed=2), features(3, 4, 5, 4, seed=3)
    torch.testing.assert_close(loaded(x, y), pool(x, y))


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_keeps_both_streams_in_the_graph(method):
    pool = CompactBilinearPool(in_channels=6, in_channels_b=4, out_features=16, method=method)
    conv = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(0, 6, 3, 3, requires_grad=True)
    out = pool(x, conv(torch.randn(0, 3, 3, 3)))
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


class TestCompactBilinearPoolLoading:
    def test_state_dict_of_a_wider_layer_fails_to_load(self) -> None:
        # Hash buffers are (C,) whatever out_features is: a checkpoint of a layer with more
        # bins must fail in load_state_dict, not later in forward.
        wide = CompactBilinearPool(in_channels=6, out_features=4096, seed=0)
        narrow = CompactBilinearPool(in_channels=6, out_features=16, seed=0)
        with pytest.raises(RuntimeError, match=r"index_a holds bins up to \d+, but this layer has out_features=16"):
            narrow.load_state_dict(wide.state_dict())

    def test_a_bin_equal_to_out_features_is_refused(self) -> None:
        # Bins run 0 .. out_features - 1: one bin past the last (a checkpoint without the
        # extra state, whose out_features check would otherwise say so) is refused.
        pool = CompactBilinearPool(in_channels=6, out_features=16, seed=0)
        state = {k: v for k, v in pool.state_dict().items() if k != "_extra_state"}
        state["index_a"] = state["index_a"].clone()
        state["index_a"][0] = 16
        before = pool.index_a.clone()
        with pytest.raises(RuntimeError, match=r"index_a holds bins up to 16, but this layer has out_features=16"):
            pool.load_state_dict(state)
        assert torch.equal(pool.index_a, before)
        state["index_a"][0] = 15  # the last bin: loads (no longer seed 0's draw: said)
        with pytest.warns(UserWarning, match="not seed 0's draw"):
            pool.load_state_dict(state)
        assert int(pool.index_a[0]) == 15

    def test_state_dict_of_a_narrower_layer_fails_to_load_and_changes_nothing(self) -> None:
        # Its bins are all valid here, but the output would use only the first 16 of 4096.
        narrow = CompactBilinearPool(in_channels=6, out_features=16, seed=1)
        wide = CompactBilinearPool(in_channels=6, out_features=4096, seed=0)
        before = {k: v.clone() for k, v in wide.state_dict().items() if isinstance(v, torch.Tensor)}
        with pytest.raises(RuntimeError, match=r"checkpoint's layer has out_features=16, but this layer has out_features=4096"):
            wide.load_state_dict(narrow.state_dict())
        assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items() if isinstance(v, torch.Tensor))
        assert wide.seed == 0

    @pytest.mark.parametrize("seed", [2**63, 2**64 - 1, -1, -(2**63)])
    def test_any_generator_seed_round_trips(self, seed: int) -> None:
        # The generator takes 64-bit seeds without sign; the int64 extra state holds them.
        pool = CompactBilinearPool(in_channels=6, out_features=16, seed=seed)
        other = CompactBilinearPool(in_channels=6, out_features=16, seed=0)
        other.load_state_dict(pool.state_dict())
        assert other.seed == seed % 2**64
        other.reset_parameters()
        assert torch.equal(other.index_a, pool.index_a) and torch.equal(other.sign_b, pool.sign_b)

    def test_a_layer_keeps_the_form_of_its_own_seed(self) -> None:
        # Its own state_dict turned seed=-3 into 18446744073709551613 (the same draw).
        pool = CompactBilinearPool(in_channels=6, out_features=16, seed=-3)
        pool.load_state_dict(pool.state_dict())
        assert pool.seed == -3 and "seed=-3" in repr(pool)

    def test_a_refused_load_keeps_the_seed(self) -> None:
        # A size mismatch leaves the buffers as they were, so the seed too (it became the
        # checkpoint's, which then described a draw the layer does not hold).
        pool = CompactBilinearPool(in_channels=4, out_features=32, seed=2)
        before = pool.index_a.clone()
        with pytest.raises(RuntimeError, match="size mismatch for index_a"):
            pool.load_state_dict(CompactBilinearPool(in_channels=8, out_features=32, seed=1).state_dict())
        assert pool.seed == 2 and torch.equal(pool.index_a, before)
        pool.reset_parameters()
        assert torch.equal(pool.index_a, before)

    def test_seed_outside_the_generators_range(self) -> None:
        with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\), but got 18446744073709551616"):
            CompactBilinearPool(in_channels=6, seed=2**64)

    def test_extra_state_alone_does_not_change_the_seed(self) -> None:
        # strict=False without the buffers: the layer keeps its buffers, so its seed too.
        pool = CompactBilinearPool(in_channels=6, out_features=16, seed=0)
        pool.load_state_dict({"_extra_state": torch.tensor([16, 7])}, strict=False)
        assert pool.seed == 0

    def test_checkpoint_without_extra_state_still_loads(self) -> None:
        # Saved before the seed and out_features were recorded: the buffers alone.
        old = {k: v for k, v in CompactBilinearPool(in_channels=6, out_features=16, seed=3).state_dict().items()
               if k != "_extra_state"}
        pool = CompactBilinearPool(in_channels=6, out_features=16, seed=0)
        # the buffers are loaded, and a warning says seed 0 no longer describes them (repr
        # and reset_parameters said seed=0 without a word)
        with pytest.warns(UserWarning, match=r"records no seed .* not seed 0's draw; they are loaded, "
                          r"but seed=0 \(repr, reset_parameters\) no longer describes them"):
            pool.load_state_dict(old)  # strict
        assert torch.equal(pool.index_a, old["index_a"])
        # a layer of the seed the buffers came from: nothing to say
        same = CompactBilinearPool(in_channels=6, out_features=16, seed=3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            same.load_state_dict(old)
        for method in ("random_maclaurin",):
            made = CompactBilinearPool(in_channels=6, out_features=16, seed=3, method=method)
            state = {k: v for k, v in made.state_dict().items() if k != "_extra_state"}
            with pytest.warns(UserWarning, match="not seed 0's draw"):
                CompactBilinearPool(in_channels=6, out_features=16, seed=0, method=method).load_state_dict(state)

    def test_seedless_checkpoint_warning_points_at_the_callers_line(self) -> None:
        # It pointed into torch's nn/modules/module.py (stacklevel=2 is torch's loader).
        old = {k: v for k, v in CompactBilinearPool(in_channels=6, out_features=16, seed=3).state_dict().items()
               if k != "_extra_state"}
        nested = {f"1.{k}": v for k, v in old.items()}
        for layer, state in (
            (CompactBilinearPool(in_channels=6, out_features=16, seed=0), old),
            (torch.nn.Sequential(torch.nn.Identity(), CompactBilinearPool(in_channels=6, out_features=16)), nested),
        ):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                line = sys._getframe().f_lineno + 1
                layer.load_state_dict(state)
            [warning] = [w for w in caught if "records no seed" in str(w.message)]
            assert (warning.filename, warning.lineno) == (__file__, line)

    def test_inside_a_model(self) -> None:
        model = torch.nn.Sequential(torch.nn.Identity(), CompactBilinearPool(in_channels=6, out_features=16, seed=4))
        copy = torch.nn.Sequential(torch.nn.Identity(), CompactBilinearPool(in_channels=6, out_features=16, seed=0))
        copy.load_state_dict(model.state_dict())
        assert copy[1].seed == 4
        wrong = torch.nn.Sequential(torch.nn.Identity(), CompactBilinearPool(in_channels=6, out_features=8, seed=0))
        with pytest.raises(RuntimeError, match=r"1\._extra_state: the checkpoint's layer has out_features=16"):
            wrong.load_state_dict(model.state_dict())

    def test_dtype_that_is_not_a_torch_dtype_is_a_type_error(self) -> None:
        with pytest.raises(TypeError, match="dtype must be a floating-point dtype, but got 'float32'"):
            CompactBilinearPool(in_channels=4, dtype="float32")  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ["fft", "gram"])
def test_function_transforms_and_dual_tensors(algorithm):
    # The autograd Functions have no rules for torch.func: the plain Gram formula runs.
    g = torch.Generator().manual_seed(0)
    h = [torch.randint(0, 16, (6,), generator=g) for _ in range(2)]
    s = [torch.randint(0, 2, (6,), generator=g) * 2.0 - 1 for _ in range(2)]
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)

    def sketch(x, algorithm=algorithm):
        return tensor_sketch(x, index_a=h[0], sign_a=s[0].double(), index_b=h[1], sign_b=s[1].double(),
                             out_features=16, algorithm=algorithm)

    def explicit(x):
        return explicit_tensor_sketch(x, x, h[0], s[0].double(), h[1], s[1].double(), 16)

    loss = lambda f: lambda x: f(x).square().sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(loss(sketch))(x), torch.func.grad(loss(explicit))(x))
    torch.testing.assert_close(torch.func.vmap(sketch)(torch.stack([x, -x])), torch.stack([explicit(x), explicit(-x)]))
    t = torch.randn_like(x)
    expected = torch.func.jvp(explicit, (x,), (t,))[1]
    torch.testing.assert_close(torch.func.jvp(sketch, (x,), (t,))[1], expected)
    with torch.autograd.forward_ad.dual_level():
        out = sketch(torch.autograd.forward_ad.make_dual(x, t))
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(out).tangent, expected)


def test_output_dim_checks_the_channels() -> None:
    """output_dim refuses channels the layer was not built for, as forward does (a
    classifier checks its pool through it when it is built)."""
    pool = CompactBilinearPool(in_channels=4, out_features=8)
    assert pool.output_dim(4) == pool.output_dim(4, 4) == 8
    with pytest.raises(ValueError, match=r"built for in_channels=4, but got streams of 5 channels"):
        pool.output_dim(5)
    with pytest.raises(ValueError, match=r"built for in_channels=4, but got streams of 4 and 3 channels"):
        pool.output_dim(4, 3)
    two = CompactBilinearPool(in_channels=4, in_channels_b=3, out_features=8)
    assert two.output_dim(4, 3) == 8
    with pytest.raises(ValueError, match=r"built for two streams \(in_channels=4, in_channels_b=3\), but got one"):
        two.output_dim(4)
