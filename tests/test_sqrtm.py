from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilinearpool.functional.sqrtm import matrix_sqrt
from bilinearpool.matrix_sqrt import MatrixSqrt

from _compile import assert_compiled_matches
from _onnx import run_onnx

NS_IMPLS = ("spectral", "iterative")


def psd(b: int, c: int, n: int, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Covariance-like PSD matrices of rank min(c, n)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, n, generator=g, dtype=torch.float64)
    return (x @ x.transpose(1, 2) / n).to(dtype)


def eigh_sqrt(a: torch.Tensor) -> torch.Tensor:
    """Reference: exact PSD square root in float64."""
    lam, u = torch.linalg.eigh(a.double())
    return (u * lam.clamp_min(0).sqrt().unsqueeze(1)) @ u.transpose(1, 2)


def naive_isqrt(a: torch.Tensor, num_iters: int, norm: str = "trace", s: float | None = None) -> torch.Tensor:
    """iSQRT-COV written from the paper's equations, differentiated by plain autograd
    (``s``: a constant pre-normalisation factor instead of ``norm``'s)."""
    a = (a + a.transpose(1, 2)) / 2
    if s is None:
        s = a.diagonal(dim1=1, dim2=2).sum(-1) if norm == "trace" else a.flatten(1).norm(dim=1)
    else:
        s = torch.full(a.shape[:1], s, dtype=a.dtype)
    s = s.view(-1, 1, 1)
    eye = torch.eye(a.shape[1], dtype=a.dtype).expand_as(a)
    y, z = a / s, eye
    for _ in range(num_iters):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * s.sqrt()


