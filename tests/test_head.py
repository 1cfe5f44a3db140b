"""fast_bilinear_linear: the Fast BCNN head (pooling, normalisation, classifier) in one call.

Its panel path (CPU inference) is compared with the definition it replaces,
``wide_linear(fast_bilinear_pool(x), W, b)``, which is itself tested against the
op-by-op chain; and the classifiers are checked to give the same logits with and without it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilinearpool import (
    BCNN,
    BilinearClassifier,
    BilinearPool,
    CompactBilinearPool,
    FastBCNN,
    FastBilinearPool,
    GAPClassifier,
)
from bilinearpool.functional import fast_bilinear_linear, fast_bilinear_pool, head, triu_size
from bilinearpool.functional.bilinear import bilinear_pool, l2_normalize, signed_sqrt, triu_pack


def naive_logits(x, w, b, *, reduction="mean", signed_sqrt_=True, l2=True, triu=False, eps=1e-5, l2_eps=1e-12):
    """The op-by-op definition: pool, signed sqrt, L2, (pack), linear."""
    g = bilinear_pool(x, reduction=reduction)
    if signed_sqrt_:
        g = signed_sqrt(g, eps=eps)
    z = triu_pack(g) if triu else g.flatten(1)
    if l2:
        z = l2_normalize(z, eps=l2_eps)
    return F.linear(z, w, b)


def classifier_for(channels, triu, classes=5, *, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    d = triu_size(channels) if triu else channels * channels
    w = torch.randn(classes, d, generator=g, dtype=dtype)
    return w, (torch.randn(classes, generator=g, dtype=dtype) if bias else None)


def no_composition(*args, **kwargs):
    raise AssertionError("the panel path must not build the pooled features")


# Shapes: one panel, a remainder panel (300 rows = 128 + 128 + 44), batch 1, a large batch
# (six groups of 8 samples), and tokens (B, N, C).
SHAPES = [(2, 64, 5, 5), (3, 300, 4, 4), (1, 130, 7, 7), (48, 280, 2, 2), (4, 10, 37)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("triu", [False, True])
@pytest.mark.parametrize(
    "options",
    [{}, {"signed_sqrt": False}, {"l2_normalize": False}, {"reduction": "sum", "eps": 1e-3}, {"l2_eps": 1e3}],
    ids=["default", "no-sqrt", "no-l2", "sum-eps", "l2-floor"],
)
def test_panel_path_equals_the_definition(shape, triu, options, monkeypatch):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.relu(torch.randn(shape, generator=g, dtype=torch.float64)) - 0.1  # some negative entries
    c = shape[1] if len(shape) == 4 else shape[2]
    w, b = classifier_for(c, triu)
    ref = naive_logits(
        x, w, b, reduction=options.get("reduction", "mean"), signed_sqrt_=options.get("signed_sqrt", True),
        l2=options.get("l2_normalize", True), triu=triu, eps=options.get("eps", 1e-5),
        l2_eps=options.get("l2_eps", 1e-12),
    )
    monkeypatch.setattr(head, "fast_bilinear_pool", no_composition)
    with torch.no_grad():
        out = fast_bilinear_linear(x, w, b, triu=triu, **options)
    assert out.shape == (shape[0], 5) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("triu", [False, True])
def test_thin_panels_and_a_last_group(triu, monkeypatch):
    """Fewer entries per panel: 32-row panels (100 = 3 x 32 + 4), and 11 samples = 8 + 3."""
    monkeypatch.setattr(head, "_PANEL_ENTRIES", 1 << 12)
    x = torch.relu(torch.randn(11, 100, 3, 3, dtype=torch.float64))
    w, b = classifier_for(100, triu)
    ref = naive_logits(x, w, b, triu=triu)
    monkeypatch.setattr(head, "fast_bilinear_pool", no_composition)
    with torch.no_grad():
        torch.testing.assert_close(fast_bilinear_linear(x, w, b, triu=triu), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels", [512, 1024])
def test_panel_path_allocates_its_panel_buffers_once(channels):
    """The panel and the signed square root's denominator are allocated once per call,
    not once per panel (4 and 8 panels here): a fresh panel-sized temporary per panel
    cost 1.2 ms against 0.3 ms for the pass itself at a Fast BCNN head's 2 MiB panels
    (fresh pages each time, as with THP_MEM_ALLOC_ENABLE=1)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.relu(torch.randn(2, channels, 7, 7))
    w, b = classifier_for(channels, False, classes=3, dtype=torch.float32)
    panel_bytes = 2 * 128 * channels * 4  # 128-row panels of both samples
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fast_bilinear_linear(x, w, b)
    large = [e.name for e in prof.events() if e.name != "[memory]" and e.self_cpu_memory_usage >= panel_bytes]
    assert len(large) == 2, large  # the panel buffer and the denominator's scratch
    torch.testing.assert_close(out, F.linear(fast_bilinear_pool(x), w, b), rtol=1e-4, atol=1e-5)


