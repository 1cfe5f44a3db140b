"""The Triton kernels of the fused op's GPU path, run by Triton's interpreter on the CPU.

CI has no GPU, so the kernels that ``fast_bilinear_pool`` uses on CUDA
(:mod:`bilinearpool.functional._triton_kernels`) run here under ``TRITON_INTERPRET=1``,
which executes the same kernel code with numpy on CPU tensors. The interpreter is chosen
when the kernels are defined, so each check runs in a fresh Python process. They are
compared with the torch-op versions of the same steps, and the whole op (values and
gradients) with the op-by-op definition. ``tests/test_cuda.py`` runs them compiled on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is installed with torch's Linux wheels; these tests need it")

CHECK = textwrap.dedent(
    """
    import torch
    import bilinearpool.functional._elementwise as E
    import bilinearpool.functional.bilinear as FB
    from bilinearpool.functional import bilinear_pool, fast_bilinear_pool, l2_normalize, signed_sqrt, triu_pack

    assert E._kernels() is not None, "the Triton kernels did not import"
    g = torch.Generator().manual_seed(0)
    TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}
    checked = 0
    # Sizes below, at and above one block (4096 entries), several samples.
    for dtype in (torch.float32, torch.float64):
        for shape in [(1, 1), (3, 4095), (2, 4096), (3, 9000)]:
            for eps in (None, 1e-5):
                x = torch.randn(*shape, generator=g, dtype=dtype)
                dz = torch.randn(*shape, generator=g, dtype=dtype)
                c = torch.randn(shape[0], generator=g, dtype=dtype)
                s = torch.rand(shape[0], generator=g, dtype=dtype)
                x_before = x.clone()
                torch.testing.assert_close(E.ssqrt_sumsq(x, eps, use="triton"), E.ssqrt_sumsq(x, eps, use="torch"), **TOL[dtype])
                assert torch.equal(x, x_before), "ssqrt_sumsq changed its input"
                got = E.ssqrt_scale_(x.clone(), s, eps, use="triton")
                torch.testing.assert_close(got, E.ssqrt_scale_(x.clone(), s, eps, use="torch"), **TOL[dtype])
                for got, want in zip(E.ssqrt_stats(x, dz, eps, use="triton"), E.ssqrt_stats(x, dz, eps, use="torch")):
                    torch.testing.assert_close(got, want, **TOL[dtype])
                assert torch.equal(x, x_before), "ssqrt_stats changed its input"
                dz_before = dz.clone()
                got = E.ssqrt_grad_(x.clone(), dz, c, eps, use="triton")
                want = E.ssqrt_grad_(x.clone(), dz, c, eps, use="torch")
                torch.testing.assert_close(got, want, **TOL[dtype])
                assert torch.equal(dz, dz_before), "ssqrt_grad_ changed the incoming gradient"
                checked += 1

    # The whole op as on a GPU (whole matrices, Triton passes), against the definition.
    FB._whole_matrices = lambda device: True
    E.backend = lambda device: "triton"

    def naive(x_a, x_b=None, triu=False, sqrt=True, l2=True):
        y = bilinear_pool(x_a, x_b)
        y = signed_sqrt(y) if sqrt else y
        y = triu_pack(y) if triu else y.flatten(1)
        return l2_normalize(y) if l2 else y

    for two, triu in [(False, False), (False, True), (True, False)]:
        for sqrt, l2 in [(True, True), (False, True), (True, False)]:
            xs = [torch.randn(3, 70, 5, 4, generator=g, dtype=torch.float64).relu().requires_grad_()]
            if two:
                xs.append(torch.randn(3, 9, 5, 4, generator=g, dtype=torch.float64).requires_grad_())
            out = fast_bilinear_pool(*xs, triu=triu, signed_sqrt=sqrt, l2_normalize=l2)
            ref = naive(*xs, triu=triu, sqrt=sqrt, l2=l2)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
            dz = torch.randn(out.shape, generator=g, dtype=torch.float64)
            for a, b in zip(torch.autograd.grad(out, xs, dz), torch.autograd.grad(ref, xs, dz)):
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
            checked += 1
    print("checked", checked)
    """
)


def test_triton_kernels_match_torch_ops_and_the_definition():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["checked", str(2 * 4 * 2 + 9)], done.stdout


class _Broken:
    """A meta path finder that fails the import of the kernels module as a broken Triton would."""

    name = "bilinearpool.functional._triton_kernels"

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise RuntimeError("triton: no compatible CUDA toolkit")
        return None


def _forget_kernels_module(monkeypatch) -> None:
    """Make the next ``from . import _triton_kernels`` import it afresh (as on first use)."""
    import bilinearpool.functional as functional

    monkeypatch.delitem(sys.modules, _Broken.name, raising=False)
    monkeypatch.delattr(functional, "_triton_kernels", raising=False)


def test_broken_triton_falls_back_to_torch_ops_with_a_warning(monkeypatch):
    import bilinearpool.functional._elementwise as E

    _forget_kernels_module(monkeypatch)
    monkeypatch.setattr(sys, "meta_path", [_Broken(), *sys.meta_path])
    E._kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="failed to import .*RuntimeError.*torch operations"):
            assert E._kernels() is None
    finally:
        E._kernels.cache_clear()


def test_missing_triton_falls_back_silently(monkeypatch, recwarn):
    import bilinearpool.functional._elementwise as E

    _forget_kernels_module(monkeypatch)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    E._kernels.cache_clear()
    try:
        assert E._kernels() is None
        assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    finally:
        E._kernels.cache_clear()


def test_backend_off_cuda_is_torch():
    import torch

    import bilinearpool.functional._elementwise as E

    assert E.backend(torch.device("cpu")) == "torch"


@pytest.mark.parametrize("tracer", ["torch.compiler.is_compiling", "torch.jit.is_tracing", "torch.onnx.is_in_onnx_export"])
def test_traced_graphs_get_torch_ops(monkeypatch, tracer):
    """While torch.compile, jit.trace or ONNX export trace the op, even CUDA uses torch ops
    (asked before anything touches the CUDA runtime, so this runs without a GPU)."""
    import torch

    import bilinearpool.functional._elementwise as E

    monkeypatch.setattr(tracer, lambda: True)
    monkeypatch.setenv("BILINEARPOOL_TRITON", "1")
    assert E.backend(torch.device("cuda")) == "torch"


def test_matrices_too_large_for_the_grid_take_torch_ops(monkeypatch):
    """More blocks per sample than CUDA's grid allows: the torch operations, same results."""
    import torch

    import bilinearpool.functional._elementwise as E

    def no_launch(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched")

    monkeypatch.setattr(E, "_launch", no_launch)
    monkeypatch.setattr(E, "_MAX_BLOCKS", 1)
    g = torch.randn(2, E._BLOCK + 1, dtype=torch.float64)  # two blocks per sample
    want = E.ssqrt_sumsq(g, 1e-5, use="torch")
    torch.testing.assert_close(E.ssqrt_sumsq(g, 1e-5, use="triton"), want)
    monkeypatch.setattr(E, "_MAX_BLOCKS", 2)
    with pytest.raises(AssertionError, match="launched"):
        E.ssqrt_sumsq(g, 1e-5, use="triton")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("eps", [None, 1e-10, 1e-5])
def test_kernel_constants_are_made_once_in_the_matrix_dtype(dtype, eps):
    """The kernels' eps and sqrt(eps): in the matrix's dtype, on its device, one tensor per key."""
    import math

    import torch

    import bilinearpool.functional._elementwise as E

    dtype = getattr(torch, dtype)
    E._consts.cache_clear()
    consts = E._consts(torch.device("cpu"), dtype, eps)
    value = 0.0 if eps is None else eps
    expected = torch.tensor([value, math.sqrt(value)], dtype=torch.float64).to(dtype)
    assert consts.dtype == dtype and consts.device.type == "cpu"
    torch.testing.assert_close(consts, expected, rtol=0, atol=0)
    assert E._consts(torch.device("cpu"), dtype, eps) is consts
    assert E._consts(torch.device("cpu"), torch.bfloat16, eps) is not consts
