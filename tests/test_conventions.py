"""Conventions every layer keeps (STYLE.md): seeded and deferred initialisation, dtype and
device arguments, and the smoke / cardinality / exception / non-contiguous / gradcheck /
compile / pickle checks of the small layers that have no test file of their own
(GlobalAvgPool, ChannelReduction, SEBlock, WideLinear)."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from _compile import assert_compiled_matches
from torch import nn

from bilinearpool import (
    ChannelReduction,
    CompactBilinearPool,
    CovariancePool,
    GlobalAvgPool,
    LowRankBilinearPool,
    SEBlock,
    WideLinear,
)

#: Layers that own parameters or buffers, built with keyword arguments (device, dtype).
BUILDERS = {
    "low-rank": lambda **k: LowRankBilinearPool(in_channels=8, rank=4, **k),
    "low-rank-out": lambda **k: LowRankBilinearPool(in_channels=8, rank=4, out_features=5, **k),
    "covariance-reduced": lambda **k: CovariancePool(in_channels=8, reduced_channels=4, **k),
    "channel-reduction": lambda **k: ChannelReduction(8, 4, **k),
    "se": lambda **k: SEBlock(8, reduction=2, **k),
    "compact": lambda **k: CompactBilinearPool(in_channels=8, out_features=16, **k),
    "wide-linear": lambda **k: WideLinear(8, 3, **k),
}


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", list(BUILDERS))
class TestInitialisation:
    def test_seeded_build_equals_seeded_reset(self, name):
        """reset_parameters draws every initial value: a layer built after a seed equals
        one reset after it (a child drawing its own initial values first broke this)."""
        torch.manual_seed(0)
        layer = BUILDERS[name]()
        built = state(layer)
        torch.manual_seed(1)
        layer.reset_parameters()
        assert any(not torch.equal(built[k], v) for k, v in state(layer).items()) or name == "compact"
        torch.manual_seed(0)
        layer.reset_parameters()
        assert_same_state(built, state(layer))

    def test_meta_build_then_reset_equals_an_eager_build(self, name):
        """Deferred initialisation: build on the meta device, give memory, reset."""
        torch.manual_seed(0)
        eager = state(BUILDERS[name]())
        meta = BUILDERS[name](device="meta")
        assert all(t.is_meta for k, t in meta.state_dict().items() if k != "_extra_state")
        layer = meta.to_empty(device="cpu")
        torch.manual_seed(0)
        layer.reset_parameters()
        assert_same_state(eager, state(layer))

    def test_dtype(self, name):
        layer = BUILDERS[name](dtype=torch.float64)
        floating = [t for t in layer.state_dict().values() if t.is_floating_point()]
        assert floating and all(t.dtype == torch.float64 for t in floating)
        # WideLinear is an nn.Linear, constructor included: torch's own error
        error, match = ((RuntimeError, "Only Tensors of floating point") if name == "wide-linear" else
                        (TypeError, r"dtype must be a floating-point dtype, but got torch.int32"))
        with pytest.raises(error, match=match):
            BUILDERS[name](dtype=torch.int32)


def roundtrip(module: nn.Module) -> nn.Module:
    clone = pickle.loads(pickle.dumps(module))
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh = copy.deepcopy(module)
    for p in fresh.parameters():
        nn.init.zeros_(p)
    fresh.load_state_dict(torch.load(buffer))
    return clone, fresh


class TestGlobalAvgPool:
    def test_smoke_and_cardinality(self):
        x = torch.randn(2, 5, 3, 4)
        torch.testing.assert_close(GlobalAvgPool()(x), x.flatten(2).mean(dim=2))
        torch.testing.assert_close(GlobalAvgPool()(x.flatten(2).transpose(1, 2)), x.flatten(2).mean(dim=2))
        for shape in [(1, 1, 1, 1), (0, 3, 2, 2), (4, 7, 5, 1)]:
            assert GlobalAvgPool()(torch.randn(shape)).shape == shape[:2]
        assert GlobalAvgPool().output_dim(7) == 7

    def test_exception(self):
        with pytest.raises(ValueError, match=r"input must be a feature map \(B, C, H, W\) or a token sequence "
                           r"\(B, N, C\), but got a 2-D tensor of shape \(2, 3\)"):
            GlobalAvgPool()(torch.randn(2, 3))
        with pytest.raises(TypeError, match="floating-point"):
            GlobalAvgPool()(torch.ones(2, 3, 2, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="pools one stream, but got two"):
            GlobalAvgPool().output_dim(3, 4)

    def test_noncontiguous_gradcheck_compile(self):
        x = torch.randn(2, 4, 6, 3, dtype=torch.float64)
        strided, cl = x[:, :, ::2], x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(GlobalAvgPool()(strided), GlobalAvgPool()(strided.contiguous()))
        torch.testing.assert_close(GlobalAvgPool()(cl), GlobalAvgPool()(x))
        assert torch.autograd.gradcheck(GlobalAvgPool(), (x.requires_grad_(),))
        assert_compiled_matches(GlobalAvgPool(), torch.randn(2, 4, 3, 3, requires_grad=True), fullgraph=True)


class TestChannelReduction:
    def test_smoke_and_definition(self):
        layer = ChannelReduction(6, 3).eval()
        x = torch.randn(2, 6, 4, 5)
        conv, bn = layer[0], layer[1]
        expected = torch.relu(bn(torch.nn.functional.conv2d(x, conv.weight)))
        torch.testing.assert_close(layer(x), expected)
        assert layer(torch.randn(1, 6, 1, 1)).shape == (1, 3, 1, 1)

    def test_noncontiguous_and_channels_last(self):
        layer = ChannelReduction(6, 3).eval()
        x = torch.randn(2, 6, 8, 5)
        torch.testing.assert_close(layer(x[:, :, ::2]), layer(x[:, :, ::2].contiguous()))
        torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), layer(x))

    def test_gradcheck_compile_pickle(self):
        layer = ChannelReduction(4, 2, dtype=torch.float64).eval()
        x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,))
        assert_compiled_matches(layer, x, fullgraph=True)
        for other in roundtrip(layer):
            torch.testing.assert_close(other(x), layer(x))


class TestSEBlockConventions:
    @pytest.mark.parametrize(("shape", "reduction"), [((1, 3, 1, 1), 8), ((2, 16, 5, 3), 4), ((3, 7, 2), 2)])
    def test_cardinality(self, shape, reduction):
        se = SEBlock(shape[1] if len(shape) == 4 else shape[2], reduction=reduction)
        assert se(torch.randn(shape)).shape == shape
        assert se.hidden == max(1, se.channels // reduction)

    def test_noncontiguous_channels_last_pickle(self):
        se = SEBlock(6, reduction=2)
        x = torch.randn(2, 6, 8, 5)
        torch.testing.assert_close(se(x[:, :, ::2]), se(x[:, :, ::2].contiguous()))
        torch.testing.assert_close(se(x.contiguous(memory_format=torch.channels_last)), se(x))
        for other in roundtrip(se):
            torch.testing.assert_close(other(x), se(x))


class TestWideLinearConventions:
    def test_gradcheck_compile_pickle(self):
        layer = WideLinear(6, 3, dtype=torch.float64)
        x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,))
        assert_compiled_matches(layer, x, fullgraph=True)
        for other in roundtrip(layer):
            assert type(other) is WideLinear
            torch.testing.assert_close(other(x), layer(x))


def test_seed_takes_numpy_integers_as_the_sizes_do():
    a = CompactBilinearPool(in_channels=np.int64(4), out_features=16, seed=np.int64(3))
    b = CompactBilinearPool(in_channels=4, out_features=16, seed=3)
    assert a.seed == 3 and type(a.seed) is int
    assert_same_state(state(a), state(b))
    assert CompactBilinearPool(in_channels=4, out_features=16, seed=torch.tensor(3)).seed == 3
    for bad in (1.0, True, "3", np.bool_(True), torch.tensor(True), torch.tensor([3])):
        with pytest.raises(TypeError, match=f"seed must be an int, but got {type(bad).__name__}"):
            CompactBilinearPool(in_channels=4, out_features=16, seed=bad)


def test_flags_and_names_are_checked():
    from bilinearpool import BCNN, build_model

    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(TypeError, match=r"shared must be True or False, but got 1 \(int\)"):
        BCNN(conv, num_classes=2, shared=1)
    with pytest.raises(TypeError, match=r"head must be a str, one of \[.*\], but got int"):
        build_model(1, conv, num_classes=2)
    with pytest.raises(ValueError, match=r"bias=False applies to the output map \(out_features\)"):
        LowRankBilinearPool(in_channels=8, rank=4, bias=False)


@pytest.mark.parametrize(
    "module",
    ["bilinearpool", "bilinearpool.functional", "bilinearpool.models", "bilinearpool.bench",
     "bilinearpool.pooling", "bilinearpool.norm", "bilinearpool.functional._checks"],
)
def test_all_is_sorted_and_complete(module):
    import importlib

    mod = importlib.import_module(module)
    assert mod.__all__ == sorted(mod.__all__)
    assert all(hasattr(mod, name) for name in mod.__all__)


@pytest.mark.parametrize("layer", [SEBlock(8), ChannelReduction(8, 4), GlobalAvgPool()], ids=["se", "reduction", "gap"])
def test_integer_input_is_a_type_error(layer):
    """Images not yet converted: the layer says so (torch's errors named other dtypes)."""
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 8, 3, 3, dtype=torch.uint8))


