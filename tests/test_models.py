"""Classifiers on arbitrary backbones: shapes, parameter counts, embeddings, round-trips."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from bilinearpool import (
    BCNN,
    BilinearClassifier,
    BilinearPool,
    ChannelReduction,
    FastBCNN,
    GAPClassifier,
    SEBlock,
    WideLinear,
    build_backbone,
    build_model,
)


def tiny(channels: int = 8, stride: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, channels, 3, stride=stride, padding=1), nn.BatchNorm2d(channels), nn.ReLU())


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


X = torch.randn(2, 3, 32, 32)


class TestFastBCNN:
    def test_shapes_and_embedding(self):
        model = FastBCNN(tiny(8), num_classes=5).eval()
        assert model(X).shape == (2, 5)
        emb = model.forward_embedding(X)
        assert emb.shape == (2, 64) and model.embedding_dim == 64
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(model(X), model.classifier(emb))

    def test_parameter_count(self):
        body = tiny(8)
        model = FastBCNN(body, num_classes=5)
        assert n_params(model) == n_params(body) + 64 * 5 + 5
        assert n_params(FastBCNN(tiny(8), num_classes=5, triu=True)) == n_params(body) + 36 * 5 + 5

    def test_channel_reduction_refuses_tokens_and_other_channels(self):
        # Tokens gave the convolution's own RuntimeError about its weight's shape.
        layer = ChannelReduction(8, 4)
        with pytest.raises(ValueError, match=r"expected feature maps \(B, 8, H, W\), but got shape "
                           r"\(2, 5, 8\); token sequences \(B, N, C\) need a linear layer"):
            layer(torch.randn(2, 5, 8))
        with pytest.raises(ValueError, match=r"expected feature maps \(B, 8, H, W\), but got shape \(2, 6, 3, 3\)$"):
            layer(torch.randn(2, 6, 3, 3))
        assert layer(torch.randn(2, 8, 3, 3)).shape == (2, 4, 3, 3)
        assert layer(input=torch.randn(2, 8, 3, 3)).shape == (2, 4, 3, 3)  # nn.Sequential's name
        assert list(layer.state_dict()) == list(nn.Sequential(*layer).state_dict())

    def test_reduce_dim(self):
        model = FastBCNN(tiny(16), num_classes=3, reduce_dim=4)
        assert isinstance(model.reduce, ChannelReduction) and model.embedding_dim == 16
        assert model.forward_features(X).shape[1] == 4

    def test_custom_pool_dry_run(self):
        class MaxPool(nn.Module):  # no output_dim: the dim is found by a dry run
            def forward(self, x):
                return x.amax(dim=(2, 3))

        model = FastBCNN(tiny(8), num_classes=2, pool=MaxPool())
        assert model.embedding_dim == 8 and model(X).shape == (2, 2)

    def test_custom_pool_whose_length_depends_on_map_size(self):
        class Flatten(nn.Module):  # (B, C*H*W): no single classifier size from a dry run
            def forward(self, x):
                return x.flatten(1)

        with pytest.raises(ValueError, match=r"depends on the feature map's size \(72 .* 3x3 maps, 200 on 5x5\).*output_dim"):
            BilinearClassifier(tiny(8), pool=Flatten(), num_classes=2)

        class FixedFlatten(Flatten):  # the user states the length for the input size used
            def output_dim(self, in_channels, in_channels_b=None):
                return in_channels * 8 * 8

        model = BilinearClassifier(tiny(8), pool=FixedFlatten(), num_classes=2)
        assert model.embedding_dim == model.forward_embedding(X).shape[1]

    def test_custom_pool_dry_run_in_pool_dtype(self):
        class Projection(nn.Module):  # float64 parameters: the dry run must use float64
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 5)

            def forward(self, x):
                return self.fc(x.mean(dim=(2, 3)))

        model = BilinearClassifier(tiny(8).double(), pool=Projection().double(), num_classes=2).double()
        assert model.embedding_dim == 5 and model(X.double()).dtype == torch.float64

    def test_pool_of_another_dtype_is_refused_when_built(self):
        """A float64 LowRankBilinearPool in a float32 model computes in float64 (on purpose),
        which the float32 classifier refused at the first forward with torch's message."""
        from bilinearpool import LowRankBilinearPool

        message = (r"pool LowRankBilinearPool has a torch.float64 parameter \(weight_a\), but the backbone's "
                   r"parameters are torch.float32: build the pool in the model's dtype .*\.to\(dtype\) on the whole")
        with pytest.raises(TypeError, match=message):
            FastBCNN(tiny(8), num_classes=3, pool=LowRankBilinearPool(in_channels=8, rank=4).double())
        with pytest.raises(TypeError, match=message):
            BCNN(tiny(8), tiny(4), num_classes=3,
                 pool=LowRankBilinearPool(in_channels=8, in_channels_b=4, rank=4, dtype=torch.float64))
        with pytest.raises(TypeError, match=r"a torch.float32 parameter .* backbone's parameters are torch.float64"):
            FastBCNN(tiny(8).double(), num_classes=3, pool=LowRankBilinearPool(in_channels=8, rank=4))
        # one dtype throughout, converted after building: accepted, and runs
        model = FastBCNN(tiny(8), num_classes=3, pool=LowRankBilinearPool(in_channels=8, rank=4)).double()
        assert model(X.double()).dtype == torch.float64
        model = BilinearClassifier(tiny(8).double(), pool=LowRankBilinearPool(in_channels=8, rank=4).double(),
                                   num_classes=3)
        assert model.double()(X.double()).dtype == torch.float64
        # a pool without parameters, a backbone without parameters: nothing to compare
        assert FastBCNN(tiny(8).double(), num_classes=3).double()(X.double()).dtype == torch.float64
        model = FastBCNN(nn.AvgPool2d(4), num_classes=3, pool=LowRankBilinearPool(in_channels=3, rank=4).double())
        assert model.double()(X.double()).shape == (2, 3)
        # buffers follow the input's dtype (CompactBilinearPool's sketches): not compared
        from bilinearpool import CompactBilinearPool

        model = FastBCNN(tiny(8), num_classes=3, pool=CompactBilinearPool(in_channels=8, out_features=16, dtype=torch.float64))
        assert model(X).dtype == torch.float32

    def test_gradcam_layer_gives_feature_map(self):
        model = FastBCNN(tiny(8), num_classes=2)
        seen = {}
        model.gradcam_layer.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
        model(X)
        assert seen["out"].shape == (2, 8, 8, 8)

    @pytest.mark.parametrize(
        ("build", "streams"),
        [
            (lambda: FastBCNN(tiny(8), num_classes=2), 1),
            (lambda: GAPClassifier(tiny(8), num_classes=2), 1),
            (lambda: GAPClassifier("resnet18", num_classes=2, se_reduction=8), 1),
            (lambda: BCNN(tiny(8), num_classes=2), 2),
            (lambda: BCNN(tiny(8), tiny(6, stride=8), num_classes=2), 2),
            (lambda: BCNN(tiny(8), num_classes=2, shared=True), 1),
            (lambda: BilinearClassifier(tiny(8), tiny(6), pool=BilinearPool(), num_classes=2), 2),
            (lambda: build_model("bcnn", tiny(8), num_classes=2), 2),
        ],
        ids=["fast-bcnn", "plain", "plain-se", "bcnn-copy", "bcnn-two-backbones", "bcnn-shared",
             "bilinear-classifier", "build-model"],
    )
    def test_gradcam_layers_see_each_streams_feature_map(self, build, streams):
        model = build().eval()
        layers = model.gradcam_layers
        assert isinstance(layers, tuple) and len(layers) == streams
        assert layers[0] is model.gradcam_layer
        seen: list[torch.Tensor] = []
        for layer in layers:
            layer.register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            model(X)
            assert len(seen) == streams  # each layer runs once per forward
            features = model.forward_features(X)
        features = features if isinstance(features, tuple) else (features,)
        if streams == 1 and len(features) == 2:  # a shared backbone feeds both streams
            torch.testing.assert_close(features[0], features[1])
        for out, feature in zip(seen, features):
            assert out.shape == feature.shape
            torch.testing.assert_close(out, feature)

    def test_gradcam_layers_are_before_the_channel_reduction(self):
        model = BCNN(tiny(8), tiny(6, stride=8), num_classes=2, reduce_dim=4)
        seen = []
        for layer in model.gradcam_layers:
            layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
        model(X)
        assert seen == [(2, 8, 8, 8), (2, 6, 4, 4)]
        assert [tuple(f.shape) for f in model.forward_features(X)] == [(2, 4, 8, 8), (2, 4, 4, 4)]

    def test_gradcam_layers_is_read_only(self):
        model = BCNN(tiny(8), num_classes=2)
        with pytest.raises(AttributeError):
            model.gradcam_layers = (model.backbone,)

    def test_named_backbone_and_training_step(self):
        model = FastBCNN("resnet18", num_classes=8, triu=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 7]))
        loss.backward()
        opt.step()
        assert model.embedding_dim == 512 * 513 // 2 and torch.isfinite(loss)

    def test_errors(self):
        with pytest.raises(ValueError, match="num_classes must be a positive int, but got 0"):
            FastBCNN(tiny(), num_classes=0)
        with pytest.raises(ValueError, match="dropout must be a number in"):
            FastBCNN(tiny(), num_classes=2, dropout=1.5)
        with pytest.raises(ValueError, match="triu=True configures the default pool"):
            FastBCNN(tiny(), num_classes=2, pool=nn.Identity(), triu=True)

    @pytest.mark.parametrize("cls", [FastBCNN, BCNN, GAPClassifier])
    def test_argument_errors(self, cls):
        with pytest.raises(TypeError, match=r"dropout must be a number in \[0, 1\), but got None \(NoneType\)"):
            cls(tiny(), num_classes=2, dropout=None)
        with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), but got 1.0$"):
            cls(tiny(), num_classes=2, dropout=1.0)
        with pytest.raises(ValueError, match="reduce_dim must be a positive int or None, but got 0$"):
            cls(tiny(), num_classes=2, reduce_dim=0)
        with pytest.raises(TypeError, match=r"reduce_dim must be a positive int or None, but got '4' \(str\)"):
            cls(tiny(), num_classes=2, reduce_dim="4")
        with pytest.raises(TypeError, match=r"num_classes must be a positive int, but got True \(bool\)"):
            cls(tiny(), num_classes=True)
        with pytest.raises(ValueError, match="num_classes must be a positive int, but got 0$"):
            cls(tiny(), num_classes=0)

    def test_numpy_integers(self):
        model = FastBCNN(tiny(8), num_classes=np.int64(3), reduce_dim=np.int64(4))
        assert model.num_classes == 3 and type(model.num_classes) is int
        assert model.embedding_dim == 16 and model(X).shape == (2, 3)


