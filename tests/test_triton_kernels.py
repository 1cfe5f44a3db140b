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
import warnings

import pytest

pytest.importorskip("triton", reason="Triton is installed with torch's Linux wheels; these tests need it")

CHECK = textwrap.dedent(
    """
    import math
    import torch
    import bilinearpool.functional._elementwise as E
    import bilinearpool.functional.bilinear as FB
    from bilinearpool.functional import bilinear_pool, fast_bilinear_pool, l2_normalize, signed_sqrt, triu_pack

    assert E._kernels() is not None, "the Triton kernels did not import"
    g = torch.Generator().manual_seed(0)
    TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float64: dict(rtol=1e-11, atol=1e-13)}


    def definition(x, eps, l2_eps, diag):
        # The forward by its formula, out of place: f(g) = g / (sqrt(|g| + eps) + sqrt(eps)).
        y = x / ((x.abs() + eps).sqrt() + math.sqrt(eps)) if eps is not None else x
        if l2_eps is not None:
            y = y / y.norm(dim=1, keepdim=True).clamp_min(l2_eps)
        if diag is not None:
            c = diag - 1
            w = torch.full((c, c), math.sqrt(2.0), dtype=x.dtype).fill_diagonal_(1.0).flatten()
            y = y * w
        return y


    checked = 0
    # (block size, partials per step): the defaults, then tiny blocks and steps, so that
    # the writing kernels add up many partials in several steps.
    defaults = E._BLOCK, E._rblock
    # Sizes below, at and above one block, several samples; square ones for diag. With the
    # tiny blocks (64 entries, 2 partials per step): below one block, 4 blocks (2 steps) and
    # 5 (3 steps, the last one short, its block partial); larger sizes only add time in
    # Triton's interpreter (each program reads every partial; it runs programs one by one).
    shapes = {
        defaults[0]: [((1, 1), None), ((3, 4095), None), ((2, 4096), 65), ((3, 9025), 96), ((2, 1), 2)],
        64: [((1, 1), None), ((3, 63), None), ((2, 256), 17), ((3, 289), 18), ((2, 1), 2)],
    }
    for block, rblock in [defaults, (64, lambda nparts: 2)]:
        E._BLOCK, E._rblock = block, rblock
        for dtype in (torch.float32, torch.float64):
            for shape, diag in shapes[block]:
                for eps, l2_eps in [(None, 1e-10), (1e-5, None), (1e-5, 1e-10), (1e-5, 10.0), (None, None)]:
                    x = torch.randn(*shape, generator=g, dtype=dtype)
                    dz = torch.randn(*shape, generator=g, dtype=dtype)
                    factor = 0.37
                    got = E.normalize_(x.clone(), eps, l2_eps, diag=diag, use="triton")
                    want = E.normalize_(x.clone(), eps, l2_eps, diag=diag, use="torch")
                    torch.testing.assert_close(got, want, **TOL[dtype])
                    torch.testing.assert_close(want, definition(x, eps, l2_eps, diag), **TOL[dtype])
                    if l2_eps is not None:  # the norms before normalisation, as save_output keeps them
                        norms = {use: torch.full((shape[0],), -1.0, dtype=dtype) for use in ("triton", "torch")}
                        for use, n in norms.items():
                            E.normalize_(x.clone(), eps, l2_eps, diag=diag, use=use, norms=n)
                        y = definition(x, eps, None, None)
                        torch.testing.assert_close(norms["triton"], y.norm(dim=1), **TOL[dtype])
                        torch.testing.assert_close(norms["torch"], y.norm(dim=1), **TOL[dtype])
                    dz_before = dz.clone()
                    got = E.normalize_grad_(x.clone(), dz, eps, l2_eps, factor, diag=diag, use="triton")
                    assert torch.equal(dz, dz_before), "normalize_grad_ changed the incoming gradient"
                    want = E.normalize_grad_(x.clone(), dz, eps, l2_eps, factor, diag=diag, use="torch")
                    assert torch.equal(dz, dz_before), "normalize_grad_ (torch) changed the incoming gradient"
                    torch.testing.assert_close(got, want, **TOL[dtype])
                    if dtype == torch.float64:
                        xr = x.clone().requires_grad_()
                        (ref,) = torch.autograd.grad(definition(xr, eps, l2_eps, diag), xr, dz)
                        torch.testing.assert_close(want, factor * ref, rtol=1e-9, atol=1e-12)
                    checked += 1
    E._BLOCK, E._rblock = defaults

    # The whole op as on a GPU (whole matrices, Triton passes), against the definition.
    FB._whole_matrices = lambda device: True
    E.backend = lambda device: "triton"

    def naive(x_a, x_b=None, triu=False, sqrt=True, l2=True):
        y = bilinear_pool(x_a, x_b)
        y = signed_sqrt(y) if sqrt else y
        y = triu_pack(y) if triu else y.flatten(1)
        return l2_normalize(y) if l2 else y

    for two, triu, save_output in [(t, u, s) for t, u in [(False, False), (False, True), (True, False)] for s in (False, True)]:
        for sqrt, l2 in [(True, True), (False, True), (True, False)]:
            xs = [torch.randn(3, 70, 5, 4, generator=g, dtype=torch.float64).relu().requires_grad_()]
            if two:
                xs.append(torch.randn(3, 9, 5, 4, generator=g, dtype=torch.float64).requires_grad_())
            out = fast_bilinear_pool(*xs, triu=triu, signed_sqrt=sqrt, l2_normalize=l2, save_output=save_output)
            ref = naive(*xs, triu=triu, sqrt=sqrt, l2=l2)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
            dz = torch.randn(out.shape, generator=g, dtype=torch.float64)
            for a, b in zip(torch.autograd.grad(out, xs, dz), torch.autograd.grad(ref, xs, dz)):
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
            checked += 1
    print("checked", checked)
    """
)


