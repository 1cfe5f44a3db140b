"""build_backbone: names, models with nodes, plain modules, weights."""

from __future__ import annotations

import sys
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from bilinearpool import FeatureExtractor, build_backbone, list_backbones


@pytest.mark.parametrize(
    "name,channels",
    [
        ("resnet50", 2048),
        ("inception_v3", 2048),
        ("inception_resnet_v2", 1536),
        ("resnet18", 512),
        ("vgg11", 512),
        ("densenet121", 1024),
        ("mobilenet_v3_small", 576),
        ("timm:resnet18", 512),
    ],
)
def test_every_name_builds_and_runs(name, channels):
    fx = build_backbone(name)
    assert isinstance(fx, FeatureExtractor) and fx.out_channels == channels
    fx.eval()
    with torch.no_grad():
        out = fx(torch.randn(2, 3, 96, 96))
    assert out.dim() == 4 and out.shape[:2] == (2, channels)
    assert fx.feature_info["num_chs"] == channels
    assert isinstance(fx.last_conv, nn.Conv2d)


def test_reduction_is_measured():
    assert build_backbone("resnet18").reduction == 32


def test_torchvision_model_with_node():
    fx = build_backbone(torchvision.models.resnet18(), node="layer3")
    assert fx.out_channels == 256 and fx(torch.randn(1, 3, 64, 64)).shape == (1, 256, 4, 4)


def test_plain_module_and_list_output():
    class TwoStage(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=2)
            self.b = nn.Conv2d(4, 6, 3, stride=2)

        def forward(self, x):
            y = self.a(x)
            return [y, self.b(y)]

    fx = build_backbone(TwoStage())
    assert fx.out_channels == 6 and fx(torch.randn(1, 3, 33, 33)).shape == (1, 6, 7, 7)


def test_local_weights_file(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    fx = build_backbone("resnet18", weights=path)
    torch.testing.assert_close(fx.body.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(fx.body.get_submodule("layer4.1.bn2").running_var, reference.layer4[1].bn2.running_var)
    # the same file read as str, and a file that does not fit
    assert torch.equal(build_backbone("resnet18", weights=str(path)).body.conv1.weight, reference.conv1.weight)
    with pytest.raises(ValueError, match="does not fit torchvision 'resnet50'"):
        build_backbone("resnet50", weights=path)


def test_local_weights_file_timm(tmp_path):
    import timm

    reference = timm.create_model("resnet18")
    path = tmp_path / "timm_resnet18.pth"
    torch.save(reference.state_dict(), path)
    fx = build_backbone("timm:resnet18", weights=path)
    torch.testing.assert_close(fx.body.conv1.weight, reference.conv1.weight)


def test_local_weights_file_timm_must_fit(tmp_path):
    import timm

    junk = tmp_path / "junk.pth"
    torch.save({"foo.weight": torch.zeros(3)}, junk)
    with pytest.raises(ValueError, match=r"does not fit timm 'resnet18': missing \['conv1.weight'.*unexpected \['foo"):
        build_backbone("timm:resnet18", weights=junk)
    smaller = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), smaller)
    with pytest.raises(ValueError, match=r"does not fit timm 'resnet34': missing \['layer1.2"):
        build_backbone("timm:resnet34", weights=smaller)
    other = tmp_path / "resnet26.pth"
    torch.save(timm.create_model("resnet26").state_dict(), other)
    with pytest.raises(ValueError, match="does not fit timm 'resnet18': size mismatch"):
        build_backbone("timm:resnet18", weights=other)


def test_local_weights_file_timm_without_classifier(tmp_path):
    import timm

    reference = timm.create_model("resnet18")
    path = tmp_path / "headless.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}, path)
    fx = build_backbone("timm:resnet18", weights=path)
    torch.testing.assert_close(fx.body.get_submodule("layer4.1.bn2").running_var, reference.layer4[1].bn2.running_var)


def test_timm_name_with_pretrained_tag():
    fx = build_backbone("resnet18.a1_in1k")  # weights=None: the tag only names the configuration
    assert fx.out_channels == 512 and fx.name == "resnet18.a1_in1k"
    assert fx.body.pretrained_cfg["tag"] == "a1_in1k"
    assert build_backbone("timm:resnet18.a1_in1k").out_channels == 512


