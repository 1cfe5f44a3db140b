"""CUDA paths against the CPU, in float64 where the op allows it.

Marked ``cuda`` and left out of ``make test`` (CI and the development machines have no
GPU); run them on a GPU machine with ``make test-cuda`` or
``python -m pytest -m cuda tests/test_cuda.py`` (``benchmarks/gpu_check.sh`` does, before
the GPU benchmarks). Without a CUDA device they fail, saying so, rather than skip.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import bilinearpool.functional._elementwise as _elementwise
from bilinearpool import (
    CompactBilinearPool,
    CovariancePool,
    FastBCNN,
    LowRankBilinearPool,
    MatrixSqrt,
)
from bilinearpool.functional import fast_bilinear_pool, matrix_sqrt

pytestmark = pytest.mark.cuda

F64 = dict(rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("these tests need a CUDA device: run them on a GPU machine (make test-cuda)")
    return torch.device("cuda")


def _value_and_grad(fn, inputs, weights):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * weights.to(out.device, out.dtype)).sum(), leaves)
    return out.detach().cpu(), [g.cpu() for g in grads]


@pytest.mark.parametrize("two,triu", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("sqrt,l2", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("save_output", [False, True])
def test_fast_bilinear_pool_matches_cpu(cuda, monkeypatch, two, triu, sqrt, l2, backend, save_output):
    """Values and gradients on the GPU (whole matrices; elementwise passes as Triton kernels
    or as torch ops) equal the CPU's (panels), with and without the square root and the
    normalisation (300 channels: 22 partial sums per sample to add up), and with the
    output saved for backward (the CPU reference saves only the input)."""
    monkeypatch.setenv("BILINEARPOOL_TRITON", "1" if backend == "triton" else "0")
    assert _elementwise.backend(cuda) == backend
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, 6, 7, generator=g, dtype=torch.float64).relu()
    inputs = [x, torch.randn(3, 40, 6, 7, generator=g, dtype=torch.float64).relu()] if two else [x]
    fn = lambda *xs, save=False: fast_bilinear_pool(  # noqa: E731
        *xs, triu=triu, signed_sqrt=sqrt, l2_normalize=l2, save_output=save
    )
    weights = torch.randn(fn(*inputs).shape, generator=g, dtype=torch.float64)
    out_cpu, g_cpu = _value_and_grad(fn, inputs, weights)
    gpu = lambda *xs: fn(*xs, save=save_output)  # noqa: E731
    out_gpu, g_gpu = _value_and_grad(gpu, [t.to(cuda) for t in inputs], weights)
    torch.testing.assert_close(out_gpu, out_cpu, **F64)
    for a, b in zip(g_gpu, g_cpu):
        torch.testing.assert_close(a, b, **F64)


def test_fast_bilinear_pool_leaves_incoming_gradient_alone(cuda):
    """On the GPU the panel transposes are views of the incoming gradient: it must not change."""
    x = torch.randn(2, 260, 5, 5, device=cuda).relu().requires_grad_()
    out = fast_bilinear_pool(x)
    dz = torch.randn_like(out)
    dz_copy = dz.clone()
    torch.autograd.grad(out, x, dz)
    assert torch.equal(dz, dz_copy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_bilinear_pool_autocast(cuda, dtype):
    x = (torch.rand(4, 256, 7, 7, device=cuda) * 1e3).requires_grad_()  # products up to 1e6
    ref = fast_bilinear_pool(x)
    with torch.autocast("cuda", dtype=dtype):
        out = fast_bilinear_pool(x.to(dtype))
    (g,) = torch.autograd.grad(out.float().sum(), x)
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(g).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-3)


def test_fast_bilinear_pool_saves_only_the_input(cuda):
    x = torch.randn(4, 512, 7, 7, device=cuda).relu().requires_grad_()
    saved: list[int] = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fast_bilinear_pool(x)
    assert sum(saved) == x.numel() * x.element_size()


@pytest.mark.parametrize("triu", [False, True])
def test_fast_bilinear_pool_compiles_on_gpu(cuda, triu):
    """torch.compile (inductor) of the fused op on CUDA: the traced graph uses torch ops
    (``_elementwise.backend`` while compiling); values and gradients equal eager mode."""
    x = torch.randn(2, 96, 5, 5, device=cuda).relu()
    fn = lambda t: fast_bilinear_pool(t, triu=triu)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=False)
    leaf_c, leaf_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(leaf_c), fn(leaf_e)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(out_e)
    (g_c,), (g_e,) = torch.autograd.grad(out_c, leaf_c, w), torch.autograd.grad(out_e, leaf_e, w)
    torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["auto", "iterative"])
def test_matrix_sqrt_matches_cpu_and_is_finite_when_rank_deficient(cuda, impl):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, 49, generator=g, dtype=torch.float64).relu()  # C=64 > 49 locations
    a = x @ x.transpose(1, 2) / 49
    fn = lambda m: matrix_sqrt(m, impl=impl)  # noqa: E731
    weights = torch.randn(4, 64, 64, generator=g, dtype=torch.float64)
    out_cpu, (g_cpu,) = _value_and_grad(fn, [a], weights)
    out_gpu, (g_gpu,) = _value_and_grad(fn, [a.to(cuda)], weights)
    assert torch.isfinite(out_gpu).all() and torch.isfinite(g_gpu).all()
    torch.testing.assert_close(out_gpu, out_cpu, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    "build",
    [
        lambda: CovariancePool(norm=MatrixSqrt()),
        lambda: CovariancePool(in_channels=96, reduced_channels=32, norm=MatrixSqrt()),
        lambda: CompactBilinearPool(in_channels=96, out_features=512, algorithm="fft"),
        lambda: CompactBilinearPool(in_channels=96, out_features=512, algorithm="gram"),
        lambda: CompactBilinearPool(in_channels=96, out_features=512, method="random_maclaurin"),
        lambda: LowRankBilinearPool(in_channels=96, rank=32, out_features=64),
    ],
    ids=["covariance-sqrtm", "isqrt-cov-reduced", "sketch-fft", "sketch-gram", "maclaurin", "lowrank"],
)
def test_poolings_match_cpu(cuda, build):
    torch.manual_seed(0)
    layer = build().double().eval()
    x = torch.randn(3, 96, 5, 6, dtype=torch.float64).relu()
    out_cpu = layer(x)
    out_gpu = layer.to(cuda)(x.to(cuda)).cpu()
    torch.testing.assert_close(out_gpu, out_cpu, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_bcnn_model_trains_on_gpu(cuda, channels_last):
    """A whole model: logits equal the CPU's, and one SGD step runs with finite gradients."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = FastBCNN(torchvision.models.resnet18(), node="layer4", num_classes=8).eval()
    x = torch.randn(2, 3, 96, 96)
    ref = model(x)
    model = model.to(cuda)
    xg = x.to(cuda)
    if channels_last:
        model, xg = model.to(memory_format=torch.channels_last), xg.to(memory_format=torch.channels_last)
    # No TF32 for this comparison (cuDNN allows it by default on Ampere and later).
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False), \
            torch.no_grad():
        out = model(xg)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-4)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(model(xg), torch.tensor([1, 5], device=cuda))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()