def _autocast_layers() -> dict[str, tuple[nn.Module, tuple[int, ...], bool]]:
    """name -> (layer, input shape, whether autocast may change its values: layers with
    a convolution or linear map run those in bfloat16 there)."""
    from bilinearpool import BilinearPool, FastBilinearPool, L2Normalize, MatrixSqrt, SignedSqrt

    layers = {
        "fast": (FastBilinearPool(), (2, 6, 3, 3), False),
        "fast-triu-save": (FastBilinearPool(triu=True, save_output=True), (2, 6, 3, 3), False),
        "fast-tokens-sum": (FastBilinearPool(reduction="sum"), (2, 9, 6), False),
        "bilinear": (BilinearPool(normalize=True), (2, 6, 3, 3), False),
        "signed-sqrt": (SignedSqrt(), (2, 6, 3, 3), False),
        "l2": (L2Normalize(), (2, 6, 3, 3), False),
        "covariance": (CovariancePool(), (2, 6, 3, 3), False),
        "compact-fft": (CompactBilinearPool(in_channels=6, out_features=16), (2, 6, 3, 3), False),
        "compact-maclaurin": (
            CompactBilinearPool(in_channels=6, out_features=16, method="random_maclaurin"), (2, 6, 3, 3), True
        ),
        "low-rank": (LowRankBilinearPool(in_channels=6, rank=4, out_features=5), (2, 6, 3, 3), True),
        "covariance-reduced": (CovariancePool(in_channels=6, reduced_channels=4), (2, 6, 3, 3), True),
        "gap": (GlobalAvgPool(), (2, 6, 3, 3), False),
        "se": (SEBlock(6, reduction=2), (2, 6, 3, 3), True),
        "reduction": (ChannelReduction(6, 4), (2, 6, 3, 3), True),
        "wide-linear": (WideLinear(6, 3), (2, 6), True),
    }
    for impl in ("spectral", "iterative"):
        layers[f"covariance-sqrtm-{impl}"] = (CovariancePool(norm=MatrixSqrt(impl=impl)), (2, 6, 3, 3), False)
    layers["covariance-sqrtm-eig"] = (CovariancePool(norm=MatrixSqrt(method="eig")), (2, 6, 3, 3), False)
    return layers