class TestBCNN:
    def test_separate_weights_by_default(self):
        body = tiny(8)
        model = BCNN(body, num_classes=3)
        assert model.backbone is not model.backbone_b
        assert n_params(model) == 2 * n_params(body) + 64 * 3 + 3
        assert model(X).shape == (2, 3)

    def test_same_module_in_both_streams_runs_once(self):
        """BilinearClassifier(m, m) and BCNN(shared=True): one backbone pass feeds both streams."""
        body = tiny()
        calls = []
        body.register_forward_hook(lambda m, i, o: calls.append(1))
        for model in (BilinearClassifier(body, body, pool=BilinearPool(), num_classes=3),
                      BCNN(body, num_classes=3, shared=True)):
            calls.clear()
            fa, fb = model.forward_features(X)
            assert len(calls) == 1 and fa is fb
            model(X).sum().backward()

    def test_shared_equals_fast_bcnn(self):
        body = tiny(8)
        shared = BCNN(body, num_classes=3, shared=True).eval()
        fast = FastBCNN(body, num_classes=3).eval()
        fast.classifier.load_state_dict(shared.classifier.state_dict())
        torch.testing.assert_close(shared(X), fast(X))
        assert n_params(shared) == n_params(fast)

    def test_two_different_backbones_with_resize(self):
        model = BCNN(tiny(8, stride=2), tiny(4, stride=4), num_classes=2)
        assert model.embedding_dim == 32 and model(X).shape == (2, 2)
        fa, fb = model.forward_features(X)
        assert fa.shape[-1] == 16 and fb.shape[-1] == 8

    def test_gradients_reach_both_streams(self):
        model = BCNN(tiny(8), num_classes=2)
        model(X).sum().backward()
        for stream in (model.backbone, model.backbone_b):
            assert stream.body[0].weight.grad.abs().sum() > 0

    def test_custom_pool(self):
        model = BCNN(tiny(4), tiny(3), num_classes=2, pool=BilinearPool(normalize=True, resize="area"))
        assert model.embedding_dim == 12

    def test_raw_bilinear_pool_is_flattened(self):
        from bilinearpool.functional import bilinear_pool

        model = BCNN(tiny(8), tiny(4), num_classes=3, pool=BilinearPool()).eval()
        fa, fb = model.forward_features(X)
        emb = model.forward_embedding(X)
        assert model.embedding_dim == 32 and emb.shape == (2, 32)
        torch.testing.assert_close(emb, bilinear_pool(fa, fb).flatten(1))
        torch.testing.assert_close(model(X), model.classifier(emb))
        one = BilinearClassifier(tiny(8), pool=BilinearPool(), num_classes=3)
        assert one.embedding_dim == 64 and one(X).shape == (2, 3)

    def test_errors(self):
        with pytest.raises(ValueError, match="shared=True shares backbone_a"):
            BCNN(tiny(), tiny(), num_classes=2, shared=True)