CHECK_LINEAR = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from bilinearpool.functional import linear as L

    g = torch.Generator().manual_seed(0)
    checked = 0
    TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}
    for dtype in (torch.float32, torch.float64):
        # rows below, at and above one tile of 32; features below one chunk and across programs
        for rows, d, out in [(1, 5000, 1), (3, 70001, 8), (33, 9000, 5), (2, 4096, 64), (40, 3, 3)]:
            x = torch.randn(rows, d, generator=g, dtype=dtype)
            w = torch.randn(out, d, generator=g, dtype=dtype)
            b = torch.randn(out, generator=g, dtype=dtype)
            for bias in (b, None):
                torch.testing.assert_close(L._forward(x, w, bias), F.linear(x, w, bias), **TOL[dtype])
                checked += 1
        # rows that are not contiguous with each other (a column slice)
        x = torch.randn(4, 10000, generator=g, dtype=dtype)[:, :5000]
        w = torch.randn(2, 5000, generator=g, dtype=dtype)
        torch.testing.assert_close(L._forward(x, w, None), F.linear(x, w), **TOL[dtype])
        checked += 1
    # float16 inputs: summed in float32, returned in float16
    x = torch.randn(5, 8000, generator=g).half()
    w = torch.randn(3, 8000, generator=g).half()
    got = L._forward(x, w, None)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float()), rtol=2e-3, atol=2e-2)
    # gradients of the autograd function against F.linear's
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in [(3, 7000), (4, 7000), (4,)])
    dz = torch.randn(3, 4, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(L._WideLinear.apply(x, w, b, True), (x, w, b), dz)
    want = torch.autograd.grad(F.linear(x, w, b), (x, w, b), dz)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    print("checked", checked + 2)
    """
)


def test_wide_linear_kernel_matches_f_linear():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK_LINEAR], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["checked", str(2 * (5 * 2 + 1) + 2)], done.stdout


CHECK_HEAD = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from bilinearpool.functional import head as H
    from bilinearpool.functional import linear as L
    from bilinearpool.functional.bilinear import bilinear_pool, l2_normalize, signed_sqrt, triu_pack

    def definition(a, w, b, scale, eps, l2_eps, triu):
        g = bilinear_pool(a.unsqueeze(-1), reduction="sum") * scale
        if eps is not None:
            g = signed_sqrt(g, eps=eps)
        z = triu_pack(g) if triu else g.flatten(1)
        if l2_eps is not None:
            z = l2_normalize(z, eps=l2_eps)
        return F.linear(z, w, b)

    g = torch.Generator().manual_seed(0)
    TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
    checked = 0
    # The default tiling (one sample; samples across row blocks, 33 > 32), then a tiny one
    # (accumulators of 256 products, 32 features per program), so that rows are cut into
    # several programs, chunks end inside a row and the triangle's rows start mid-chunk;
    # 64 outputs; every option of the normalisation (in float64 and on 24 channels, rows of
    # 24 features across chunks of 32: each program costs seconds in the interpreter).
    f32, f64 = torch.float32, torch.float64
    default, every = [(1e-5, 1e-12, True)], [(1e-5, 1e-12, True), (None, 1e-12, False), (1e-5, None, True), (1e-3, 1e3, True)]
    cases = [
        ((L._TILE, L._SPAN), 1, 16, 4, 1, f32, default), ((L._TILE, L._SPAN), 1, 16, 4, 1, f64, default),
        ((L._TILE, L._SPAN), 33, 20, 9, 8, f32, default),
        ((256, 32), 3, 40, 25, 5, f32, default), ((256, 32), 3, 24, 25, 5, f64, every),
        ((256, 32), 2, 36, 3, 64, f32, default),
    ]
    for tiling, batch, c, n, out, dtype, options in cases:
        L._TILE, L._SPAN = tiling
        a = (torch.randn(batch, c, n, generator=g, dtype=dtype).relu_() - 0.05)  # some negative entries
        for triu in (False, True):
            d = c * (c + 1) // 2 if triu else c * c
            w = torch.randn(out, d, generator=g, dtype=dtype) / c
            b = torch.randn(out, generator=g, dtype=dtype)
            for eps, l2_eps, with_bias in options:
                bias = b if with_bias else None
                got = H._kernel_logits(a, w, bias, 1.0 / n, eps, l2_eps, triu)
                torch.testing.assert_close(got, definition(a, w, bias, 1.0 / n, eps, l2_eps, triu), **TOL[dtype])
                checked += 1
    assert H._kernel_logits(torch.randn(0, 4, 3), torch.randn(2, 16), None, 1.0, 1e-5, 1e-12, False).shape == (0, 2)
    print("checked", checked)
    """
)