def test_panel_path_float32_channels_last_and_no_bias(monkeypatch):
    x = torch.relu(torch.randn(3, 200, 6, 6)).to(memory_format=torch.channels_last)
    w, _ = classifier_for(200, False, dtype=torch.float32, bias=False)
    w = w / 200.0
    ref = F.linear(fast_bilinear_pool(x), w)
    monkeypatch.setattr(head, "fast_bilinear_pool", no_composition)
    with torch.inference_mode():
        out = fast_bilinear_linear(x, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_all_zero_features_give_the_bias():
    """The L2 norm is clamped (l2_eps): zero features give zero pre-bias logits, not NaN."""
    w, b = classifier_for(16, False)
    with torch.no_grad():
        out = fast_bilinear_linear(torch.zeros(2, 16, 3, 3, dtype=torch.float64), w, b)
    torch.testing.assert_close(out, b.expand(2, -1))


def test_empty_batch():
    w, b = classifier_for(16, True)
    with torch.no_grad():
        assert fast_bilinear_linear(torch.zeros(0, 16, 3, 3, dtype=torch.float64), w, b, triu=True).shape == (0, 5)


@pytest.mark.parametrize("triu", [False, True])
def test_gradients_go_through_the_definition(triu):
    """With gradients the call is the pooling then the classifier; gradients match the chain."""
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    w, b = classifier_for(6, triu)
    w.requires_grad_()
    b.requires_grad_()
    out = fast_bilinear_linear(x, w, b, triu=triu)
    ref = naive_logits(x, w, b, triu=triu)
    dz = torch.randn(out.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, (x, w, b), dz), torch.autograd.grad(ref, (x, w, b), dz)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x, w, b: fast_bilinear_linear(x, w, b, triu=triu), (x, w, b))