class TestBackboneOptions:
    @pytest.mark.parametrize("cls", [FastBCNN, BCNN, GAPClassifier])
    def test_feature_extractor_refuses_options(self, cls):
        fx = build_backbone(tiny(8))
        for option in ({"se_reduction": 8}, {"node": "0"}, {"sample_shape": (3, 32, 32)}, {"weights": "imagenet"}):
            name = next(iter(option))
            with pytest.raises(ValueError, match=f"already a FeatureExtractor, so {name} cannot apply"):
                cls(fx, num_classes=2, **option)
        assert cls(fx, num_classes=2)(X).shape == (2, 2)

    @pytest.mark.parametrize("cls", [FastBCNN, BCNN, GAPClassifier])
    def test_sample_shape_for_one_channel_backbone(self, cls):
        gray = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU())
        with pytest.raises(ValueError, match=r"zero image of shape \(1, 3, 128, 128\).*pass sample_shape"):
            cls(gray, num_classes=2)
        model = cls(gray, num_classes=2, sample_shape=(1, 16, 16))
        assert model.backbone.out_channels == 4 and model(torch.randn(2, 1, 16, 16)).shape == (2, 2)

    @pytest.mark.parametrize("cls", [BCNN, BilinearClassifier])
    def test_sample_shape_beside_a_timm_name_is_the_other_streams(self, cls):
        """A timm name refuses sample_shape alone (timm knows its input); in a two-stream
        model whose other stream takes it, that stream uses it and the timm stream is built
        without it. With no stream to take it, it is refused."""
        gray = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU())
        timm_rgb = "timm:resnet18"
        kw = {} if cls is BCNN else {"pool": BilinearPool(resize="bilinear")}
        with pytest.raises(ValueError, match="sample_shape= applies to torchvision models and your own modules"):
            cls(timm_rgb, timm_rgb, num_classes=2, sample_shape=(3, 64, 64), **kw)
        for a, b in ((gray, timm_rgb), (timm_rgb, gray)):
            model = cls(a, b, num_classes=2, sample_shape=(1, 64, 64), **kw)
            streams = {"gray": model.backbone if a is gray else model.backbone_b,
                       "timm": model.backbone_b if a is gray else model.backbone}
            assert streams["gray"].in_channels == 1 and streams["timm"].in_channels == 3

    def test_sample_shape_through_build_model(self):
        gray = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        assert build_model("fast-bcnn", gray, num_classes=2, sample_shape=(1, 8, 8)).embedding_dim == 16


class TestGAPClassifier:
    def test_plain(self):
        body = tiny(8)
        model = GAPClassifier(body, num_classes=4)
        assert model.embedding_dim == 8 and n_params(model) == n_params(body) + 8 * 4 + 4
        torch.testing.assert_close(model.forward_embedding(X), body(X).mean(dim=(2, 3)))

    def test_se_variant(self):
        import torchvision

        model = GAPClassifier(torchvision.models.resnet18(), node="layer4", num_classes=8, se_reduction=8)
        assert n_params(model) > n_params(GAPClassifier(torchvision.models.resnet18(), node="layer4", num_classes=8))


@pytest.mark.parametrize("head", ["plain", "bcnn", "fast-bcnn", "fast_bcnn"])
def test_build_model(head):
    model = build_model(head, tiny(4), num_classes=3)
    assert model(X).shape == (2, 3)


def test_build_model_unknown():
    with pytest.raises(ValueError, match="head must be one of .* 'gap'"):
        build_model("gap", tiny(), num_classes=2)


@pytest.mark.parametrize("cls", [FastBCNN, BCNN, GAPClassifier])
def test_state_dict_and_pickle_roundtrip(cls):
    model = cls(tiny(6), num_classes=3).eval()
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(clone(X), model(X))
    fresh = cls(tiny(6), num_classes=3).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(X), model(X))


def test_compile_model():
    model = FastBCNN(tiny(6), num_classes=3).eval()
    torch.testing.assert_close(torch.compile(model, backend="eager")(X), model(X))


@pytest.mark.parametrize("cls", [FastBCNN, BCNN])
def test_compile_model_dynamic_fullgraph_training(cls):
    """A whole training step compiles as one graph with dynamic shapes."""
    model = cls(tiny(6), num_classes=3).train()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)
    torch.manual_seed(0)
    out = compiled(X)
    torch.manual_seed(0)
    torch.testing.assert_close(out, model(X))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