@pytest.mark.parametrize("name", list(_autocast_layers()))
def test_backward_inside_autocast(name):
    """Forward and backward of every layer inside a CPU autocast region (as a gradient
    penalty's ``autograd.grad`` or a loop that calls ``backward`` there runs them): the
    input's gradient keeps its dtype and is finite, and where the layer has no
    convolution or linear map it equals the gradient without autocast (second-order
    statistics are computed in float32 in both). The matrix square root's spectral and
    eig backwards once failed here."""
    torch.manual_seed(0)
    layer, shape, changes = _autocast_layers()[name]
    x = torch.randn(*shape).abs().add_(0.1).requires_grad_()
    weights = None

    def loss(out: torch.Tensor) -> torch.Tensor:
        nonlocal weights
        weights = torch.randn(out.shape) if weights is None else weights
        return (out.float() * weights).sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        (grad,) = torch.autograd.grad(loss(layer(x)), x)
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.isfinite().all()
    if not changes:
        (expected,) = torch.autograd.grad(loss(layer(x)), x)
        torch.testing.assert_close(grad, expected)


def _traced_layers() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """name -> (layer, example inputs to trace with, other inputs: other batch and spatial
    sizes, and streams of different sizes for the resizing pool)."""
    from bilinearpool import BilinearPool

    def maps(b: int, c: int, h: int, w: int) -> torch.Tensor:
        return torch.randn(b, c, h, w)

    layers = {
        "covariance": (CovariancePool(in_channels=6), (maps(2, 6, 3, 3),), (maps(3, 6, 5, 4),)),
        "covariance-reduced": (
            CovariancePool(in_channels=6, reduced_channels=4), (maps(2, 6, 3, 3),), (maps(3, 6, 5, 4),)
        ),
        "low-rank-out": (
            LowRankBilinearPool(in_channels=6, rank=3, out_features=5), (maps(2, 6, 3, 3),), (maps(3, 6, 5, 4),)
        ),
        "channel-reduction": (ChannelReduction(6, 4), (maps(2, 6, 3, 3),), (maps(3, 6, 5, 4),)),
        "se": (SEBlock(6, reduction=2), (maps(2, 6, 3, 3),), (maps(3, 6, 5, 4),)),
    }
    for mode in ("bilinear", "bicubic", "nearest", "area"):
        layers[f"bilinear-resize-{mode}"] = (
            BilinearPool(resize=mode, normalize=True),
            (maps(2, 6, 4, 4), maps(2, 5, 4, 4)),  # traced with streams of the same size
            (maps(3, 6, 6, 6), maps(3, 5, 3, 3)),
        )
    return layers


@pytest.mark.parametrize("name", list(_traced_layers()))
def test_jit_trace_without_tracer_warnings_and_general(name):
    """torch.jit.trace records no TracerWarning from the library's checks (they compare
    traced sizes and are skipped while traced), and the trace equals the layer on inputs
    of other sizes: BilinearPool(resize=...) traced with streams of one size resizes
    streams of different sizes (it records the resize always, an identity at equal
    sizes)."""
    import warnings

    torch.manual_seed(0)
    layer, example, other = _traced_layers()[name]
    layer.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(layer, example)
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and "bilinearpool" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    torch.testing.assert_close(traced(*example), layer(*example))
    torch.testing.assert_close(traced(*other), layer(*other))