def _saved_storages(fn):
    """The storages (data pointer -> bytes) autograd saves while ``fn()`` runs, and its result."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("triu", [False, True])
def test_training_keeps_the_features_once(triu, monkeypatch):
    """With a weight that needs a gradient the classifier keeps the features; the pooling
    then keeps the same tensor (save_output), so the graph holds the input, the features
    (once), the weight and one norm per sample; with a frozen weight the input and the
    weight (for the features' gradient)."""
    x = torch.relu(torch.randn(3, 6, 4, 4)).requires_grad_()
    w, b = (t.float() for t in classifier_for(6, triu))
    kept: list[bool] = []
    pool = head.fast_bilinear_pool

    def spy(*args, **kwargs):
        kept.append(kwargs["save_output"])
        return pool(*args, **kwargs)

    monkeypatch.setattr(head, "fast_bilinear_pool", spy)
    w.requires_grad_()
    saved, out = _saved_storages(lambda: fast_bilinear_linear(x, w, b, triu=triu))
    features = w.shape[1] * 3 * 4
    assert kept == [True]
    assert sorted(saved.values()) == sorted([x.numel() * 4, features, w.numel() * 4, 3 * 4])
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.linear(fast_bilinear_pool(ref_x, triu=triu), ref_w, b)
    torch.testing.assert_close(out, ref)
    dz = torch.randn(out.shape)
    for got, want in zip(torch.autograd.grad(out, (x, w), dz), torch.autograd.grad(ref, (ref_x, ref_w), dz)):
        torch.testing.assert_close(got, want)
    w.requires_grad_(False)
    saved, _ = _saved_storages(lambda: fast_bilinear_linear(x, w, b, triu=triu))
    assert kept == [True, False] and sorted(saved.values()) == sorted([x.numel() * 4, w.numel() * 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the classifier keeps a bfloat16 copy
        fast_bilinear_linear(x, w.requires_grad_(), b, triu=triu)
    assert kept[-1] is False


def test_when_the_panel_path_runs():
    a = torch.randn(2, 8, 25)
    w, b = torch.randn(3, 64), torch.randn(3)
    with torch.no_grad():
        assert head._path(a, w, b) == "panel"
        assert head._path(torch.randn(2, 8, head.FUSED_MAX_LOCATIONS), w, b) == "panel"  # at the limit
        assert head._path(torch.randn(2, 8, head.FUSED_MAX_LOCATIONS + 1), w, b) is None  # many locations
        assert head._path(a.half(), w.half(), b.half()) is None  # half precision
        assert head._path(a, w.double(), b) is None  # mixed dtypes
        with torch.autocast("cpu"):
            assert head._path(a, w, b) is None
    assert head._path(a, w, b) == "panel"  # grad mode, but nothing requires a gradient
    assert head._path(a, w.requires_grad_(), b) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_the_definitions_values(dtype):
    x = torch.relu(torch.randn(2, 8, 3, 3)).to(dtype)
    w, b = (t.to(dtype) for t in classifier_for(8, False, dtype=torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(fast_bilinear_linear(x, w, b), F.linear(fast_bilinear_pool(x), w, b))


def test_errors_say_what_was_expected():
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match=r"weight must be \(num_classes, C\^2 = 64\).*got shape \(3, 36\)"):
        fast_bilinear_linear(x, torch.randn(3, 36))
    with pytest.raises(ValueError, match=r"C\(C\+1\)/2 = 36 \(triu=True\).*got shape \(3, 64\)"):
        fast_bilinear_linear(x, torch.randn(3, 64), triu=True)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\), but got \(4,\)"):
        fast_bilinear_linear(x, torch.randn(3, 64), torch.randn(4))
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        fast_bilinear_linear(x, torch.ones(3, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="feature map"):
        fast_bilinear_linear(torch.randn(8, 3), torch.randn(3, 64))
    with pytest.raises(ValueError, match="reduction"):
        fast_bilinear_linear(x, torch.randn(3, 64), reduction="max")


# -- the classifiers --------------------------------------------------------------------------


def tiny_backbone(channels: int = 12) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, channels, 3, stride=4), nn.ReLU())


def unfused_logits(model: BilinearClassifier, x: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.dropout(model.forward_embedding(x)))


@pytest.mark.parametrize("triu", [False, True])
def test_fast_bcnn_forward_uses_the_panel_path_with_the_same_logits(triu, monkeypatch):
    torch.manual_seed(0)
    model = FastBCNN(tiny_backbone(), num_classes=4, triu=triu).double().eval()
    x = torch.randn(3, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        ref = unfused_logits(model, x)
        monkeypatch.setattr(head, "fast_bilinear_pool", no_composition)
        assert model._fused_head()
        torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-12)


def test_training_forward_and_backward_are_unchanged():
    torch.manual_seed(0)
    model = FastBCNN(tiny_backbone(), num_classes=4).double()
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    out = model(x)
    torch.testing.assert_close(out, unfused_logits(model, x))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("shared", [False, True])
def test_bcnn_training_pools_keeping_the_output_the_classifier_keeps(shared, monkeypatch):
    """BCNN (two streams, or one shared backbone): in training the pooling keeps its output
    for backward when the classifier keeps it (weight needs a gradient, dropout inactive);
    logits and gradients are those of the modules one by one."""
    import bilinearpool.pooling as pooling

    torch.manual_seed(0)
    model = BCNN(tiny_backbone(), tiny_backbone(8) if not shared else None, num_classes=4, shared=shared).double()
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    kept: list[bool] = []
    fused = pooling._F.fast_bilinear_pool

    def spy(*args, **kwargs):
        kept.append(kwargs["save_output"])
        return fused(*args, **kwargs)

    monkeypatch.setattr(pooling._F, "fast_bilinear_pool", spy)
    out = model(x)
    (grads,) = [torch.autograd.grad(out.square().sum(), list(model.parameters()))]
    ref = unfused_logits(model, x)
    want = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    assert kept == [True, False]  # forward, then the reference through the modules
    torch.testing.assert_close(out, ref)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp)
    model.classifier.requires_grad_(False)  # a frozen classifier keeps no features
    model(x)
    assert kept[-1] is False
    model.classifier.requires_grad_(True)
    dropped = BCNN(tiny_backbone(), num_classes=4, dropout=0.5).double()
    dropped(x)  # active dropout: the classifier keeps dropout's output, not the pooling's
    assert kept[-1] is False


def test_hooks_dropout_and_subclasses_keep_the_modules_path():
    torch.manual_seed(0)
    model = FastBCNN(tiny_backbone(), num_classes=4).eval()
    x = torch.randn(2, 3, 24, 24)
    seen = []
    handle = model.classifier.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        assert not model._fused_head()
        model(x)
    assert seen == [(2, 144)]  # the hook saw the embedding
    handle.remove()
    handle = model.pool.register_forward_pre_hook(lambda m, i: None)
    assert not model._fused_head()
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    assert not model._fused_head()
    handle.remove()
    assert model._fused_head()

    dropped = FastBCNN(tiny_backbone(), num_classes=4, dropout=0.5)
    assert not dropped._fused_head()  # training: dropout is active
    assert dropped.eval()._fused_head()

    class MyPool(FastBilinearPool):
        def forward(self, x):
            return super().forward(x) * 2.0

    class MyModel(FastBCNN):
        def forward_embedding(self, x):
            return super().forward_embedding(x) * 2.0

    assert not FastBCNN(tiny_backbone(), num_classes=4, pool=MyPool()).eval()._fused_head()
    assert not MyModel(tiny_backbone(), num_classes=4).eval()._fused_head()
    assert not BCNN(tiny_backbone(), num_classes=4).eval()._fused_head()
    assert not GAPClassifier(tiny_backbone(), num_classes=4).eval()._fused_head()
    model.classifier = nn.Sequential(nn.Linear(144, 4))
    assert not model._fused_head()


def test_fast_bcnn_exports_to_onnx_and_compiles():
    """Traced (ONNX export, torch.compile) the model runs its modules one by one: the
    exported graph and the compiled model give the eager logits."""
    from _onnx import run_onnx

    torch.manual_seed(0)
    model = FastBCNN(tiny_backbone(), num_classes=4).eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(torch.from_numpy(run_onnx(model, x)), eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.compile(model, backend="eager")(x), eager, rtol=1e-5, atol=1e-6)


def test_pool_options_configure_the_functions():
    pool = FastBilinearPool(reduction="sum", l2_normalize=False, triu=True, eps=1e-3)
    assert pool.options() == {
        "reduction": "sum", "signed_sqrt": True, "l2_normalize": False, "triu": True, "eps": 1e-3, "save_output": False
    }  # fmt: skip
    x = torch.relu(torch.randn(2, 6, 3, 3, dtype=torch.float64))
    w, b = classifier_for(6, True)
    torch.testing.assert_close(pool(x), fast_bilinear_pool(x, **pool.options()))
    with torch.no_grad():
        torch.testing.assert_close(fast_bilinear_linear(x, w, b, **pool.options()), F.linear(pool(x), w, b))
    # no signed square root: no eps to pass on (the functions refuse one there)
    plain = FastBilinearPool(signed_sqrt=False, triu=True)
    assert plain.eps is None and plain.options()["eps"] is None and "eps" not in repr(plain)
    with torch.no_grad():
        torch.testing.assert_close(fast_bilinear_linear(x, w, b, **plain.options()), F.linear(plain(x), w, b))


# -- folding a trained full-output classifier onto the packed triangle ------------------------


def test_triu_fold_gives_the_same_outputs_on_packed_symmetric_matrices():
    from bilinearpool.functional import triu_fold

    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 49, generator=g, dtype=torch.float64)
    s = torch.randn(4, 7, 7, generator=g, dtype=torch.float64)
    s = s + s.transpose(1, 2)
    folded = triu_fold(w)
    assert folded.shape == (5, 28)
    torch.testing.assert_close(F.linear(triu_pack(s), folded), F.linear(s.flatten(1), w), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"weight must be \(K, C\^2\).*got shape \(5, 50\)"):
        triu_fold(torch.randn(5, 50))
    with pytest.raises(TypeError, match="floating-point"):
        triu_fold(torch.ones(2, 4, dtype=torch.long))