class TestCopiesKeepModes:
    """Copies of a classifier (to_triu, BCNN's second stream, deepcopy for EMA) keep every
    submodule's training mode; torchvision's feature extractors rebuild themselves in
    training mode on deepcopy."""

    def test_to_triu_of_eval_model(self):
        fast = FastBCNN("resnet18", num_classes=4)
        deployed = fast.eval().to_triu()
        assert not any(m.training for m in deployed.modules())
        stats = {k: v.clone() for k, v in deployed.state_dict().items() if "running" in k}
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(deployed(x), fast(x), atol=1e-5, rtol=1e-4)
        after = deployed.state_dict()
        assert stats and all(torch.equal(after[k], v) for k, v in stats.items())

    def test_deepcopy_keeps_each_mode_and_graph(self):
        model = FastBCNN("resnet18", num_classes=4).train()
        model.backbone.body.get_submodule("layer1.0.bn1").eval()  # e.g. a frozen batch norm
        modes = {name: m.training for name, m in model.named_modules()}
        assert {name: m.training for name, m in copy.deepcopy(model).named_modules()} == modes
        model.eval()
        clone = copy.deepcopy(model)
        assert not any(m.training for m in clone.modules())
        assert clone.backbone.body.graph is clone.backbone.body.eval_graph
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(clone(x), model(x))

    def test_bcnn_second_stream_copies_modes(self):
        stream = build_backbone("resnet18").eval()
        model = BCNN(stream, num_classes=3)
        assert not any(m.training for m in model.backbone_b.modules())
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(model.backbone_b(x), model.backbone(x))


@pytest.mark.parametrize("cls", [FastBCNN, BCNN])
def test_building_on_a_torchvision_model_keeps_its_frozen_layers(cls):
    """Cutting the user's model at its node changed no submodule's mode, in the user's
    model nor in the classifier: a batch norm frozen with eval() is not updated in
    training. model.train() afterwards trains everything, as in torch."""
    import torchvision

    user = torchvision.models.resnet18().train()
    user.bn1.eval()
    model = cls(user, num_classes=3)
    streams = [model.backbone] + ([model.backbone_b] if cls is BCNN else [])
    assert model.training and not user.bn1.training and user.layer1[0].bn1.training
    assert all(not s.body.bn1.training and s.body.get_submodule("layer1.0.bn1").training for s in streams)
    stats = [s.body.bn1.running_mean.clone() for s in streams]
    model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(s.body.bn1.running_mean, old) for s, old in zip(streams, stats))
    model.train()
    assert all(m.training for m in model.modules())


class TestHooks:
    """Hooks on the pooling or the classifier make forward run them as modules, not fused."""

    @pytest.mark.parametrize("register", ["register_full_backward_hook", "register_full_backward_pre_hook"])
    @pytest.mark.parametrize("training", [True, False])
    def test_backward_hooks_on_classifier(self, register, training):
        model = FastBCNN(tiny(8), num_classes=3).train(training)
        assert model._fused_head()
        fired = []
        getattr(model.classifier, register)(lambda module, *grads: fired.append(type(module).__name__))
        assert not model._fused_head()
        model(X).sum().backward()
        assert fired == ["WideLinear"]

    def test_global_backward_hook(self):
        model = FastBCNN(tiny(8), num_classes=3).eval()
        fired = []
        module_hooks = torch.nn.modules.module
        handle = module_hooks.register_module_full_backward_hook(lambda m, gi, go: fired.append(type(m).__name__))
        try:
            model(X.clone().requires_grad_()).sum().backward()
        finally:
            handle.remove()
        assert {"WideLinear", "FastBilinearPool"} <= set(fired)
        assert model._fused_head()

    def test_global_forward_hook(self):
        model = FastBCNN(tiny(8), num_classes=3).eval()
        seen = []
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
        try:
            model(X)
        finally:
            handle.remove()
        assert {"WideLinear", "FastBilinearPool"} <= set(seen)


class TestOtherPoolsAsHeads:
    """Every pooling of the library plugs into the classifiers as ``pool=``."""

    def test_one_stream_pools(self):
        from bilinearpool import CompactBilinearPool, CovariancePool, LowRankBilinearPool, MatrixSqrt

        pools = {
            "tensor_sketch": (CompactBilinearPool(in_channels=8, out_features=128), 128),
            "maclaurin": (CompactBilinearPool(in_channels=8, out_features=64, method="random_maclaurin"), 64),
            "isqrt_cov": (CovariancePool(norm=MatrixSqrt(triu=False)), 36),
            "low_rank": (LowRankBilinearPool(in_channels=8, rank=16, out_features=10), 10),
        }
        for name, (pool, dim) in pools.items():
            model = FastBCNN(tiny(8), num_classes=3, pool=pool)
            assert model.embedding_dim == dim, name
            out = model(X)
            out.sum().backward()
            assert out.shape == (2, 3) and torch.isfinite(model.backbone.body[0].weight.grad).all(), name

    def test_two_stream_compact(self):
        from bilinearpool import CompactBilinearPool

        model = BCNN(tiny(8), tiny(4), num_classes=2, pool=CompactBilinearPool(in_channels=8, in_channels_b=4, out_features=32))
        assert model.embedding_dim == 32 and model(X).shape == (2, 2)

    @pytest.mark.parametrize("pool", ["raw", "compact", "low_rank"])
    def test_streams_of_two_map_sizes_need_a_pool_that_resizes(self, pool):
        # strides 2 and 4: maps of one size at no image size but tiny ones. Before, such a
        # model built and failed at every forward, advising a resize the classifier gives
        # no place for.
        from bilinearpool import CompactBilinearPool, LowRankBilinearPool

        make = {"raw": lambda: BilinearPool(),
                "compact": lambda: CompactBilinearPool(in_channels=8, in_channels_b=4, out_features=32),
                "low_rank": lambda: LowRankBilinearPool(in_channels=8, in_channels_b=4, rank=4)}[pool]
        what = {"raw": "BilinearPool without resize",
                "compact": r"CompactBilinearPool \(which does not resize its inputs\)",
                "low_rank": r"LowRankBilinearPool \(which does not resize its inputs\)"}[pool]
        with pytest.raises(ValueError, match=(
                rf"must have one size for {what}, but backbone_a \('Sequential'\) and backbone_b "
                r"\('Sequential'\) give maps of different sizes at every image size tried \(224 x 224 "
                r"images: 112 x 112 and 56 x 56; 299 x 299 images: 150 x 150 and 75 x 75; .*448 x 448 "
                r"images: 224 x 224 and 112 x 112\); use pool=BilinearPool\(resize='bilinear', normalize=True\)")):
            BCNN(tiny(8, stride=2), tiny(4, stride=4), num_classes=2, pool=make())
        # one stride: built and run as before
        assert BCNN(tiny(8, stride=2), tiny(4, stride=2), num_classes=2, pool=make())(X).shape == (2, 2)

    def test_maps_of_one_size_at_some_image_size_are_not_refused(self):
        # one stride, other rounding: 111 and 112 at 224 px, one size at odd sides (299)
        a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2, ceil_mode=True))
        b = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2))
        model = BilinearClassifier(a, b, pool=BilinearPool(), num_classes=2)
        assert model(torch.randn(1, 3, 33, 33)).shape == (1, 2)

    def test_pools_and_classifiers_that_pair_the_maps_themselves(self):
        # a subclass of a library pool, or of the classifier, may bring the maps to one size
        class AligningPool(BilinearPool):
            def forward(self, a, b=None):
                return super().forward(a, nn.functional.adaptive_avg_pool2d(b, a.shape[-2:]))

        class AligningBCNN(BCNN):
            def forward_features(self, x):
                a, b = super().forward_features(x)
                return a, nn.functional.adaptive_avg_pool2d(b, a.shape[-2:])

        for model in (BCNN(tiny(8, stride=2), tiny(4, stride=4), num_classes=2, pool=AligningPool()),
                      AligningBCNN(tiny(8, stride=2), tiny(4, stride=4), num_classes=2, pool=BilinearPool())):
            assert model(X).shape == (2, 2)

    def test_a_pool_of_ones_own_gets_maps_of_two_sizes(self):
        # a pool the library does not know may bring the maps to one size itself
        class MeanOuter(nn.Module):
            def forward(self, a, b):
                return torch.einsum("bc,bd->bcd", a.mean((2, 3)), b.mean((2, 3))).flatten(1)

        model = BCNN(tiny(8, stride=2), tiny(4, stride=4), num_classes=2, pool=MeanOuter())
        assert model.embedding_dim == 32 and model(X).shape == (2, 2)