def test_head_kernel_matches_the_definition():
    """The Fast BCNN head's CUDA path (G, then one kernel: signed sqrt, squared norm and
    classifier in one pass over G) against pool, sqrt, L2 (pack), linear by their formulas."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK_HEAD], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["checked", str(2 * (5 + 4))], done.stdout


CHECK_CANDIDATES = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, "benchmarks")
    import bench_wide_linear as B

    g = torch.Generator().manual_seed(0)
    checked = 0
    for name in ("dot", "deferred"):
        # one row to more than one tile of rows; features across programs and partial chunks
        for rows, d, out in [(1, 5000, 1), (3, 70001, 8), (33, 9000, 5), (20, 4096, 16)]:
            x = torch.randn(rows, d, generator=g)
            w = torch.randn(out, d, generator=g)
            got = B.candidate(name, x, w, span=1024)()
            torch.testing.assert_close(got, F.linear(x, w), rtol=1e-4, atol=1e-3)
            checked += 1
    print("checked", checked)
    """
)


def test_candidate_wide_linear_kernels_of_the_benchmark_match_f_linear():
    """benchmarks/bench_wide_linear.py times two candidate kernels on a GPU: they compute
    the right thing (here under the interpreter), so that their timings mean something."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK_CANDIDATES], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["checked", "8"], done.stdout


CHECK_HEAD_CANDIDATES = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, "benchmarks")
    import bench_head as B
    from bilinearpool.functional import fast_bilinear_pool, wide_linear

    g = torch.Generator().manual_seed(0)
    checked = 0
    for name in B.CANDIDATES:
        # one tile and one row block; several tiles with padding (130 = 2 x 64 + 2 = 128 + 2); 33 samples
        for b, c, h, w_ in [(1, 16, 2, 2), (3, 100, 5, 5), (2, 130, 7, 7), (33, 40, 3, 3)]:
            x = torch.randn(b, c, h, w_, generator=g).relu_() - 0.05  # some negative entries
            w = torch.randn(5, c * c, generator=g) / c
            bias = torch.randn(5, generator=g)
            got = B.candidate(name, x, w, bias)()
            torch.testing.assert_close(got, wide_linear(fast_bilinear_pool(x), w, bias), rtol=1e-4, atol=1e-4)
            checked += 1
    print("checked", checked)
    """
)


def test_candidate_head_kernels_of_the_benchmark_match_the_composition():
    """benchmarks/bench_head.py times two candidate kernels for the Fast BCNN head on a GPU
    (signed sqrt + norm + classifier in one pass over G; G built tile by tile and never
    stored): they give the pooling-then-classifier logits (here under the interpreter)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHECK_HEAD_CANDIDATES], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["checked", "12"], done.stdout


def test_bench_head_runs_its_candidates(tmp_path):
    """The benchmark's GPU branch (candidates checked, timed and tabled), run on CPU under
    the interpreter, so that a GPU session does not find a broken script."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "benchmarks/bench_head.py", "--device", "cpu", "--candidates", "--shapes", "2x20x9",
           "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0] == (
        "shape,triu,composition_ms,fused_ms,fused_vs_composition,sqrt-linear_ms,sqrt-linear_vs_composition,"
        "gram-linear_ms,gram-linear_vs_composition,gram-linear-128_ms,gram-linear-128_vs_composition"
    )
    full, packed = (line.split(",") for line in lines[1:])
    assert full[:2] == ["2x20x9", "False"] and all(full[2:])  # every candidate timed
    assert packed[:2] == ["2x20x9", "True"] and packed[5:] == [""] * 6  # full output only