def test_to_triu_keeps_the_logits_and_halves_the_classifier():
    torch.manual_seed(0)
    model = FastBCNN(tiny_backbone(), num_classes=4).double().eval()
    x = torch.randn(5, 3, 24, 24, dtype=torch.float64)
    packed = model.to_triu()
    assert isinstance(packed, FastBCNN) and packed.pool.triu and not model.pool.triu
    assert packed.embedding_dim == triu_size(12) == 78 and model.embedding_dim == 144
    assert packed.classifier.weight.shape == (4, 78) and model.classifier.weight.shape == (4, 144)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(model) - n_params(packed) == 4 * (144 - 78)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), rtol=1e-10, atol=1e-12)
        e_full, e_packed = model.forward_embedding(x), packed.forward_embedding(x)
        torch.testing.assert_close(torch.cdist(e_packed, e_packed), torch.cdist(e_full, e_full))  # an isometry
    # A copy: training the new model leaves the old one alone.
    with torch.no_grad():
        next(packed.backbone.parameters()).add_(1.0)
    assert not torch.equal(next(packed.backbone.parameters()), next(model.backbone.parameters()))
    # Its checkpoint loads into a model built with triu=True.
    fresh = FastBCNN(tiny_backbone(), num_classes=4, triu=True).double().eval()
    fresh.load_state_dict(packed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), packed(x))