@pytest.mark.parametrize("make", [
    lambda: FastBCNN(tiny(6), num_classes=3),
    lambda: FastBCNN(tiny(6), num_classes=3, triu=True),
    lambda: BCNN(tiny(6), tiny(4), num_classes=3),
], ids=["fast", "fast-triu", "bcnn"])
def test_per_sample_gradients_with_torch_func(make):
    # torch.func.vmap(grad(...)) over samples (e.g. for DP-SGD): the same gradients as
    # one backward per sample.
    torch.manual_seed(0)
    model = make().double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, target = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 2, 1])

    def loss(p, xi, ti):
        logits = torch.func.functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(logits, ti[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), target[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, msg=name)


def test_dry_runs_use_square_maps():
    # A pool that only works on square maps (it adds the transposed map) still builds.
    class Symmetric(nn.Module):
        def forward(self, x):
            return (x + x.transpose(2, 3)).mean((2, 3))

    model = BilinearClassifier(tiny(8), pool=Symmetric(), num_classes=2)
    assert model.embedding_dim == 8 and model(X).shape == (2, 2)


class Conv7Pool(nn.Module):
    """A learned pool that needs maps of at least 7 x 7 (no output_dim)."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 7)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


class TestFailingDryRun:
    """A pool without output_dim that fails on the dry runs' small maps says which dry run
    failed, why (the original error, chained), and that output_dim avoids it."""

    def test_error_names_the_maps_the_cause_and_output_dim(self):
        with pytest.raises(ValueError) as info:
            BilinearClassifier(tiny(8), pool=Conv7Pool(), num_classes=3)
        message = str(info.value)
        assert message.startswith("the dry run of pool Conv7Pool on maps (2, 8, 3, 3) failed (RuntimeError: ")
        assert "Kernel size can't be greater than actual input size" in message
        assert "output_dim(in_channels, in_channels_b=None)" in message
        assert isinstance(info.value.__cause__, RuntimeError)

    def test_two_streams_and_tokens(self):
        class Pair(Conv7Pool):
            def forward(self, x, y):
                return super().forward(x) * y.mean()

        with pytest.raises(ValueError, match=r"pool Pair on maps \(2, 8, 3, 3\) and \(2, 4, 3, 3\) failed"):
            BilinearClassifier(tiny(8), tiny(4), pool=Pair(), num_classes=3)

        class NeedsMaps(nn.Module):
            def forward(self, x):
                return x.mean((2, 3))

        with pytest.raises(ValueError, match=r"pool NeedsMaps on tokens \(2, 9, 8\) failed \(IndexError: "):
            BilinearClassifier(Patches(4), pool=NeedsMaps(), num_classes=3)

    def test_pool_with_output_dim_builds(self):
        class Sized(Conv7Pool):
            def output_dim(self, in_channels, in_channels_b=None):
                return 4

        model = BilinearClassifier(tiny(8, stride=1), pool=Sized(), num_classes=3)
        assert model(X).shape == (2, 3)


class TestSameModuleForBothStreams:
    """BCNN(m, m): one extractor, run once per forward, as BilinearClassifier(m, m) and
    BCNN(m, shared=True) (was: resolved twice, run twice, SE inserted twice)."""

    def test_one_extractor_run_once(self):
        body = tiny(8)
        calls = []
        body.register_forward_hook(lambda m, i, o: calls.append(1))
        model = BCNN(body, body, num_classes=3)
        assert model.backbone_b is model.backbone and model.shared
        assert len(model.gradcam_layers) == 1
        calls.clear()
        assert model(X).shape == (2, 3) and len(calls) == 1
        shared = BCNN(body, num_classes=3, shared=True)
        assert n_params(model) == n_params(shared)

    def test_with_node_and_se(self):
        import torchvision

        from bilinearpool import SEBlock

        net = torchvision.models.resnet18()
        model = BCNN(net, net, num_classes=3, node="layer4", se_reduction=8)
        assert model.backbone_b is model.backbone
        assert sum(isinstance(m, SEBlock) for m in model.modules()) == 8


def tiny_vit(patch_size: int = 8, image_size: int = 32) -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=patch_size, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8
    )


class Patches(nn.Module):
    """Tokens (B, N, C) of non-overlapping patches: N depends on the image size."""

    def __init__(self, patch_size: int, channels: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, channels, patch_size, stride=patch_size)

    def forward(self, x):
        return self.embed(x).flatten(2).transpose(1, 2)


class GridTokens(Patches):
    """Tokens of a fixed grid, side x side of them at any image size."""

    def __init__(self, side: int, channels: int = 8):
        super().__init__(2, channels)
        self.grid = nn.AdaptiveAvgPool2d(side)

    def forward(self, x):
        return self.grid(self.embed(x)).flatten(2).transpose(1, 2)


class OuterProduct(nn.Module):
    """A user's two-stream pool, without checks of its own."""

    def forward(self, a, b):
        return torch.einsum("bnc,bnd->bcd", a, b).flatten(1)


class TestTokenBackbones:
    def test_reduce_dim_is_refused_at_construction(self):
        for cls in (FastBCNN, GAPClassifier, BCNN):
            with pytest.raises(ValueError, match=r"reduce_dim=4 adds a ChannelReduction .* tokens \(B, N, 8\)"):
                cls(tiny_vit(), node="encoder", sample_shape=(3, 32, 32), num_classes=3, reduce_dim=4)
        with pytest.raises(ValueError, match="gives tokens"):  # the second stream
            BCNN(tiny(8), build_backbone(tiny_vit(), node="encoder", sample_shape=(3, 32, 32)),
                 num_classes=3, reduce_dim=4)

    def test_streams_of_two_kinds_are_refused(self):
        """A map stream and a token stream: refused when built (the pooling would pair
        locations with tokens, or fail at the first forward)."""
        vit = build_backbone(tiny_vit(), node="encoder", sample_shape=(3, 32, 32))
        with pytest.raises(ValueError, match=r"same kind of features.*feature maps \(B, C, H, W\).*tokens"):
            BCNN(tiny(8), vit, num_classes=3)
        with pytest.raises(ValueError, match="same kind of features"):
            BilinearClassifier(vit, tiny(8), pool=BilinearPool(), num_classes=3)

    def test_streams_of_different_token_counts_are_refused_when_built(self):
        """Token streams of different lengths N cannot be paired (tokens cannot be resized
        as maps are): built fine and failed at the first forward, with torch's message for
        a pool of the user's. Refused when built where the counts are known: a model that
        takes one image size (ViTs), or counts that do not depend on the image size."""
        vit16, vit8 = (build_backbone(tiny_vit(p), node="encoder", sample_shape=(3, 32, 32)) for p in (16, 8))
        message = (r"same number of tokens N.*backbone_a \('VisionTransformer'\) gives 5 and backbone_b "
                   r"\('VisionTransformer'\) 17 at 32 x 32 images, the one size .* takes.*cannot be resized")
        with pytest.raises(ValueError, match=message):
            BCNN(vit16, vit8, num_classes=3)
        with pytest.raises(ValueError, match=message):
            BilinearClassifier(vit16, vit8, pool=OuterProduct(), num_classes=3)
        with pytest.raises(ValueError, match=r"gives 16 and backbone_b \('GridTokens'\) 9 at any image size"):
            BCNN(GridTokens(4), GridTokens(3), num_classes=3)
        with pytest.raises(ValueError, match=r"one image feeds both streams, but backbone_a .* takes 32 x 32 images "
                           r"only and backbone_b .* 64 x 64"):
            BCNN(vit8, build_backbone(tiny_vit(16, 64), node="encoder", sample_shape=(3, 64, 64)), num_classes=3)
        # the same counts: built, and run
        other = build_backbone(tiny_vit(8), node="encoder", sample_shape=(3, 32, 32))
        assert BCNN(vit8, other, num_classes=3)(X).shape == (2, 3)
        assert BCNN(GridTokens(4), GridTokens(4, channels=6), num_classes=3)(X).shape == (2, 3)

    def test_token_counts_that_depend_on_the_image_size_are_checked_in_forward(self):
        # Patches of 4 and 8 give 64 and 16 tokens at 32 x 32, but the build cannot know
        # the image size: the first forward says what is wrong, whatever the pool.
        for pool in (None, OuterProduct()):
            options = {} if pool is None else {"pool": pool}
            model = BCNN(Patches(4), Patches(8), num_classes=3, **options)
            with pytest.raises(ValueError, match=r"same number of tokens N, but backbone_a \('Patches'\) gives 64 and "
                               r"backbone_b \('Patches'\) 16 at 32 x 32 images; .*cannot be resized"):
                model(X)
        # counts that agree at the size used (8 x 8 patches of 4 at 32 x 32): built, and run
        model = BCNN(Patches(4), GridTokens(8), num_classes=3)
        assert model(X).shape == (2, 3)
        with pytest.raises(ValueError, match=r"gives 256 and backbone_b \('GridTokens'\) 64 at 64 x 64 images"):
            model(torch.randn(2, 3, 64, 64))

    def test_dry_run_uses_tokens(self):
        class ClassToken(nn.Module):  # takes tokens only: (B, N, C) -> (B, C)
            def forward(self, x):
                return x[:, 0]

        vit = build_backbone(tiny_vit(), node="encoder", sample_shape=(3, 32, 32))
        model = BilinearClassifier(vit, pool=ClassToken(), num_classes=3).eval()
        x = torch.randn(2, 3, 32, 32)
        assert model.embedding_dim == 8 and model(x).shape == (2, 3)
        torch.testing.assert_close(model.forward_embedding(x), vit(x)[:, 0])

        class Flatten(nn.Module):
            def forward(self, x):
                return x.flatten(1)

        with pytest.raises(ValueError, match=r"depends on the feature map's size \(72 .* 9 tokens, 200 on 25\)"):
            BilinearClassifier(vit, pool=Flatten(), num_classes=3)


class TestPoolChannelsMustFit:
    """Pools built for other channels are refused when the classifier is built (were
    accepted, and failed at the first forward)."""

    def test_compact(self):
        from bilinearpool import CompactBilinearPool

        message = r"pool CompactBilinearPool does not fit the feature maps it gets: 8 channels from the backbone; "
        with pytest.raises(ValueError, match=message + r"this .* built for in_channels=16, but got streams of 8"):
            FastBCNN(tiny(8), num_classes=3, pool=CompactBilinearPool(in_channels=16, out_features=32))
        pool = CompactBilinearPool(in_channels=8, in_channels_b=6, out_features=32)
        with pytest.raises(ValueError, match=r"8 and 4 channels from the backbones; .*in_channels_b=6.*8 and 4"):
            BCNN(tiny(8), tiny(4), num_classes=3, pool=pool)
        with pytest.raises(ValueError, match=r"4 channels from reduce_dim=4; .*in_channels=8"):
            FastBCNN(tiny(16), num_classes=3, reduce_dim=4, pool=CompactBilinearPool(in_channels=8))
        pool = CompactBilinearPool(in_channels=8, out_features=32)
        assert FastBCNN(tiny(16), num_classes=3, reduce_dim=8, pool=pool)(X).shape == (2, 3)

    def test_a_normalisation_is_not_a_pool(self):
        # MatrixSqrt has an output_dim, so the classifier was built with a C*C-input
        # linear layer and failed at the first forward ("square matrices (B, C, C)").
        from bilinearpool import L2Normalize, MatrixSqrt, SignedSqrt

        with pytest.raises(ValueError, match=r"pool must take feature maps \(B, C, H, W\) and pool them, "
                           r"but got MatrixSqrt, a normalisation: .*CovariancePool\(norm=MatrixSqrt\(\)\)"):
            FastBCNN(tiny(8), num_classes=3, pool=MatrixSqrt())
        for norm in (SignedSqrt(), L2Normalize()):
            with pytest.raises(ValueError, match=rf"but got {type(norm).__name__}, a normalisation: "
                               r"it takes pooled features"):
                BilinearClassifier(tiny(8), pool=norm, num_classes=3)

    def test_global_average_pool_takes_one_stream(self):
        # It was accepted for two backbones and failed at the first forward (TypeError).
        from bilinearpool import BilinearClassifier, GlobalAvgPool

        with pytest.raises(ValueError, match=r"GlobalAvgPool does not fit .*8 and 4 channels from the "
                           r"backbones; GlobalAvgPool pools one stream, but got two"):
            BilinearClassifier(tiny(8), tiny(4), pool=GlobalAvgPool(), num_classes=3)
        assert BilinearClassifier(tiny(8), pool=GlobalAvgPool(), num_classes=3)(X).shape == (2, 3)

    def test_low_rank(self):
        from bilinearpool import LowRankBilinearPool

        with pytest.raises(ValueError, match=r"LowRankBilinearPool does not fit .*: 8 channels from the backbone"):
            FastBCNN(tiny(8), num_classes=3, pool=LowRankBilinearPool(in_channels=16, rank=4))
        with pytest.raises(ValueError, match=r"built for two streams \(in_channels=8, in_channels_b=4\)"):
            FastBCNN(tiny(8), num_classes=3, pool=LowRankBilinearPool(in_channels=8, in_channels_b=4, rank=4))


class TestOutputFmt:
    """The classifiers pass output_fmt= to build_backbone (channels-last modules)."""

    class NHWC(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, stride=4, padding=1)

        def forward(self, x):
            return self.conv(x).permute(0, 2, 3, 1)

    @pytest.mark.parametrize("cls", [FastBCNN, BCNN, GAPClassifier])
    def test_passed_through(self, cls):
        model = cls(self.NHWC(), num_classes=3, output_fmt="NHWC")
        assert model.backbone.out_channels == 6 and model.backbone.output_fmt == "NHWC"
        assert model(X).shape == (2, 3)
        with pytest.raises(ValueError, match="pass output_fmt='NHWC'"):
            cls(self.NHWC(), num_classes=3)

    def test_bilinear_classifier(self):
        model = BilinearClassifier(self.NHWC(), pool=BilinearPool(), num_classes=3, output_fmt="NHWC")
        assert model.embedding_dim == 36

    def test_torchvision_swin_features(self):
        import torchvision

        net = torchvision.models.SwinTransformer(
            patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2]
        )
        model = FastBCNN(net.features, num_classes=3, sample_shape=(3, 32, 32))
        assert model.backbone.out_channels == 16 and model.embedding_dim == 256
        assert model(X).shape == (2, 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FastBCNN(tiny(6), num_classes=3, reduce_dim=4),
        lambda: BCNN(tiny(6), tiny(4), num_classes=3, reduce_dim=2),
        lambda: BCNN(tiny(6), num_classes=3, shared=True),
        lambda: GAPClassifier(tiny(6), num_classes=2),
    ],
)
def test_parameter_groups_split_backbone_and_head(make):
    model = make()
    backbone, head = model.backbone_parameters(), model.head_parameters()
    ids = [id(p) for p in backbone + head]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    streams = [model.backbone] + [m for m in (getattr(model, "backbone_b", None),) if m is not None]
    for stream in streams:  # a second stream's parameters are the backbone's too (its learning rate)
        assert {id(p) for p in stream.parameters()} <= set(ids[: len(backbone)])
    assert {id(p) for p in model.classifier.parameters()} <= {id(p) for p in head}
    opt = torch.optim.SGD([{"params": backbone, "lr": 0.0}, {"params": head, "lr": 0.1}])
    before = [p.detach().clone() for p in backbone]
    model(X).sum().backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, backbone))