class TestMatrixSqrt:
    def test_smoke(self) -> None:
        out = MatrixSqrt()(psd(2, 5, 10))
        assert out.shape == (2, 5, 5)
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("b", [1, 3])
    @pytest.mark.parametrize("c", [1, 2, 7, 16])
    @pytest.mark.parametrize("method", ["newton_schulz", "eig"])
    def test_cardinality(self, b: int, c: int, method: str) -> None:
        a = psd(b, c, 9)
        assert MatrixSqrt(method=method)(a).shape == (b, c, c)
        layer = MatrixSqrt(method=method, triu=True)
        assert layer(a).shape == (b, c * (c + 1) // 2) == (b, layer.output_dim(c))

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match=r"square matrices \(B, C, C\).*shape \(2, 3, 4\)"):
            matrix_sqrt(torch.zeros(2, 3, 4))
        with pytest.raises(ValueError, match="shape \\(3, 3\\)"):
            matrix_sqrt(torch.eye(3))
        with pytest.raises(TypeError, match="floating-point.*torch.int64"):
            matrix_sqrt(torch.zeros(1, 2, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="method must be one of .* but got 'svd'"):
            MatrixSqrt(method="svd")
        with pytest.raises(ValueError, match="norm must be one of .* but got 'l1'"):
            MatrixSqrt(norm="l1")
        with pytest.raises(ValueError, match="impl must be one of .* but got 'gpu'"):
            MatrixSqrt(impl="gpu")
        with pytest.raises(ValueError, match="num_iters must be a positive int, but got 0"):
            MatrixSqrt(num_iters=0)
        with pytest.raises(ValueError, match=r"eps must be a number in \(0, 1\), but got 2"):
            MatrixSqrt(method="eig", eps=2)
        with pytest.raises(TypeError, match="triu must be a bool, but got str"):
            MatrixSqrt(triu="yes")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="square matrices, but got in_channels=3 and in_channels_b=4"):
            MatrixSqrt().output_dim(3, 4)

    @pytest.mark.parametrize(
        ("method", "given", "named"),
        [
            ("eig", {"num_iters": 7}, "num_iters applies to method='newton_schulz' only"),
            ("eig", {"norm": "frobenius"}, "norm applies to method='newton_schulz' only"),
            ("eig", {"impl": "iterative"}, "impl applies to method='newton_schulz' only"),
            ("eig", {"num_iters": 5, "impl": "auto"}, "num_iters and impl apply to method='newton_schulz' only"),
            ("newton_schulz", {"eps": 1e-3}, "eps applies to method='eig' only"),
        ],
    )
    def test_settings_of_the_other_method_are_refused(self, method: str, given: dict, named: str) -> None:
        """A setting the method does not read would do nothing: refused, even at its default value."""
        with pytest.raises(ValueError, match=f"{named}, but method='{method}'; drop"):
            MatrixSqrt(method=method, **given)
        with pytest.raises(ValueError, match=f"{named}, but method='{method}'"):
            matrix_sqrt(psd(1, 3, 5), method=method, **given)
        one = len(given) == 1
        with pytest.raises(ValueError, match=rf"\({'it' if one else 'they'} would do nothing\), or use method="):
            MatrixSqrt(method=method, **given)

    def test_defaults_fill_in_per_method(self) -> None:
        ns, eig = MatrixSqrt(), MatrixSqrt(method="eig")
        assert (ns.num_iters, ns.norm, ns.impl, ns.eps) == (5, "trace", "auto", None)
        assert (eig.num_iters, eig.norm, eig.impl, eig.eps) == (None, None, None, 1e-6)
        a = psd(2, 5, 9, dtype=torch.float64)
        explicit = matrix_sqrt(a, num_iters=5, norm="trace", impl="auto")
        torch.testing.assert_close(matrix_sqrt(a), explicit, rtol=0, atol=0)
        torch.testing.assert_close(ns(a), explicit, rtol=0, atol=0)
        # a layer pickled when every setting was filled in runs with its method's own
        old = MatrixSqrt(method="eig")
        old.num_iters, old.norm, old.impl = 5, "trace", "auto"
        torch.testing.assert_close(old(a), eig(a), rtol=0, atol=0)
        # the eig default floor is 1e-6 (it shapes the gradient of a rank-deficient input)
        low_rank = psd(1, 6, 3, dtype=torch.float64).requires_grad_()
        grads = [torch.autograd.grad(f(low_rank).sum(), low_rank)[0] for f in (
            eig, lambda m: matrix_sqrt(m, method="eig", eps=1e-6), lambda m: matrix_sqrt(m, method="eig", eps=1e-3))]
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
        assert not torch.allclose(grads[0], grads[2])

    @pytest.mark.parametrize("method", ["newton_schulz", "eig"])
    def test_noncontiguous(self, method: str) -> None:
        a = psd(2, 6, 20, dtype=torch.float64)
        strided = torch.zeros(2, 12, 12, dtype=torch.float64)[:, ::2, ::2].copy_(a).transpose(1, 2)
        assert not strided.is_contiguous()
        torch.testing.assert_close(matrix_sqrt(strided, method=method), matrix_sqrt(a, method=method))

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"method": "eig"},
            {"impl": "spectral", "norm": "trace"},
            {"impl": "spectral", "norm": "frobenius", "num_iters": 3},
            {"impl": "iterative", "norm": "trace"},
            {"impl": "iterative", "norm": "frobenius", "num_iters": 2},
        ],
    )
    def test_gradcheck(self, kwargs: dict) -> None:
        a = psd(2, 4, 8, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: matrix_sqrt(t, **kwargs), (a,))

    @pytest.mark.parametrize("method", ["newton_schulz", "eig"])
    def test_module_equals_function(self, method: str) -> None:
        a = psd(3, 6, 10)
        torch.testing.assert_close(MatrixSqrt(method=method)(a), matrix_sqrt(a, method=method))

    def test_eig_equals_reference(self) -> None:
        a = psd(3, 8, 20, dtype=torch.float64)
        r = matrix_sqrt(a, method="eig")
        torch.testing.assert_close(r, eigh_sqrt(a))
        torch.testing.assert_close(r @ r, a)

    @pytest.mark.parametrize("impl", NS_IMPLS)
    @pytest.mark.parametrize("norm", ["trace", "frobenius"])
    def test_newton_schulz_equals_naive(self, impl: str, norm: str) -> None:
        # Values and gradients equal plain autograd through the paper's iteration.
        a = psd(2, 8, 12, dtype=torch.float64)
        g = torch.randn(2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        g = g + g.transpose(1, 2)  # both implementations give the symmetric gradient
        a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
        out, ref = matrix_sqrt(a1, impl=impl, norm=norm), naive_isqrt(a2, 5, norm)
        torch.testing.assert_close(out, ref)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(a1.grad, (a2.grad + a2.grad.transpose(1, 2)) / 2)

    @pytest.mark.parametrize("impl", NS_IMPLS)
    @pytest.mark.parametrize("num_iters", [1, 2, 3])
    def test_newton_schulz_few_iterations_equal_naive(self, impl: str, num_iters: int) -> None:
        # The first and last steps of both implementations are special-cased.
        a = psd(2, 7, 5, dtype=torch.float64)
        g = torch.randn(2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
        out, ref = matrix_sqrt(a1, impl=impl, num_iters=num_iters), naive_isqrt(a2, num_iters)
        torch.testing.assert_close(out, ref)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(a1.grad, (a2.grad + a2.grad.transpose(1, 2)) / 2)

    @pytest.mark.parametrize("norm", ["trace", "frobenius"])
    @pytest.mark.parametrize("spectrum", ["scalar", "clusters"])
    def test_spectral_repeated_eigenvalues(self, norm: str, spectrum: str) -> None:
        # Equal and nearly equal eigenvalues: the closed-form divided differences switch to
        # the float64 band (derivatives for equal pairs) or, for a scalar matrix, to all pairs.
        c = 40
        if spectrum == "scalar":
            lam = torch.full((2, c), 0.7, dtype=torch.float64)
        else:
            base = torch.tensor([0.0, 1e-3, 0.5, 0.5 * (1 + 1e-9), 0.5 * (1 + 3e-3), 2.0], dtype=torch.float64)
            lam = base.repeat_interleave(7)[:c].expand(2, c)
        q, _ = torch.linalg.qr(torch.randn(2, c, c, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
        a = (q * lam.unsqueeze(1)) @ q.transpose(1, 2)
        g = torch.randn(2, c, c, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
        o1 = matrix_sqrt(a1, impl="spectral", norm=norm)
        o2 = matrix_sqrt(a2, impl="iterative", norm=norm)
        torch.testing.assert_close(o1, o2)
        o1.backward(g)
        o2.backward(g)
        torch.testing.assert_close(a1.grad, a2.grad)

    @pytest.mark.parametrize("kwargs", [{"impl": "spectral"}, {"impl": "iterative"}, {"method": "eig"}])
    def test_float32_gradient_accuracy(self, kwargs: dict) -> None:
        # Rank-deficient covariance (C=96 > 49 locations): float32 gradients stay within
        # 1e-4 (relative, Frobenius) of the float64 computation.
        x = torch.relu(torch.randn(3, 96, 49, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
        a = x @ x.transpose(1, 2) / 49
        g = torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        grads = []
        for dtype in (torch.float32, torch.float64):
            leaf = a.to(dtype).requires_grad_()
            matrix_sqrt(leaf, **kwargs).backward(g.to(dtype))
            grads.append(leaf.grad.double())
        assert (grads[0] - grads[1]).norm() <= 1e-4 * grads[1].norm()

    @pytest.mark.parametrize("impl", NS_IMPLS)
    @pytest.mark.parametrize("num_iters", [20, 40])
    def test_float32_gradient_accuracy_at_many_iterations(self, impl: str, num_iters: int) -> None:
        # Full rank (C=12 < 40 locations), so the polynomial is well conditioned at any K:
        # the float32 gradient stays within 1e-5 of float64's. The iterative backward once
        # let rounding's antisymmetric part of dP grow 2.5x per step (10% off at K = 20).
        x = torch.randn(2, 12, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        a = x @ x.transpose(1, 2) / 40
        g = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        grads = []
        for dtype in (torch.float32, torch.float64):
            leaf = a.detach().to(dtype).clone().requires_grad_()
            matrix_sqrt(leaf, impl=impl, num_iters=num_iters).backward(g.to(dtype))
            grads.append(leaf.grad.double())
        assert (grads[0] - grads[1]).norm() <= 1e-5 * grads[1].norm()

    @pytest.mark.parametrize("num_iters", [40, 80])
    def test_spectral_rank_deficient_finite_at_many_iterations(self, num_iters: int) -> None:
        # float32 eigenvalues of a rank-deficient A come out about -1e-7 instead of 0, and
        # q_K grows 2.25x per step on negatives (-inf from K = 27): they are taken as 0.
        x = torch.relu(torch.randn(2, 96, 49, generator=torch.Generator().manual_seed(5)))
        a = (x @ x.transpose(1, 2) / 49).requires_grad_()
        y = matrix_sqrt(a, impl="spectral", num_iters=num_iters)
        y.backward(torch.ones_like(y))
        assert y.isfinite().all() and a.grad.isfinite().all()
        exact = eigh_sqrt(a.detach().double())
        assert (y.double() - exact).norm() <= 1e-2 * exact.norm()  # converged to sqrt(A)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_spectral_zero_block_takes_the_band_path_with_exact_gradients(
        self, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The eigenvalues taken as 0 (96 - 20 of them here) counted as one cluster of close
        pairs: the band grew past its limit and every pair took the float64 quotient, 1.4x
        the time at C=512, 14x14. Their pairs get q_K'(0) on the band path, as the exact
        path gives them (and the iterative implementation, of the same polynomial)."""
        import bilinearpool.functional.sqrtm as sq

        x = torch.randn(3, 96, 20, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        a = x @ x.transpose(1, 2) / 20
        a[1] = 0.0  # and a matrix of zeros only
        g = torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        widths: list[int] = []
        band = sq._band
        monkeypatch.setattr(sq, "_band", lambda lam: widths.append(band(lam)) or widths[-1])

        def grad(**kwargs: object) -> torch.Tensor:
            leaf = a.to(dtype).requires_grad_()
            matrix_sqrt(leaf, num_iters=5, **kwargs).backward(g.to(dtype))
            return leaf.grad.double()

        fast = grad(impl="spectral")
        assert widths and widths[-1] <= sq._BAND_MAX  # the band path
        monkeypatch.setattr(sq, "_BAND_MAX", -1)  # every pair exact
        torch.testing.assert_close(fast, grad(impl="spectral"), rtol=1e-5, atol=1e-6)
        if dtype == torch.float64:
            torch.testing.assert_close(fast, grad(impl="iterative"), rtol=1e-7, atol=1e-9)

    @pytest.mark.parametrize("impl", NS_IMPLS)
    def test_saved_for_backward_is_lean(self, impl: str) -> None:
        # iterative keeps the input only; spectral the eigenvectors, the eigenvalues
        # (float32) and q_K, q_K' on them (float64): (B, C, C) + 5 (B, C) float32 words.
        a = psd(2, 16, 30).requires_grad_()
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            matrix_sqrt(a, impl=impl)
        assert sum(saved) <= a.numel() * a.element_size() + 2 * 16 * (4 + 2 * 8) + 64

    @pytest.mark.parametrize("impl", NS_IMPLS)
    def test_newton_schulz_converges_when_well_conditioned(self, impl: str) -> None:
        a = psd(2, 6, 60, dtype=torch.float64) + torch.eye(6, dtype=torch.float64)
        torch.testing.assert_close(matrix_sqrt(a, impl=impl, num_iters=5), eigh_sqrt(a), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(matrix_sqrt(a, impl=impl, num_iters=12), eigh_sqrt(a))

    @pytest.mark.parametrize("kwargs", [{"method": "eig"}, {"impl": "spectral"}, {"impl": "iterative"}])
    @pytest.mark.parametrize("c", [64, 256])
    def test_rank_deficient_is_finite(self, kwargs: dict, c: int) -> None:
        # 7x7 = 49 locations for many channels (rank 48 after centring), plus exact zeros.
        x = torch.relu(torch.randn(2, c, 49, generator=torch.Generator().manual_seed(0)))
        x = x - x.mean(2, keepdim=True)
        a = torch.cat([x @ x.transpose(1, 2) / 49, torch.zeros(1, c, c)]).requires_grad_()
        out = matrix_sqrt(a, **kwargs)
        (out.square().sum() + out.sum()).backward()
        assert torch.isfinite(out).all()
        assert torch.isfinite(a.grad).all()
        assert (out[2] == 0).all()

    @settings(max_examples=15, deadline=None)
    @given(
        c=st.integers(1, 6),
        n=st.integers(1, 10),
        num_iters=st.integers(1, 6),
        norm=st.sampled_from(["trace", "frobenius"]),
        seed=st.integers(0, 2**16),
    )
    def test_property_spectral_equals_iterative(self, c: int, n: int, num_iters: int, norm: str, seed: int) -> None:
        a1 = psd(2, c, n, dtype=torch.float64, seed=seed).requires_grad_()
        a2 = a1.detach().clone().requires_grad_()
        o1 = matrix_sqrt(a1, impl="spectral", num_iters=num_iters, norm=norm)
        o2 = matrix_sqrt(a2, impl="iterative", num_iters=num_iters, norm=norm)
        torch.testing.assert_close(o1, o2)
        torch.testing.assert_close(o1, o1.transpose(1, 2))
        o1.sum().backward()
        o2.sum().backward()
        torch.testing.assert_close(a1.grad, a2.grad)

    @pytest.mark.parametrize("kwargs", [{}, {"impl": "spectral"}, {"method": "eig"}])
    @pytest.mark.parametrize("value", [float("nan"), float("inf")])
    def test_non_finite_input_is_named_where_the_decomposition_fails(self, kwargs: dict, value: float) -> None:
        """eigh's own error spoke of an ill-conditioned matrix or repeated eigenvalues,
        which misleads for the NaN of a diverged training run."""
        a = psd(3, 4, 9)
        a[1] = value  # eigh fails on it (LAPACK)
        with pytest.raises(ValueError, match=r"^input holds non-finite values \(NaN or inf\) in 1 of the 3 "
                           r"matrices of the batch, .*\(_LinAlgError: linalg.eigh: .*\)") as info:
            MatrixSqrt(**kwargs)(a)
        assert isinstance(info.value.__cause__, torch.linalg.LinAlgError)
        with pytest.raises(ValueError, match=r"in 1 of the 3 matrices"):
            matrix_sqrt(a.requires_grad_(), **kwargs)

    def test_failure_on_finite_input_is_eighs_own(self, monkeypatch) -> None:
        def fails(a):
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")

        monkeypatch.setattr(torch.linalg, "eigh", fails)
        with pytest.raises(torch.linalg.LinAlgError, match="failed to converge"):
            MatrixSqrt(method="eig")(psd(2, 4, 9))

    def test_iterative_gives_nan_for_non_finite_input(self) -> None:
        a = psd(2, 4, 9)
        a[1] = float("nan")
        out = MatrixSqrt(impl="iterative")(a)
        assert out[1].isnan().all() and out[0].isfinite().all()

    def test_pickle_and_state_dict(self) -> None:
        layer = MatrixSqrt(num_iters=3, norm="frobenius", triu=True)
        clone = pickle.loads(pickle.dumps(layer))
        assert repr(clone) == repr(layer)
        assert layer.state_dict() == {}
        a = psd(2, 5, 9)
        torch.testing.assert_close(clone(a), layer(a))

    @pytest.mark.parametrize(("method", "impl"), [*(("newton_schulz", i) for i in NS_IMPLS), ("eig", None)])
    def test_compile(self, method: str, impl: str | None) -> None:
        """One graph, backward included (the spectral backward's band of close eigenvalue
        pairs has a data-dependent width: compiled, every pair takes the exact quotient)."""
        layer = MatrixSqrt(method=method, impl=impl, triu=True)
        assert_compiled_matches(layer, psd(2, 5, 9).requires_grad_(), fullgraph=True)

    @pytest.mark.parametrize(("method", "impl"), [*(("newton_schulz", i) for i in NS_IMPLS), ("eig", None)])
    def test_autocast(self, method: str, impl: str | None) -> None:
        # Stated behaviour: computed in float32 under autocast and for bfloat16 input; float32 out.
        # The backward too, also when it runs inside the autocast region (as a gradient
        # penalty's autograd.grad does): the spectral and eig backwards once failed there.
        a = psd(2, 6, 12).requires_grad_()
        weights = torch.randn(2, 6, 6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = matrix_sqrt(a, method=method, impl=impl)
            (grad,) = torch.autograd.grad((out * weights).sum(), a)
        assert out.dtype == torch.float32 and grad.dtype == torch.float32
        ref = matrix_sqrt(a, method=method, impl=impl)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(grad, torch.autograd.grad((ref * weights).sum(), a)[0])
        a = a.detach()
        low = matrix_sqrt(a.bfloat16(), method=method, impl=impl)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, matrix_sqrt(a.bfloat16().float(), method=method, impl=impl))

    @pytest.mark.parametrize("triu", [False, True])
    @pytest.mark.parametrize("impl", ["auto", "iterative"])
    def test_onnx(self, impl: str, triu: bool) -> None:
        # Newton-Schulz exports (always as matrix products), packed upper triangle included.
        layer = MatrixSqrt(impl=impl, triu=triu)
        a = psd(2, 6, 12)
        torch.testing.assert_close(torch.from_numpy(run_onnx(layer, a)), layer(a), atol=1e-5, rtol=1e-4)

    @pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
    @pytest.mark.parametrize("kwargs", [{"method": "eig"}, {"impl": "spectral"}], ids=["eig", "spectral"])
    def test_onnx_eigh_not_exported(self, kwargs: dict, dynamo: bool) -> None:
        # ONNX has no symmetric eigendecomposition: as MatrixSqrt's docstring says, these
        # two do not export (a ConversionError from the dynamo exporter).
        if dynamo:
            pytest.importorskip("onnxscript")
        with pytest.raises(Exception, match="eigh") as info:
            run_onnx(MatrixSqrt(**kwargs), psd(1, 4, 8), dynamo=dynamo)
        if dynamo:
            assert type(info.value).__name__ == "ConversionError"

    @pytest.mark.parametrize("triu", [False, True])
    def test_jit_trace_save_load(self, triu: bool) -> None:
        # impl="auto" traces the iterative form (no Python autograd function), so the
        # trace saves, loads and computes the layer on new input.
        layer = MatrixSqrt(triu=triu)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings
            traced = torch.jit.trace(layer, psd(2, 6, 12))
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
            buffer.seek(0)
            loaded = torch.jit.load(buffer)
        new = psd(3, 6, 12, seed=7)
        torch.testing.assert_close(loaded(new), layer(new))

    def test_jit_trace_of_spectral_does_not_save(self) -> None:
        # As documented: an explicit impl="spectral" stays an autograd function.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(MatrixSqrt(impl="spectral"), psd(2, 6, 12))
            with pytest.raises(RuntimeError, match="_NSSpectral"):
                torch.jit.save(traced, io.BytesIO())

    def test_numpy_scalars(self) -> None:
        a = psd(2, 5, 9, dtype=torch.float64)
        ref = matrix_sqrt(a, num_iters=3)
        torch.testing.assert_close(matrix_sqrt(a, num_iters=np.int64(3)), ref)
        eig = matrix_sqrt(a, method="eig", eps=np.float32(1e-6))
        torch.testing.assert_close(eig, matrix_sqrt(a, method="eig"))
        layer = MatrixSqrt(num_iters=np.int32(3))
        assert type(layer.num_iters) is int and "num_iters=3" in repr(layer)
        torch.testing.assert_close(layer(a), ref)
        layer = MatrixSqrt(method="eig", eps=np.float64(1e-4))
        assert type(layer.eps) is float and "eps=0.0001" in repr(layer)
        with pytest.raises(TypeError, match=r"num_iters must be a positive int, but got True \(bool\)"):
            matrix_sqrt(a, num_iters=True)
        with pytest.raises(TypeError, match=r"eps must be a number in \(0, 1\), but got True \(bool\)"):
            MatrixSqrt(method="eig", eps=True)
        with pytest.raises(ValueError, match=r"eps must be a number in \(0, 1\), but got 1.0$"):
            MatrixSqrt(method="eig", eps=1.0)
        with pytest.raises(TypeError, match=r"num_iters must be a positive int, but got 2.0 \(float\)"):
            MatrixSqrt(num_iters=2.0)  # type: ignore[arg-type]

    @pytest.mark.parametrize("impl", NS_IMPLS)
    @pytest.mark.parametrize(
        "c, norm, dtype",
        [
            (c, norm, dtype)
            for dtype, scales in ((torch.float32, (1e-13, 1e-16, 1e20, 1e36)),
                                  (torch.float64, (1e-13, 1e-30, 1e-100, 1e300)))
            for c in scales
            for norm in ("trace", "frobenius")
        ],
    )
    def test_newton_schulz_is_homogeneous(self, c: float, impl: str, norm: str, dtype: torch.dtype) -> None:
        # f(cA) = sqrt(c) f(A), gradients c^(-1/2) times, for s down to sqrt(finfo.tiny)
        # (~1e-19 in float32, ~1e-154 in float64; was 1e-12 whatever the dtype) and for
        # large matrices: the Frobenius norm squared entries above sqrt(finfo.max) (1.8e19
        # in float32) to inf, NaN values and gradients for a covariance of features of ~1e10.
        a = psd(2, 5, 9, dtype=dtype)
        g = torch.randn(2, 5, 5, dtype=dtype, generator=torch.Generator().manual_seed(8))
        scaled, unit = (a * c).requires_grad_(), a.clone().requires_grad_()
        out_scaled = matrix_sqrt(scaled, impl=impl, norm=norm)
        out_unit = matrix_sqrt(unit, impl=impl, norm=norm)
        torch.testing.assert_close(out_scaled / c**0.5, out_unit)
        out_scaled.backward(g)
        out_unit.backward(g)
        tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
        torch.testing.assert_close(scaled.grad * c**0.5, unit.grad, **tol)
        if impl == "iterative" and c > 1:  # the differentiable path (spectral: first derivatives only)
            f = lambda m: (matrix_sqrt(m, impl=impl, norm=norm) * g).sum()  # noqa: E731
            leaf = (a * c).requires_grad_()
            (grad,) = torch.autograd.grad(f(leaf), leaf, create_graph=True)
            torch.testing.assert_close(grad * c**0.5, unit.grad, **tol)
            (again,) = torch.autograd.grad(grad.sum(), leaf)  # and a second derivative
            assert torch.isfinite(again).all()

    @pytest.mark.parametrize("dtype, c", [(torch.float32, 1e-20), (torch.float32, 1e-36), (torch.float64, 1e-300)])
    @pytest.mark.parametrize("norm", ["trace", "frobenius"])
    def test_gradients_finite_far_below_the_floor(self, dtype: torch.dtype, c: float, norm: str) -> None:
        # d(1/s)/ds = -1/s^2 overflowed for s below sqrt(tiny) on the differentiable paths
        # (create_graph=True, torch.func): s is floored there.
        a = psd(1, 4, 7, dtype=dtype) * c
        f = lambda m: matrix_sqrt(m, impl="iterative", norm=norm).sum()  # noqa: E731
        leaf = a.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(leaf), leaf, create_graph=True)
        assert torch.isfinite(g).all()
        assert torch.isfinite(torch.func.grad(f)(a)).all()
        leaf = a.clone().requires_grad_()
        f(leaf).backward()
        assert torch.isfinite(leaf.grad).all()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("eps", [1e-6, 1e-2])
    def test_eig_zero_matrix_gradient_is_bounded(self, eps: float, dtype: torch.dtype) -> None:
        # No positive eigenvalue: the floor is eps (lambda_max taken as 1), so the gradient
        # of the all-zero matrix is sym(G) / (2 sqrt(eps)); the other matrix is unaffected.
        a = torch.cat([torch.zeros(1, 4, 4, dtype=dtype), psd(1, 4, 9, dtype=dtype)]).requires_grad_()
        g = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        matrix_sqrt(a, method="eig", eps=eps).backward(g.to(dtype))
        expected = (g[0] + g[0].T) / 2 / (2 * eps**0.5)
        torch.testing.assert_close(a.grad[0].double(), expected, rtol=1e-5, atol=1e-5)
        alone = a[1:].detach().clone().requires_grad_()
        matrix_sqrt(alone, method="eig", eps=eps).backward(g[1:].to(dtype))
        torch.testing.assert_close(a.grad[1:], alone.grad)


@pytest.mark.parametrize("norm", ["trace", "frobenius"])
def test_iterative_has_exact_second_derivatives(norm):
    """impl="iterative" differentiates its plain iteration when the backward records a
    graph, so gradient penalties through it are exact (gradgradcheck)."""
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    a = (x @ x.transpose(1, 2) / 9).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: matrix_sqrt(t, impl="iterative", norm=norm), (a,))


@pytest.mark.parametrize("norm", ["trace", "frobenius"])
def test_iterative_zero_matrix_has_finite_higher_derivatives(norm):
    """The all-zero matrix takes s = 1: its first and second derivatives are those of the
    naive iteration with s = 1 (the polynomial q_K), finite, without NaN from the norm."""
    g = torch.randn(1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    w = torch.randn(1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    grads = []
    for f in (lambda t: matrix_sqrt(t, impl="iterative", norm=norm), lambda t: naive_isqrt(t, 5, s=1.0)):
        a = torch.zeros(1, 3, 3, dtype=torch.float64, requires_grad=True)
        out = f(a)
        (first,) = torch.autograd.grad((out * g).sum(), a, create_graph=True)
        (second,) = torch.autograd.grad((first * w).sum(), a)
        assert (out == 0).all()
        grads.append((first, second))
    (first, second), (first_ref, second_ref) = grads
    assert torch.isfinite(second).all() and second.abs().sum() > 0
    torch.testing.assert_close(first, (first_ref + first_ref.transpose(1, 2)) / 2)
    torch.testing.assert_close(second, (second_ref + second_ref.transpose(1, 2)) / 2)


@pytest.mark.parametrize(
    "kwargs, advice",
    [({"impl": "spectral"}, 'impl="iterative"'), ({"method": "eig"}, 'method="newton_schulz"')],
    ids=["spectral", "eig"],
)
def test_first_order_only_paths_refuse_create_graph(kwargs, advice):
    """Their backward works in place and would give a gradient without history: a
    gradient penalty would silently lose its part through them. They raise instead,
    naming the path that has second derivatives; the plain backward is unchanged."""
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    a = (x @ x.transpose(1, 2) / 9).requires_grad_()
    w = torch.randn(2, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=f"first derivatives only.*{advice}"):
        torch.autograd.grad((matrix_sqrt(a, **kwargs) * w).sum(), a, create_graph=True)
    g = torch.autograd.grad((matrix_sqrt(a, **kwargs) * w).sum(), a)[0]
    assert torch.isfinite(g).all() and g.abs().sum() > 0


class TestFunctionTransforms:
    """torch.func transforms and forward-mode AD run Newton-Schulz as plain operations."""

    @pytest.mark.parametrize("impl", ["auto", "iterative", "spectral"])
    @pytest.mark.parametrize("norm", ["trace", "frobenius"])
    def test_grad_vmap_jvp_match_the_plain_iteration(self, impl: str, norm: str) -> None:
        a = psd(2, 4, 9, dtype=torch.float64)
        ours = lambda m: matrix_sqrt(m, impl=impl, norm=norm)  # noqa: E731
        ref = lambda m: naive_isqrt(m, 5, norm)  # noqa: E731
        loss = lambda f: lambda m: (f(m) ** 2).sum() + f(m)[:, 0, 1].sum()  # noqa: E731
        torch.testing.assert_close(torch.func.grad(loss(ours))(a), torch.func.grad(loss(ref))(a))
        torch.testing.assert_close(torch.func.vmap(ours)(torch.stack([a, 2 * a])), torch.stack([ref(a), ref(2 * a)]))
        t = torch.randn_like(a)
        t = t + t.transpose(1, 2)
        expected = torch.func.jvp(ref, (a,), (t,))[1]
        torch.testing.assert_close(torch.func.jvp(ours, (a,), (t,))[1], expected)
        with torch.autograd.forward_ad.dual_level():
            out = ours(torch.autograd.forward_ad.make_dual(a, t))
            torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(out).tangent, expected)

    def test_eig_says_it_has_no_rule(self) -> None:
        with pytest.raises(RuntimeError, match='method="eig"\\) has no torch.func .*use method="newton_schulz"'):
            torch.func.grad(lambda m: matrix_sqrt(m, method="eig").sum())(psd(1, 3, 9, dtype=torch.float64))

    def test_covariance_pool_per_sample_gradients(self) -> None:
        from bilinearpool import CovariancePool

        torch.manual_seed(0)
        pool = CovariancePool(in_channels=4, norm=MatrixSqrt(triu=False)).double()
        w = torch.randn(2, 10, dtype=torch.float64)
        x = torch.randn(3, 4, 3, 3, dtype=torch.float64)

        def loss(w, xi):
            return (pool(xi[None]) @ w.T).logsumexp(1).sum()

        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, x)
        for i in range(3):
            wi = w.clone().requires_grad_()
            loss(wi, x[i]).backward()
            torch.testing.assert_close(per_sample[i], wi.grad)
