"""build_backbone: names, models with nodes, plain modules, weights."""

from __future__ import annotations

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


def test_list_backbones():
    names = list_backbones()
    assert {"resnet50", "inception_v3"} <= set(names["torchvision"]) and "inception_resnet_v2" in names["timm"]