class TestHeadFollowsTheBackbonesDtype:
    """A classifier on a bfloat16 backbone was float32 and failed at the first forward
    ("mat1 and mat2 must have the same dtype"); the documented route was .to() after."""

    def test_bfloat16_and_float64(self):
        model = GAPClassifier(tiny(6).bfloat16(), num_classes=3)
        assert model.classifier.weight.dtype == torch.bfloat16
        assert model(X.bfloat16()).dtype == torch.bfloat16
        model = FastBCNN(tiny(6).double(), num_classes=3, reduce_dim=4)
        assert {p.dtype for p in model.head_parameters()} == {torch.float64}
        torch.testing.assert_close(model.double()(X.double()), model(X.double()))
        two = BCNN(tiny(6).double(), tiny(4).double(), num_classes=3, reduce_dim=4)
        assert {p.dtype for p in two.head_parameters()} == {torch.float64}
        assert two(X.double()).dtype == torch.float64

    def test_backbone_without_parameters_gives_the_default(self):
        model = FastBCNN(nn.Sequential(nn.MaxPool2d(4)), num_classes=3)
        assert model.classifier.weight.dtype == torch.get_default_dtype()


class TestResetClassifier:
    """reset_classifier: a fresh linear classifier for another number of classes, the rest kept."""

    @pytest.mark.parametrize(
        "make",
        [
            lambda: FastBCNN(tiny(6), num_classes=8),
            lambda: FastBCNN(tiny(6), num_classes=8, triu=True, reduce_dim=4),
            lambda: BCNN(tiny(6), tiny(4), num_classes=8),
            lambda: GAPClassifier(tiny(6), num_classes=8),
        ],
        ids=["fast-bcnn", "fast-bcnn-triu-reduced", "bcnn", "plain"],
    )
    def test_new_classes_rest_kept(self, make):
        model = make().eval()
        before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}
        embedding = model.forward_embedding(X)
        model.reset_classifier(2)
        assert model.num_classes == 2 and isinstance(model.classifier, WideLinear)
        assert (model.classifier.in_features, model.classifier.out_features) == (model.embedding_dim, 2)
        after = model.state_dict()
        assert set(after) - set(before) == {"classifier.weight", "classifier.bias"}
        assert all(torch.equal(after[k], v) for k, v in before.items())
        torch.testing.assert_close(model.forward_embedding(X), embedding)
        expected = embedding @ model.classifier.weight.T + model.classifier.bias
        torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-6)

    def test_drawn_afresh_like_nn_linear(self):
        model = FastBCNN(tiny(4), num_classes=3)
        old = model.classifier.weight.detach().clone()
        torch.manual_seed(7)
        model.reset_classifier()
        assert model.num_classes == 3 and model.classifier.weight.shape == old.shape
        assert not torch.equal(model.classifier.weight, old)
        torch.manual_seed(7)
        reference = nn.Linear(16, 3)
        torch.testing.assert_close(model.classifier.weight, reference.weight, rtol=0, atol=0)
        torch.testing.assert_close(model.classifier.bias, reference.bias, rtol=0, atol=0)

    def test_follows_dtype_mode_and_bias_and_is_trainable(self):
        model = FastBCNN(tiny(4), num_classes=3).double().eval()
        model.classifier = nn.Linear(model.embedding_dim, 3, bias=False, dtype=torch.float64)
        model.classifier.requires_grad_(False).eval()
        model.reset_classifier(5)
        c = model.classifier
        assert c.weight.dtype == torch.float64 and c.bias is None and not c.training
        assert c.weight.requires_grad
        model(X.double()).sum().backward()
        assert c.weight.grad is not None
        assert model._fused_head()  # the fused pooling + classifier call still serves it

    def test_after_to_triu(self):
        model = FastBCNN(tiny(4), num_classes=3).to_triu()
        model.reset_classifier(4)
        assert model.classifier.in_features == 10 and model(X).shape == (2, 4)

    def test_bad_input(self):
        model = FastBCNN(tiny(4), num_classes=3)
        for bad, error in [(0, ValueError), (2.0, TypeError), (True, TypeError), ("2", TypeError)]:
            with pytest.raises(error, match="num_classes"):
                model.reset_classifier(bad)
        assert model.num_classes == 3 and model.classifier.out_features == 3
        model.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        with pytest.raises(TypeError, match="nn.Linear.*Sequential.*model.classifier"):
            model.reset_classifier(2)