def test_triton_kernels_match_torch_ops_and_the_definition():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["checked", str(2 * 2 * 5 * 5 + 18)], done.stdout


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


@pytest.mark.parametrize("value", ["0", "false", "Off", " no"])
def test_switched_off_by_any_off_value(monkeypatch, value):
    """Only "0" switched Triton off ("false" and "off" kept it, without a word); asked
    before anything touches the CUDA runtime, so this runs without a GPU."""
    import torch

    import bilinearpool.functional._elementwise as E

    monkeypatch.setenv("BILINEARPOOL_TRITON", value)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(E, "tracing", lambda: False)
    monkeypatch.setattr(E, "_capability", lambda index: (_ for _ in ()).throw(AssertionError("not switched off")))
    assert E.backend(torch.device("cuda")) == "torch"


@pytest.mark.parametrize("tracer", ["torch.compiler.is_compiling", "torch.jit.is_tracing", "torch.onnx.is_in_onnx_export"])
def test_traced_graphs_get_torch_ops(monkeypatch, tracer):
    """While torch.compile, jit.trace or ONNX export trace the op, even CUDA uses torch ops
    (asked before anything touches the CUDA runtime, so this runs without a GPU)."""
    import torch

    import bilinearpool.functional._elementwise as E

    monkeypatch.setattr(tracer, lambda: True)
    monkeypatch.setenv("BILINEARPOOL_TRITON", "maybe")  # a value that warns: not while traced
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert E.backend(torch.device("cuda")) == "torch"


def test_matrices_too_large_for_the_grid_take_torch_ops(monkeypatch):
    """More blocks per sample than CUDA's grid allows: the torch operations, same results."""
    import torch

    import bilinearpool.functional._elementwise as E

    class NoLaunch:
        def __getattr__(self, name):
            raise AssertionError("a Triton kernel was launched")

    monkeypatch.setattr(E, "_kernels", lambda: NoLaunch())
    monkeypatch.setattr(E, "_MAX_BLOCKS", 1)
    g = torch.randn(2, E._BLOCK + 1, dtype=torch.float64)  # two blocks per sample
    dz = torch.randn_like(g)
    torch.testing.assert_close(E.normalize_(g.clone(), 1e-5, 1e-10, use="triton"), E.normalize_(g.clone(), 1e-5, 1e-10, use="torch"))
    want = E.normalize_grad_(g.clone(), dz, 1e-5, 1e-10, 0.5, use="torch")
    torch.testing.assert_close(E.normalize_grad_(g.clone(), dz, 1e-5, 1e-10, 0.5, use="triton"), want)
    monkeypatch.setattr(E, "_MAX_BLOCKS", 2)
    with pytest.raises(AssertionError, match="launched"):
        E.normalize_(g.clone(), 1e-5, 1e-10, use="triton")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("eps", [None, 1e-10, 1e-5])
@pytest.mark.parametrize("l2_eps", [None, 1e-10])
def test_kernel_constants_are_made_once_in_the_matrix_dtype(dtype, eps, l2_eps):
    """The kernels' constants: in the matrix's dtype, on its device, one tensor per key;
    the factor carries the 1/2 of the signed square root's derivative."""
    import math

    import torch

    import bilinearpool.functional._elementwise as E

    dtype = getattr(torch, dtype)
    E._consts.cache_clear()
    consts = E._consts(torch.device("cpu"), dtype, eps, l2_eps, 0.25)
    e = 0.0 if eps is None else eps
    l2 = 0.0 if l2_eps is None else l2_eps
    factor = 0.125 if eps is not None else 0.25
    expected = torch.tensor([e, math.sqrt(e), l2, l2 * l2, factor, math.sqrt(2.0)], dtype=torch.float64).to(dtype)
    assert consts.dtype == dtype and consts.device.type == "cpu"
    torch.testing.assert_close(consts, expected, rtol=0, atol=0)
    assert E._consts(torch.device("cpu"), dtype, eps, l2_eps, 0.25) is consts
    assert E._consts(torch.device("cpu"), torch.bfloat16, eps, l2_eps, 0.25) is not consts