def test_to_triu_refuses_models_it_cannot_fold():
    for model in (
        FastBCNN(tiny_backbone(), num_classes=3, triu=True),
        GAPClassifier(tiny_backbone(), num_classes=3),
        BCNN(tiny_backbone(), num_classes=3),
    ):
        with pytest.raises(ValueError, match="to_triu needs a FastBilinearPool with triu=False"):
            model.to_triu()
    model = FastBCNN(tiny_backbone(), num_classes=3)
    model.classifier = nn.Sequential(nn.Linear(144, 3))
    with pytest.raises(ValueError, match="to_triu needs a linear classifier, but got Sequential"):
        model.to_triu()


def test_mixed_dtypes_are_named():
    """What F.linear refuses ('mat1 and mat2 must have the same dtype') is refused naming
    the tensor; under autocast mixed dtypes are autocast's to handle."""
    x = torch.relu(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    w, b = classifier_for(4, False, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"weight must have the input's dtype torch.float64 \(torch.autocast "
                                        r"leaves float64 alone\), but got torch.float32: convert one of them "
                                        r"\(e.g. the classifier with .to\(torch.float64\)\)$"):
        fast_bilinear_linear(x, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is not autocast's: F.linear's error before
        with pytest.raises(TypeError, match=r"input's dtype torch.float64 \(torch.autocast leaves float64 alone"):
            fast_bilinear_linear(x, w, b)
    with pytest.raises(TypeError, match=r"input's dtype torch.bfloat16 outside torch.autocast, but got "
                                        r"torch.float32: .*, or run under torch.autocast$"):
        fast_bilinear_linear(x.bfloat16(), w, b)
    with pytest.raises(TypeError, match=r"weight must have the input's dtype torch.float16 \(or "
                                        r"torch.float32, the features' dtype\).*got torch.float64"):
        fast_bilinear_linear(x.half(), w.double(), b.double(), l2_normalize=False)
    with pytest.raises(TypeError, match="bias must have the weight's dtype torch.float32, but got torch.float64"):
        fast_bilinear_linear(x.float(), w, b.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast_bilinear_linear(x.bfloat16(), w, b).shape == (2, 5)  # bfloat16 x, float32 weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weight_gets_half_features_without_l2(dtype):
    # The pooling keeps float32 for half input without L2; a classifier of the input's
    # dtype (a model made .half()) gets the features cast to it, as nn.Linear needs.
    x = torch.relu(torch.randn(2, 6, 4, 4)).to(dtype)
    w, b = classifier_for(6, False, dtype=torch.float32)
    logits = fast_bilinear_linear(x, w.to(dtype), b.to(dtype), l2_normalize=False)
    assert logits.dtype == dtype
    expected = F.linear(fast_bilinear_pool(x, l2_normalize=False).to(dtype), w.to(dtype), b.to(dtype))
    torch.testing.assert_close(logits, expected)
    # A float32 weight (mixed precision by hand) keeps the float32 features.
    assert fast_bilinear_linear(x, w, b, l2_normalize=False).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "make",
    [
        lambda: FastBCNN(tiny_backbone(), num_classes=3, pool=FastBilinearPool(l2_normalize=False)),
        lambda: FastBCNN(tiny_backbone(), num_classes=3, pool=FastBilinearPool(l2_normalize=False), dropout=0.5),
        lambda: BCNN(tiny_backbone(), tiny_backbone(), num_classes=3, pool=BilinearPool()),
        lambda: BilinearClassifier(tiny_backbone(), pool=CompactBilinearPool(in_channels=12, out_features=32), num_classes=3),
    ],
    ids=["fast-raw", "fast-raw-dropout", "bcnn-raw", "compact"],
)
def test_half_models_with_float32_poolings(make, dtype):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = model.eval()(x) - model.classifier.bias  # what the features contribute
    half = model.to(dtype)
    xh = x.to(dtype)
    for mode in ("train", "eval"):
        getattr(half, mode)()
        out = half(xh)
        assert out.dtype == dtype
    with torch.no_grad():
        out = half(xh)
        # The model's own definition in half precision: features cast, then its classifier.
        torch.testing.assert_close(out, half.classifier(half.forward_embedding(xh).to(dtype)))
        assert reference.abs().max() > 1e-2  # the features matter for these logits
        got = out.float() - half.classifier.bias.float()
        torch.testing.assert_close(got, reference, rtol=3e-2, atol=3e-2 * float(reference.abs().max()))


def test_flags_checked_on_the_panel_path_too():
    # The panel path ran "no" as True under no_grad, while training raised.
    x, w = torch.rand(2, 6, 3, 3), torch.randn(4, 36)
    for flag in ("signed_sqrt", "l2_normalize", "triu", "save_output"):
        with torch.no_grad(), pytest.raises(TypeError, match=f"{flag} must be True or False, but got 'no'"):
            fast_bilinear_linear(x, w, **{flag: "no"})


@pytest.mark.parametrize("part", ["pool", "dropout", "classifier"])
def test_forward_replaced_on_the_object_is_called(part):
    # A wrapper set on the instance (monkeypatching, accelerate's hooks) must run: the
    # fused head would skip it.
    torch.manual_seed(0)
    model = FastBCNN(tiny_backbone(), num_classes=4).eval()
    x = torch.randn(2, 3, 24, 24)
    module = getattr(model, part)
    calls = []
    original = module.forward

    def halved(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs) / 2

    module.forward = halved
    with torch.no_grad():
        out = model(x)
        assert calls
        pooled = model.pool(model.forward_features(x))
        expected = model.classifier(model.dropout(pooled))
    torch.testing.assert_close(out, expected)


def test_to_triu_keeps_a_frozen_classifier_frozen():
    model = FastBCNN(tiny_backbone(), num_classes=4)
    model.classifier.requires_grad_(False)
    packed = model.to_triu()
    assert not packed.classifier.weight.requires_grad and not packed.classifier.bias.requires_grad
    assert all(p.requires_grad for p in packed.backbone.parameters())
    assert FastBCNN(tiny_backbone(), num_classes=4).to_triu().classifier.weight.requires_grad


@pytest.mark.parametrize("triu", [False, True])
def test_the_function_compiles_in_one_graph(triu):
    """Compiled (inference and training), the one-step head gives the definition's logits
    and gradients."""
    x = torch.relu(torch.randn(2, 8, 5, 5, dtype=torch.float64)).requires_grad_()
    w, b = classifier_for(8, triu)
    with torch.no_grad():
        compiled = torch.compile(fast_bilinear_linear, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, w, b, triu=triu), F.linear(fast_bilinear_pool(x, triu=triu), w, b))
    compiled = torch.compile(fast_bilinear_linear, backend="aot_eager", fullgraph=True)
    out = compiled(x, w, b, triu=triu)
    dz = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, dz)
    (want,) = torch.autograd.grad(F.linear(fast_bilinear_pool(x, triu=triu), w, b), x, dz)
    torch.testing.assert_close(got, want)