def test_loading_checkpoint_of_other_triu_layout_says_so():
    packed = FastBCNN(tiny(6), num_classes=3, triu=True)
    full = FastBCNN(tiny(6), num_classes=3)
    with pytest.raises(RuntimeError, match="built with triu=True"):
        full.load_state_dict(packed.state_dict())
    with pytest.raises(RuntimeError, match="built with triu=False"):
        packed.load_state_dict(full.state_dict())
    FastBCNN(tiny(6), num_classes=3, triu=True).load_state_dict(full.eval().to_triu().state_dict())


def test_two_stream_checkpoint_into_a_shared_backbone_is_refused():
    """A shared backbone is in the state_dict twice and both entries load into one module:
    a two-stream checkpoint's first stream was dropped without a word."""
    two = BCNN(tiny(6), num_classes=3)
    with torch.no_grad():
        two.backbone_b.body[0].weight.add_(1.0)  # the streams trained apart
    shared = BCNN(tiny(6), num_classes=3, shared=True)
    before = copy.deepcopy(shared.state_dict())
    with pytest.raises(RuntimeError, match=r"two backbones differ \(1 entry, e.g. backbone\.body\.0\.weight.*shared=False"):
        shared.load_state_dict(two.state_dict())
    same = BCNN(tiny(6), num_classes=3, shared=True)
    same.load_state_dict(before)  # a shared model's own checkpoint: both entries equal
    for key, value in before.items():
        torch.testing.assert_close(same.state_dict()[key], value)
    BCNN(tiny(6), num_classes=3).load_state_dict(before)  # into two streams: both start from it
    with torch.no_grad():  # a diverged weight: NaN is not == NaN, but the entries are one
        shared.backbone.body[0].weight[0, 0, 0, 0] = float("nan")
    BCNN(tiny(6), num_classes=3, shared=True).load_state_dict(shared.state_dict())
    apart = {k: v.clone() for k, v in shared.state_dict().items()}  # no longer one tensor
    BCNN(tiny(6), num_classes=3, shared=True).load_state_dict(apart)
    module = tiny(6)
    BCNN(module, module, num_classes=3).load_state_dict(before)  # the same module twice is shared too
    with pytest.raises(RuntimeError, match="two backbones differ"):
        BCNN(module, module, num_classes=3).load_state_dict(two.state_dict())

@pytest.mark.parametrize(
    "build",
    [
        lambda: FastBCNN(tiny(6), num_classes=3),
        lambda: FastBCNN(tiny(6), num_classes=3, triu=True),
        lambda: FastBCNN(nn.Sequential(tiny(6), SEBlock(6, reduction=2)), num_classes=3),
        lambda: GAPClassifier(tiny(6), num_classes=3),
    ],
    ids=["fast-bcnn", "fast-bcnn-triu", "fast-bcnn-se", "gap"],
)
def test_jit_trace_without_tracer_warnings_and_general(build):
    """The library's size checks compared traced sizes, so that torch.jit.trace (and the
    TorchScript ONNX exporter) printed up to 11 TracerWarnings per model that the trace
    might be wrong; they are skipped while traced, and the trace still takes other
    batch sizes and image sizes."""
    import warnings

    model = build().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, X)
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and "bilinearpool" in w.filename]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    other = torch.randn(3, 3, 48, 48)
    torch.testing.assert_close(traced(other), model(other))