def test_bench_cli_on_cuda(cuda, tmp_path, capsys):
    """The benchmark's CUDA path (synchronised timing, peak memory) runs end to end."""
    from bilinearpool import cli

    rc = cli.main([
        "layers", "--device", "cuda", "--quick", "--shapes", "2x256x7x7", "--cases", "fast-bcnn",
        "--out", str(tmp_path), "--no-progress",
    ])
    assert rc == 0
    rows = json.loads((tmp_path / "layers.json").read_text())["rows"]
    fast = [r for r in rows if r["case"] == "fast-bcnn"]
    assert fast and fast[0]["peak_MiB"] is not None and fast[0]["fwd_bwd_ms"] > 0
    print(capsys.readouterr().out, file=sys.stderr)


@pytest.mark.parametrize("rows", [1, 8, 32, 45])
def test_wide_linear_matches_f_linear_on_gpu(cuda, rows):
    """The Triton kernel against cuBLAS: values and gradients in float32 and float64
    (taken from 2 rows; one row goes to F.linear, the kernel checked directly); under
    autocast it is F.linear itself."""
    from bilinearpool.functional import linear as L

    torch.manual_seed(0)
    d = 300_000
    # float32 sums of 300,000 products of unit normals (size ~550): rounding ~1e-3 absolute.
    for dtype, tol in [(torch.float32, dict(rtol=1e-4, atol=5e-3)), (torch.float64, F64)]:
        x = torch.randn(rows, d, device=cuda, dtype=dtype, requires_grad=True)
        w = torch.randn(8, d, device=cuda, dtype=dtype, requires_grad=True)
        b = torch.randn(8, device=cuda, dtype=dtype, requires_grad=True)
        assert (L._path(x, w, b) == "triton") == (rows >= 2)
        out, ref = L.wide_linear(x, w, b), torch.nn.functional.linear(x, w, b)
        torch.testing.assert_close(out, ref, **tol)
        torch.testing.assert_close(L._forward(x.detach(), w.detach(), b.detach()), ref.detach(), **tol)
        dz = torch.randn_like(out)
        for a, c in zip(torch.autograd.grad(out, (x, w, b), dz), torch.autograd.grad(ref, (x, w, b), dz)):
            torch.testing.assert_close(a, c, **tol)
    x32, w32 = x.detach().float(), w.detach().float()
    with torch.autocast("cuda", dtype=torch.float16):
        assert L._path(x32, w32, None) is None
        assert torch.equal(L.wide_linear(x32, w32), torch.nn.functional.linear(x32, w32))


