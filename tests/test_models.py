"""Classifiers on arbitrary backbones: shapes, parameter counts, embeddings, round-trips."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

from bilinearpool import (
    BCNN,
    BilinearPool,
    ChannelReduction,
    FastBCNN,
    GAPClassifier,
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

    def test_gradcam_layer_gives_feature_map(self):
        model = FastBCNN(tiny(8), num_classes=2)
        seen = {}
        model.gradcam_layer.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
        model(X)
        assert seen["out"].shape == (2, 8, 8, 8)

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
        with pytest.raises(ValueError, match="dropout must be in"):
            FastBCNN(tiny(), num_classes=2, dropout=1.5)
        with pytest.raises(ValueError, match="triu=True configures the default pool"):
            FastBCNN(tiny(), num_classes=2, pool=nn.Identity(), triu=True)


class TestBCNN:
    def test_separate_weights_by_default(self):
        body = tiny(8)
        model = BCNN(body, num_classes=3)
        assert model.backbone is not model.backbone_b
        assert n_params(model) == 2 * n_params(body) + 64 * 3 + 3
        assert model(X).shape == (2, 3)

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

    def test_errors(self):
        with pytest.raises(ValueError, match="shared=True shares backbone_a"):
            BCNN(tiny(), tiny(), num_classes=2, shared=True)


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