class NHWCNet(nn.Module):
    """A stand-in for a Swin stage: a feature map in (B, H, W, C)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=4, padding=1)

    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1)


class TestChannelsLastMaps:
    def test_explicit_output_fmt(self):
        net = NHWCNet()
        fx = build_backbone(net, output_fmt="NHWC")
        x = torch.randn(2, 3, 32, 32)
        assert fx.out_channels == 6 and fx.reduction == 4 and fx.output_fmt == "NHWC"
        torch.testing.assert_close(fx(x), net.conv(x))

    def test_torchvision_swin_detected(self):
        net = torchvision.models.SwinTransformer(
            patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2]
        ).eval()
        fx = build_backbone(net, node="features", sample_shape=(3, 32, 32)).eval()
        x = torch.randn(2, 3, 32, 32)
        assert fx.out_channels == 16 and fx.output_fmt == "NHWC" and fx.reduction == 8
        torch.testing.assert_close(fx(x), net.features(x).permute(0, 3, 1, 2))
        assert build_backbone(net, node="permute", sample_shape=(3, 32, 32)).output_fmt == "NCHW"

    def test_timm_output_fmt_detected(self):
        import timm

        if not timm.is_model("test_mambaout"):
            pytest.skip("this timm has no test_mambaout")
        fx = build_backbone("test_mambaout")
        assert fx.output_fmt == "NHWC" and fx(torch.randn(1, 3, 64, 64)).shape == (1, fx.out_channels, 2, 2)

    def test_classifier_on_nhwc(self):
        from bilinearpool import FastBCNN

        model = FastBCNN(build_backbone(NHWCNet(), output_fmt="NHWC"), num_classes=3)
        assert model.embedding_dim == 36 and model(torch.randn(2, 3, 32, 32)).shape == (2, 3)

    def test_errors(self):
        with pytest.raises(ValueError, match="output_fmt must be one of .*'NLC'"):
            build_backbone(NHWCNet(), output_fmt="NLC")

    @pytest.mark.parametrize("source", ["torchvision", "torchvision-name", "timm"])
    def test_swin_tiny(self, source):
        if source == "torchvision":
            fx, size = build_backbone(torchvision.models.swin_t(), node="features"), 64
        elif source == "torchvision-name":  # its default node: the final norm, NHWC
            fx, size = build_backbone("swin_t"), 64
            assert fx.output_fmt == "NHWC"
        else:
            fx, size = build_backbone("swin_tiny_patch4_window7_224"), 224
        out = fx.eval()(torch.randn(1, 3, size, size))
        assert fx.out_channels == 768 and out.shape == (1, 768, size // 32, size // 32)


def test_sample_shape_errors():
    with pytest.raises(ValueError, match=r"sample_shape must be \(C, H, W\) of positive ints, but got \(3, 32\)"):
        build_backbone(nn.Conv2d(3, 4, 3), sample_shape=(3, 32))
    with pytest.raises(ValueError, match=r"zero image of shape \(1, 3, 128, 128\).*pass sample_shape"):
        build_backbone(nn.Conv2d(1, 4, 3))
    assert build_backbone(nn.Conv2d(1, 4, 3), sample_shape=(1, 8, 8)).out_channels == 4


def test_probe_keeps_submodule_modes():
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    body[1].eval()  # a frozen batch norm stays frozen
    build_backbone(body)
    assert [m.training for m in body] == [True, False, True] and body.training


def test_weights_then_se(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    fx = build_backbone("resnet18", weights=path, se_reduction=8)
    torch.testing.assert_close(fx.body.get_submodule("layer1.0.bn2.0").weight, reference.layer1[0].bn2.weight)
    assert fx(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


def test_offline_imagenet_weights_name_the_alternatives(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"could not obtain pretrained ImageNet weights .*weights=None"):
        build_backbone("resnet18", weights="imagenet")


def test_unknown_name_says_which_package_is_missing(monkeypatch):
    """A torchvision name without torchvision installed: an ImportError naming the extra to
    install (an unknown name with every provider installed: a ValueError)."""
    message = r"unknown backbone 'resnet50'.*torchvision not installed: pip install 'bilinearpool\[vision\]'"
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails, find_spec says missing
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=message) as info:
        build_backbone("resnet50")
    assert "timm not installed: pip install 'bilinearpool[timm]'" in str(info.value)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown backbone 'resnet5000'") as info:
        build_backbone("resnet5000")
    assert "not installed" not in str(info.value)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'resnet5000'"):
        build_backbone("resnet5000")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone("resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET9K'"):
        build_backbone("resnet18", weights="IMAGENET9K")
    with pytest.raises(ValueError, match="node 'layer9' is not in ResNet"):
        build_backbone(torchvision.models.resnet18(), node="layer9")
    with pytest.raises(TypeError, match="name or an nn.Module, but got int"):
        build_backbone(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="returned \\(1, 1000\\)"):
        build_backbone(torchvision.models.resnet18())  # a classifier, not a feature map
    with pytest.raises(ValueError, match="weights= applies to named backbones"):
        build_backbone(nn.Conv2d(3, 4, 3), weights="imagenet")


def test_feature_extractor_passthrough():
    fx = build_backbone(nn.Conv2d(3, 4, 3))
    assert build_backbone(fx) is fx
    with pytest.raises(ValueError, match="already a FeatureExtractor"):
        build_backbone(fx, se_reduction=8)
    with pytest.raises(ValueError, match="already a FeatureExtractor, so output_fmt, sample_shape cannot apply"):
        build_backbone(fx, sample_shape=(3, 8, 8), output_fmt="NHWC")


def test_list_backbones():
    names = list_backbones()
    assert {"resnet50", "inception_v3"} <= set(names["torchvision"]) and "inception_resnet_v2" in names["timm"]


def test_extractor_pickled_before_output_fmt_still_runs():
    """Whole models saved before ``output_fmt`` existed lack the attribute; they load as NCHW."""
    import pickle

    ext = build_backbone(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    state = ext.__getstate__() if hasattr(ext, "__getstate__") else dict(ext.__dict__)
    state = dict(state)
    del state["output_fmt"]
    old = FeatureExtractor.__new__(FeatureExtractor)
    old.__setstate__(state)
    x = torch.randn(1, 3, 8, 8)
    assert old.output_fmt == "NCHW"
    torch.testing.assert_close(pickle.loads(pickle.dumps(old))(x), ext(x))


def test_densenet_default_node_is_after_its_final_relu():
    """torchvision's DenseNet applies its last ReLU in forward, after ``features``: the
    default node used to give the map before it (negative entries), unlike every other
    family's last feature map."""
    ext = build_backbone("densenet121")
    assert ext.name == "densenet121:relu"
    assert (ext(torch.randn(1, 3, 64, 64)) >= 0).all()