@pytest.mark.parametrize("triu", [False, True])
def test_fast_bcnn_inference_on_gpu_matches_the_cpu_one_step_head(cuda, triu):
    """Eval logits on the GPU (pooling then classifier) equal the CPU's, where
    FastBCNN.forward runs the one-step head (fast_bilinear_linear's panel path)."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 96, 3, stride=4), torch.nn.ReLU())
    model = FastBCNN(backbone, num_classes=5, triu=triu).double().eval()
    x = torch.randn(3, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        on_cpu = model(x)
        on_gpu = model.to(cuda)(x.to(cuda)).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, **F64)


@pytest.mark.parametrize("triu", [False, True])
def test_fast_bcnn_head_kernel_on_gpu(cuda, triu):
    """fast_bilinear_linear's CUDA path for inference (G, then one Triton kernel for signed
    sqrt, norm and classifier) is taken, and gives the composition's logits: float64
    against the definition at a small shape, float32 at a ResNet-50 batch of 32 and at 1
    and 33 samples; under autocast and for gradients the composition runs."""
    from bilinearpool.functional import fast_bilinear_linear, head, triu_size, wide_linear

    torch.manual_seed(0)
    for (b, c, n, out), dtype, tol in [
        ((3, 300, 25, 5), torch.float64, F64),
        ((32, 2048, 49, 8), torch.float32, dict(rtol=1e-4, atol=1e-5)),
        ((1, 512, 49, 2), torch.float32, dict(rtol=1e-4, atol=1e-5)),
        ((33, 256, 196, 64), torch.float32, dict(rtol=1e-4, atol=1e-5)),
    ]:
        x = torch.randn(b, c, n, 1, device=cuda, dtype=dtype).relu_()  # a (B, C, H, W) map
        a = x.flatten(2)  # the channel matrix the path is chosen for
        d = triu_size(c) if triu else c * c
        w = torch.randn(out, d, device=cuda, dtype=dtype) / d**0.5
        bias = torch.randn(out, device=cuda, dtype=dtype)
        with torch.no_grad():
            assert head._path(a, w, bias) == "triton"
            got = fast_bilinear_linear(x, w, bias, triu=triu)
            want = wide_linear(fast_bilinear_pool(x, triu=triu), w, bias)
            torch.testing.assert_close(got, want, **tol)
            for options in ({"signed_sqrt": False}, {"l2_normalize": False}):
                torch.testing.assert_close(
                    fast_bilinear_linear(x, w, bias, triu=triu, **options),
                    wide_linear(fast_bilinear_pool(x, triu=triu, **options), w, bias),
                    **tol,
                )
            with torch.autocast("cuda", dtype=torch.float16):
                assert head._path(a.float(), w.float(), bias.float()) is None
    assert head._path(a, w.requires_grad_(), bias) is None
