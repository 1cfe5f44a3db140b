"""Errors a new user meets: what they say, and that following them works.

Torchvision weights enums as ``weights=``, a classifier's checkpoint given as backbone
weights, a ViT's needs said at once, close names for unknown backbones, and the input
checks of the classifiers' forward.
"""

from __future__ import annotations

import copy
import pickle
import re
import sys
import warnings

import pytest
import torch
import torchvision
from torch import nn

from bilinearpool import (
    BCNN,
    BilinearPool,
    CompactBilinearPool,
    FastBCNN,
    FeatureExtractor,
    GAPClassifier,
    MatrixSqrt,
    build_backbone,
)


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=4, padding=1), nn.BatchNorm2d(6), nn.ReLU())


class TestTorchvisionWeightsEnum:
    """``weights=ResNet18_Weights.DEFAULT``, the torchvision idiom, was a TypeError."""

    @pytest.fixture
    def get_model_calls(self, monkeypatch):
        """The ``weights`` each call of torchvision.models.get_model was given."""
        calls = []
        get_model = torchvision.models.get_model

        def spy(name, **kwargs):
            calls.append(kwargs.get("weights"))
            return get_model(name, **kwargs)

        monkeypatch.setattr(torchvision.models, "get_model", spy)
        return calls

    def test_member_goes_to_torchvision(self, tmp_path, monkeypatch, get_model_calls):
        """The member is handed to torchvision, which loads the file its URL names (put in
        torch.hub's cache here: nothing is downloaded)."""
        from torchvision.models import ResNet18_Weights

        reference = torchvision.models.resnet18()
        cache = tmp_path / "hub" / "checkpoints"
        cache.mkdir(parents=True)
        torch.save(reference.state_dict(), cache / ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1])
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
        model = FastBCNN("resnet18", num_classes=8, weights=ResNet18_Weights.DEFAULT)
        assert get_model_calls == [ResNet18_Weights.IMAGENET1K_V1]
        torch.testing.assert_close(model.backbone.body.conv1.weight, reference.conv1.weight)
        torch.testing.assert_close(
            model.backbone.body.get_submodule("layer4.1.bn2").running_var, reference.layer4[1].bn2.running_var
        )

    def test_member_of_another_model_is_refused_before_any_download(self, get_model_calls):
        from torchvision.models import ResNet50_Weights

        message = (
            r"weights=ResNet50_Weights.IMAGENET1K_V2 are the weights of torchvision 'resnet50', not of "
            r"'resnet18': pass one of ResNet18_Weights's members \(ResNet18_Weights.IMAGENET1K_V1, "
            r"ResNet18_Weights.DEFAULT\)"
        )
        with pytest.raises(ValueError, match=message):
            FastBCNN("resnet18", num_classes=8, weights=ResNet50_Weights.DEFAULT)
        assert get_model_calls == []

    def test_the_enum_itself_names_a_member(self):
        from torchvision.models import ResNet18_Weights

        with pytest.raises(TypeError, match=r"whole weights enum; pass one of its members, e.g. "
                           r"weights=ResNet18_Weights.DEFAULT"):
            build_backbone("resnet18", weights=ResNet18_Weights)

    def test_timm_models_take_no_torchvision_enum(self):
        from torchvision.models import ResNet18_Weights

        with pytest.raises(ValueError, match=r"torchvision weights enum, but 'resnet18' is a timm model"):
            build_backbone("timm:resnet18", weights=ResNet18_Weights.DEFAULT)

    def test_unknown_weights_name_lists_the_models_names(self):
        with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET9K' for 'resnet50'.*"
                           r"its names: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
            build_backbone("resnet50", weights="IMAGENET9K")

    def test_other_types_are_still_refused(self):
        with pytest.raises(TypeError, match=r"a torchvision weights enum member \(e.g. ResNet18_Weights.DEFAULT\)"
                           r".*but got int"):
            build_backbone("resnet18", weights=3)  # type: ignore[arg-type]


class TestLibraryCheckpointAsWeights:
    """A classifier's own state_dict as ``weights=`` listed missing ``conv1.*`` and
    unexpected ``backbone.body.*`` keys."""

    @pytest.mark.parametrize("cls", [FastBCNN, BCNN])
    def test_classifier_checkpoint_says_how_to_load_it(self, cls, tmp_path):
        torch.manual_seed(0)
        saved = cls("resnet18", num_classes=3)
        path = tmp_path / "classifier.pth"
        torch.save(saved.state_dict(), path)
        message = (
            r"does not fit torchvision 'resnet18': the file holds a whole classifier's weights \(keys such as "
            r"'backbone.body.conv1.weight'.*model.load_state_dict\(torch.load\(path\)\).*from its backbone "
            r"only: state = torch.load\(path\); new.backbone.load_state_dict"
        )
        with pytest.raises(ValueError, match=message):
            cls("resnet18", num_classes=3, weights=path)
        # what the error says to do works, for the whole model and for its backbone alone
        model = cls("resnet18", num_classes=3)
        model.load_state_dict(torch.load(path))
        torch.testing.assert_close(model.classifier.weight, saved.classifier.weight)
        new = GAPClassifier("resnet18", num_classes=5)
        state = torch.load(path)
        new.backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
        torch.testing.assert_close(new.backbone.body.conv1.weight, saved.backbone.body.conv1.weight)

    def test_timm_backbone(self, tmp_path):
        path = tmp_path / "classifier.pth"
        torch.save(GAPClassifier("timm:resnet18", num_classes=3).state_dict(), path)
        with pytest.raises(ValueError, match=r"does not fit timm 'resnet18': the file holds a whole classifier's"):
            build_backbone("timm:resnet18", weights=path)

    def test_safetensors_file_names_its_loader(self, tmp_path):
        safetensors = pytest.importorskip("safetensors.torch")
        path = tmp_path / "classifier.safetensors"
        safetensors.save_file(FastBCNN("resnet18", num_classes=3).state_dict(), str(path))
        with pytest.raises(ValueError, match=r"model.load_state_dict\(safetensors.torch.load_file\(path\)\)"):
            build_backbone("resnet18", weights=path)

    def test_extractor_checkpoint(self, tmp_path):
        path = tmp_path / "extractor.pth"
        torch.save(build_backbone("resnet18").state_dict(), path)
        with pytest.raises(ValueError, match=r"holds a FeatureExtractor's weights \(keys such as 'body.conv1.weight'"
                           r".*extractor.load_state_dict\(torch.load\(path\)\)"):
            build_backbone("resnet18", weights=path)


def tiny_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8
    )


class TestViTNeedsSaidAtOnce:
    """A torchvision ViT said only "pass sample_shape", and then, once given, "pass node="."""

    def test_module_without_node_or_size(self):
        with pytest.raises(ValueError, match=r"VisionTransformer is a torchvision classification model with no "
                           r"default feature node.*pass node=.*node='encoder'.* and sample_shape=\(3, 32, 32\)"):
            FastBCNN(tiny_vit(), num_classes=8)
        with pytest.raises(ValueError, match=r"no default feature node.*node='encoder'") as info:
            FastBCNN(tiny_vit(), num_classes=8, sample_shape=(3, 32, 32))
        assert "sample_shape=(" not in str(info.value)  # the size given is right: not asked again
        model = FastBCNN(tiny_vit(), num_classes=8, node="encoder", sample_shape=(3, 32, 32))
        assert model.backbone.tokens and model(torch.randn(2, 3, 32, 32)).shape == (2, 8)

    def test_node_without_size_names_the_size(self):
        with pytest.raises(ValueError, match=r"zero image of shape \(1, 3, 128, 128\).*pass sample_shape="
                           r"\(3, 32, 32\) \(VisionTransformer takes 32 x 32 images only\)$"):
            FastBCNN(tiny_vit(), num_classes=8, node="encoder")

    def test_name(self):
        with pytest.raises(ValueError, match=r"^'vit_b_16' is a torchvision classification model with no default "
                           r"feature node \(its output is its logits\); pass node=.*node='encoder'.* and "
                           r"sample_shape=\(3, 224, 224\)"):
            build_backbone("vit_b_16")

    def test_images_of_another_size_say_so(self):
        """A ViT built right then given images of another size failed inside the traced
        graph: "Wrong image height! Expected 32 but got Proxy(getitem_2)!"."""
        model = FastBCNN(tiny_vit(), num_classes=8, node="encoder", sample_shape=(3, 32, 32))
        assert model.backbone.image_size == (32, 32) and "image_size=(32, 32)" in repr(model.backbone)
        with pytest.raises(ValueError, match=r"^backbone 'VisionTransformer' takes 32 x 32 images only, but got "
                           r"shape \(2, 3, 48, 48\); resize them first \(e.g. torchvision.transforms.v2."
                           r"Resize\(\(32, 32\)\)\)$"):
            model(torch.randn(2, 3, 48, 48))
        restored = pickle.loads(pickle.dumps(model.backbone))
        assert restored.image_size == (32, 32)
        del restored.__dict__["image_size"]  # an extractor pickled before image_size existed
        restored = pickle.loads(pickle.dumps(restored))
        assert restored.image_size is None and restored(torch.randn(1, 3, 32, 32)).shape[-1] == 8
        # a convolutional backbone takes any size: no image_size
        assert build_backbone("resnet18").image_size is None

    def test_timm_vit_module(self):
        timm = pytest.importorskip("timm")
        vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
        with pytest.raises(ValueError, match=r"pass sample_shape=\(3, 32, 32\) .* and node= naming its last "
                           r"feature map \(its forward ends in its classifier, num_classes=1000"):
            build_backbone(vit)


class TestCloseNames:
    @pytest.mark.parametrize(
        ("name", "meant"),
        [("resnet5O", "'resnet50'"), ("inceptionv3", "'inception_v3'"), ("resnet-50", "'resnet50'"),
         ("ResNet50", "'resnet50'"), ("Inception-V3", "'inception_v3'")],
    )
    def test_unknown_name_suggests(self, name, meant):
        with pytest.raises(ValueError, match=rf"unknown backbone '{name}' \(did you mean {meant}"):
            build_backbone(name)

    def test_exact_but_for_case_and_separators_suggests_that_only(self):
        with pytest.raises(ValueError, match=r"\(did you mean 'inception_v3'\?\): expected"):
            build_backbone("inceptionv3")

    def test_nothing_close(self):
        with pytest.raises(ValueError, match="unknown backbone 'qwertyuiop'") as info:
            build_backbone("qwertyuiop")
        assert "did you mean" not in str(info.value)

    def test_timm_prefix(self):
        with pytest.raises(ValueError, match=r"unknown timm model 'resnt18' \(did you mean 'resnet18'"):
            build_backbone("timm:resnt18")

    def test_without_timm_torchvision_names_are_suggested(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "timm", None)
        with pytest.raises(ImportError, match=r"unknown backbone 'resnet-50' \(did you mean 'resnet50'\?\)"):
            build_backbone("resnet-50")


@pytest.fixture(scope="module")
def resnet18_model():
    torch.manual_seed(0)
    return FastBCNN("resnet18", num_classes=4).eval()


class TestInputChecks:
    """Where the backbone's input is known, forward names what it takes and what arrived
    (was: BatchNorm's "expected 4D input", "expected scalar type Byte but found Float")."""

    def test_named_backbone_knows_its_input(self, resnet18_model):
        assert resnet18_model.backbone.in_channels == 3
        assert build_backbone("timm:resnet18").in_channels == 3
        assert build_backbone(torchvision.models.resnet18()).in_channels == 3
        timm = pytest.importorskip("timm")
        assert build_backbone(timm.create_model("resnet18", num_classes=0, global_pool="")).in_channels == 3
        assert "in_channels=3, out_channels=512" in repr(resnet18_model.backbone)
        assert build_backbone(tiny(), sample_shape=(3, 16, 16)).in_channels == 3
        assert build_backbone(tiny()).in_channels is None  # any module: nothing imposed

    def test_missing_batch_dimension(self, resnet18_model):
        with pytest.raises(ValueError, match=r"backbone 'resnet18:layer4' takes images \(B, 3, H, W\) of dtype "
                           r"torch.float32, but got shape \(3, 64, 64\): a single image needs a batch dimension: "
                           r"x.unsqueeze\(0\)$"):
            resnet18_model(torch.randn(3, 64, 64))

    def test_images_without_pixels(self, resnet18_model):
        """An image 0 pixels high went to the network, whose error named a padded size
        ("Calculated padded input size per channel: (6 x 70)") instead of the input's."""
        for shape in [(2, 3, 0, 64), (2, 3, 64, 0)]:
            with pytest.raises(ValueError, match=rf"takes images \(B, 3, H, W\) of dtype torch.float32, but got "
                               rf"shape "
                               rf"{re.escape(str(shape))}: images need at least one pixel a side "
                               r"\(H >= 1 and W >= 1\)$"):
                resnet18_model(torch.randn(shape))
        assert resnet18_model(torch.randn(0, 3, 64, 64)).shape == (0, 4)  # an empty batch is no error

    def test_uint8_images(self, resnet18_model):
        with pytest.raises(TypeError, match=r"of dtype torch.float32, but got dtype torch.uint8: convert 8-bit "
                           r"images with x.float\(\) / 255 and normalise them .*ImageNet: mean \(0.485"):
            resnet18_model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
        with pytest.raises(TypeError, match=r"got dtype torch.uint8 and shape \(64, 64, 3\): .*255.*; a single "
                           r"channels-last image \(H, W, C\) needs x.permute\(2, 0, 1\).unsqueeze\(0\)"):
            resnet18_model(torch.zeros(64, 64, 3, dtype=torch.uint8))  # as read from a file

    def test_float64_images_under_autocast_are_refused(self, resnet18_model):
        """Under autocast every floating dtype passed the check, but autocast leaves float64
        alone: the first convolution failed with "expected scalar type Double but found
        BFloat16", and the error outside autocast advised autocast."""
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        message = (r"of dtype torch.float32, but got dtype torch.float64: convert the images with x.float\(\), "
                   r"or the model with model.to\(torch.float64\)$")
        with pytest.raises(TypeError, match=message):
            resnet18_model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(TypeError, match=message):
                resnet18_model(x)
            assert resnet18_model(x.bfloat16()).shape == (2, 4)  # what autocast casts: passes
        with pytest.raises(TypeError, match=r"got dtype torch.bfloat16: .*, or run it under torch.autocast$"):
            resnet18_model(x.bfloat16())

    def test_other_dtypes(self, resnet18_model):
        with pytest.raises(TypeError, match=r"dtype torch.float32, but got dtype torch.float64: convert the "
                           r"images with x.float\(\), or the model with model.to\(torch.float64\)"):
            resnet18_model(torch.randn(2, 3, 64, 64, dtype=torch.float64))
        with pytest.raises(TypeError, match=r"got dtype torch.int64: convert the images with x.float\(\)"):
            resnet18_model(torch.zeros(2, 3, 64, 64, dtype=torch.int64))

    def test_other_layouts(self, resnet18_model):
        with pytest.raises(ValueError, match=r"got shape \(2, 64, 64, 3\): channels-last data \(B, H, W, C\) needs "
                           r"x.permute\(0, 3, 1, 2\)"):
            resnet18_model(torch.randn(2, 64, 64, 3))
        with pytest.raises(ValueError, match=r"got shape \(2, 1, 64, 64\): the images have 1 channel, the backbone "
                           r"takes 3: gray images can be repeated"):
            resnet18_model(torch.randn(2, 1, 64, 64))
        with pytest.raises(TypeError, match=r"takes images \(B, 3, H, W\) of dtype torch.float32, but got list"):
            resnet18_model([torch.randn(3, 64, 64)])

    def test_fitting_inputs_run(self, resnet18_model):
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            expected = resnet18_model(x)
            torch.testing.assert_close(resnet18_model(x.to(memory_format=torch.channels_last)), expected)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 parameters, bfloat16 input
                assert resnet18_model(x.bfloat16()).shape == (2, 4)

    @pytest.mark.parametrize("cls", [FastBCNN, BCNN, GAPClassifier])
    def test_every_classifier_checks(self, cls):
        model = cls(tiny(), num_classes=3, sample_shape=(3, 16, 16))
        with pytest.raises(ValueError, match=r"backbone 'Sequential' takes images \(B, 3, H, W\)"):
            model(torch.randn(3, 16, 16))
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision(self, dtype):
        model = FastBCNN(tiny(), num_classes=3, sample_shape=(3, 16, 16)).eval()
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x.to(dtype)).shape == (2, 3)  # float32 parameters under autocast
        half = copy.deepcopy(model).to(dtype)  # a model made half
        with torch.no_grad():
            assert half(x.to(dtype)).dtype == dtype
        with pytest.raises(TypeError, match=rf"of dtype {dtype}, but got dtype torch.float32"):
            half(x)

    def test_traced_compiled_and_exported(self):
        from _onnx import run_onnx

        torch.manual_seed(0)
        model = FastBCNN(tiny(), num_classes=3, sample_shape=(3, 24, 24)).eval()
        x = torch.randn(2, 3, 24, 24)
        with torch.no_grad():
            eager = model(x)
            torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=True)(x), eager)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(model, x)
            torch.testing.assert_close(traced(x), eager)
            torch.testing.assert_close(torch.from_numpy(run_onnx(model, x)), eager, rtol=1e-4, atol=1e-5)
        with pytest.raises(TypeError, match="got dtype torch.uint8"):
            torch.compile(model, backend="eager")(x.to(torch.uint8))

    def test_exported_to_onnx_with_dynamo(self):
        pytest.importorskip("onnxscript")
        from _onnx import run_onnx

        torch.manual_seed(0)
        model = FastBCNN(tiny(), num_classes=3, sample_shape=(3, 24, 24)).eval()
        x = torch.randn(2, 3, 24, 24)
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(run_onnx(model, x, dynamo=True)), model(x), rtol=1e-4, atol=1e-5)


class Scaled(nn.Module):
    """A module that converts 8-bit images itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x.float() / 255)


def test_a_network_without_parameters_takes_floating_images_only():
    """With in_channels set (sample_shape given), integer images were let through by a
    network without parameters (the dtype check compared with the first parameter's)."""
    fx = build_backbone(nn.MaxPool2d(2), sample_shape=(3, 32, 32))
    assert fx.in_channels == 3
    with pytest.raises(TypeError, match=r"^backbone 'MaxPool2d' takes images \(B, 3, H, W\) of a floating-point "
                       r"dtype, but got dtype torch.uint8: convert 8-bit images with x.float\(\) / 255"):
        fx(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"of a floating-point dtype, but got dtype torch.int64: convert the "
                       r"images with x.float\(\)$"):
        fx(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    for dtype in (torch.float32, torch.float64, torch.float16):  # any floating dtype runs
        assert fx(torch.zeros(1, 3, 32, 32, dtype=dtype)).dtype == dtype
    with pytest.raises(ValueError, match=r"of a floating-point dtype, but got shape \(1, 2, 32, 32\)"):
        fx(torch.zeros(1, 2, 32, 32))


class TestAnyModuleIsNotConstrained:
    """A module of the user's may take other inputs: nothing is checked before it runs."""

    def test_module_that_converts_its_input_itself(self):
        model = FastBCNN(Scaled(), num_classes=2)
        assert model(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).shape == (2, 2)

    def test_dtype_is_blamed_when_the_module_fails(self):
        model = FastBCNN(tiny(), num_classes=2)
        with pytest.raises(TypeError, match=r"backbone 'Sequential' failed on input of dtype torch.uint8, its "
                           r"parameters being torch.float32 \(RuntimeError: .*\); convert 8-bit images with "
                           r"x.float\(\) / 255") as info:
            model(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(TypeError, match=r"failed on input of dtype torch.float64"):
            model(torch.zeros(2, 3, 8, 8, dtype=torch.float64))

    def test_other_failures_are_left_alone(self):
        model = FastBCNN(tiny(), num_classes=2)
        x = torch.zeros(2, 5, 8, 8)
        with pytest.raises(RuntimeError) as own:
            model.backbone.body(x)  # the convolution's own error
        with pytest.raises(RuntimeError, match="channels") as info:
            model(x)
        assert type(info.value) is type(own.value) and str(info.value) == str(own.value)
        assert info.value.__cause__ is None  # passed through, not wrapped

    def test_checks_can_be_turned_off(self):
        model = FastBCNN(Scaled(), num_classes=2, sample_shape=(3, 8, 8))
        x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
        with pytest.raises(TypeError, match="got dtype torch.uint8"):
            model(x)
        model.backbone.in_channels = None
        assert model(x).shape == (2, 2)


def test_extractor_pickled_before_in_channels_still_runs():
    ext = build_backbone(tiny(), sample_shape=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    state = dict(ext.__dict__)
    del state["in_channels"]
    old = FeatureExtractor.__new__(FeatureExtractor)
    old.__setstate__(state)
    assert old.in_channels is None
    torch.testing.assert_close(old(x), ext(x))  # runs, unchecked
    restored = pickle.loads(pickle.dumps(ext))
    assert restored.in_channels == 3
    torch.testing.assert_close(restored(x), ext(x))
    with pytest.raises(ValueError, match=r"takes images \(B, 3, H, W\)"):  # checked again
        restored(x[0])


@pytest.mark.parametrize("in_channels", [0, -1, 2.0, True, "3"])
def test_extractor_in_channels_must_be_a_positive_int(in_channels):
    """A number below 1 is a ValueError; anything but an integer is a TypeError that
    names the type it got."""
    expected = rf"^in_channels must be a positive int, but got {re.escape(repr(in_channels))}"
    error = ValueError if isinstance(in_channels, int) and not isinstance(in_channels, bool) else TypeError
    if error is TypeError:
        expected += rf" \({type(in_channels).__name__}\)"
    with pytest.raises(error, match=expected + "$"):
        FeatureExtractor(tiny(), out_channels=6, in_channels=in_channels)


def test_the_checked_dtype_is_that_of_the_first_floating_parameter():
    """The check reads the parameter ``parameters()`` gives first among the floating ones,
    afresh on each call: integer and absent parameters skipped, a module registered twice
    or inside itself read once, parameters given by load_state_dict(assign=True) seen."""
    from bilinearpool.backbones import _first_float_param

    class Counts(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_parameter("absent", None)
            self.count = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)

    empty = nn.Sequential(nn.ReLU())
    empty.again = empty  # inside itself: no floating parameter anywhere
    assert _first_float_param(empty) is None
    shared = Counts()
    body = nn.Sequential(nn.Sequential(shared, nn.ReLU()), shared, nn.Conv2d(3, 4, 1), nn.Linear(4, 4).double())
    body.loop = body
    assert _first_float_param(body) is body[2].weight
    assert _first_float_param(body) is next(p for p in body.parameters() if p.is_floating_point())
    ext = build_backbone(tiny(), sample_shape=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    double = {k: v.double() if v.is_floating_point() else v for k, v in ext.state_dict().items()}
    ext.load_state_dict(double, assign=True)
    with pytest.raises(TypeError, match=r"of dtype torch.float64, but got dtype torch.float32"):
        ext(x)
    assert ext(x.double()).dtype == torch.float64


def _integer_kinds(n: int) -> list[object]:
    """``n`` as the integer types users pass: NumPy scalars (from configs, arrays) and 0-d tensors."""
    import numpy as np

    return [np.int64(n), np.int32(n), torch.tensor(n)]


@pytest.mark.parametrize("kind", range(3))
def test_sizes_take_any_integer_type_and_keep_python_ints(kind):
    """Every size argument takes what ``nn.Linear`` takes (NumPy integers, 0-d integer
    tensors) and the module keeps a Python int (a NumPy scalar would show in repr and
    be saved in pickles as one); floats and bools are still refused."""
    from bilinearpool import (
        CompactBilinearPool,
        CovariancePool,
        LowRankBilinearPool,
        SEBlock,
        bench,
        functional as BF,
    )
    from bilinearpool.functional.sqrtm import matrix_sqrt
    from bilinearpool.models import ChannelReduction

    def n(value: int) -> object:
        return _integer_kinds(value)[kind]

    built = {
        "se": SEBlock(n(16), reduction=n(4)),
        "compact": CompactBilinearPool(in_channels=n(4), in_channels_b=n(3), out_features=n(32)),
        "lowrank": LowRankBilinearPool(in_channels=n(4), in_channels_b=n(3), rank=n(2), out_features=n(5)),
        "covariance": CovariancePool(in_channels=n(8), reduced_channels=n(4)),
        "reduction": ChannelReduction(n(8), n(4)),
        "extractor": FeatureExtractor(tiny(), out_channels=6, in_channels=n(3)),
    }
    for name, module in built.items():
        for attr in ("channels", "reduction", "in_channels", "in_channels_b", "out_features", "rank",
                     "reduced_channels", "out_channels"):
            value = getattr(module, attr, None)
            if value is not None and not isinstance(value, nn.Module):
                assert type(value) is int, (name, attr, type(value))
        assert "np." not in repr(module) and "tensor(" not in repr(module), (name, repr(module))
    model = FastBCNN(tiny(), num_classes=n(3), reduce_dim=n(4))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert BF.triu_size(n(4)) == 10
    assert bench.classifier_parameter_count(n(4), n(2)) == 10
    assert bench.balanced_orders(n(2)) == [[0, 1], [1, 0]]
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    spd = x @ x.transpose(1, 2) + torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(matrix_sqrt(spd, num_iters=n(20)), matrix_sqrt(spd, num_iters=20))
    for bad in (2.0, True, torch.tensor(2.0), torch.tensor([2])):
        with pytest.raises(TypeError, match=r"^channels must be a positive int, but got "):
            SEBlock(bad)


@pytest.mark.parametrize("build, name", [
    (lambda: BilinearPool(reduction=1), "reduction"),
    (lambda: BilinearPool(resize=3), "resize"),
    (lambda: MatrixSqrt(method=1), "method"),
    (lambda: MatrixSqrt(norm=1), "norm"),
    (lambda: MatrixSqrt(impl=1), "impl"),
    (lambda: CompactBilinearPool(in_channels=4, out_features=8, method=1), "method"),
    (lambda: CompactBilinearPool(in_channels=4, out_features=8, algorithm=3), "algorithm"),
    (lambda: build_backbone(tiny(), output_fmt=1), "output_fmt"),
])
def test_a_setting_of_choices_given_another_type_is_a_type_error(build, name):
    """Settings that take one of a few strings raised ValueError for a number (usage.rst
    says a wrong type is a TypeError naming the type)."""
    with pytest.raises(TypeError, match=rf"^{name} must be (None or )?one of \(.*\), but got \d+ \(int\)$"):
        build()


def test_sample_shape_of_another_type_is_a_type_error():
    for shape, kind in (((3, "64", 64), "str"), ((3, 64.0, 64), "float"), ((True, 64, 64), "bool")):
        with pytest.raises(TypeError, match=rf"sample_shape must be \(C, H, W\) of positive ints, .* is a {kind}$"):
            FastBCNN(tiny(), num_classes=2, sample_shape=shape)
    # integers of any kind are taken, as the sizes of the layers (0-d tensors too)
    import numpy as np

    fx = build_backbone(tiny(), sample_shape=(3, torch.tensor(32), np.int64(32)))
    assert fx.out_channels == 6


class TestHeadInputChecks:
    """The heads checked less than the functional ops under them (helper-123's audit)."""

    @pytest.mark.parametrize("bad, error, message", [
        (torch.zeros(2, 4, 3, 3, dtype=torch.int64), TypeError, r"^x_b must be a floating-point tensor"),
        (torch.zeros(2, 0, 3, 3), ValueError, r"^x_b must have at least one channel and one location"),
        (torch.zeros(2, 4, 0, 3), ValueError, r"^x_b must have at least one channel and one location"),
    ])
    def test_resizing_pool_checks_the_streams_first(self, bad, error, message):
        """Resized first, they gave torch's errors ("upsample_bilinear2d_channels_last" not
        implemented for 'Long', "Non-empty 4D data tensor expected")."""
        x_a = torch.randn(2, 4, 5, 5)
        for resize in (None, "bilinear"):
            with pytest.raises(error, match=message):
                BilinearPool(resize=resize)(x_a, bad)

    @pytest.mark.parametrize("shape", [(2, 3, 0, 4), (2, 0, 4), (2, 0, 3, 3)])
    def test_global_average_of_nothing_is_an_error_not_nan(self, shape):
        from bilinearpool import GlobalAvgPool

        with pytest.raises(ValueError, match=r"^input must have at least one channel and one location"):
            GlobalAvgPool()(torch.randn(*shape))

    @pytest.mark.parametrize("cls", [GAPClassifier, FastBCNN])
    def test_a_single_image_without_its_batch_dimension_is_refused(self, cls):
        """torch's layers take it unbatched; the (C, H, W) map was read as tokens and a
        batch of C logits came back."""
        model = cls(nn.Sequential(nn.Conv2d(3, 6, 3, stride=4, padding=1), nn.ReLU()), num_classes=3)
        with pytest.raises(ValueError, match=r"^backbone 'Sequential' expected a batch of images \(B, C, H, W\), "
                           r"but got shape \(3, 13, 13\) and gave a map without a batch dimension, \(6, 4, 4\); "
                           r"add the batch dimension to a single image \(x.unsqueeze\(0\)\)$"):
            model(torch.randn(3, 13, 13))
        assert model(torch.randn(3, 13, 13).unsqueeze(0)).shape == (1, 3)

    @pytest.mark.parametrize("pool, args", [
        (BilinearPool(), (0,)), (BilinearPool(), (2, -3)), (BilinearPool(), ("3",)),
        ("fast", (0,)), ("fast", (2.5,)), ("gap", ("3",)),
    ])
    def test_output_dim_checks_its_channel_counts(self, pool, args):
        from bilinearpool import FastBilinearPool, GlobalAvgPool

        pool = {"fast": FastBilinearPool(triu=False), "gap": GlobalAvgPool()}.get(pool, pool)
        with pytest.raises((TypeError, ValueError), match=r"^in_channels(_b)? must be a positive int, but got"):
            pool.output_dim(*args)

    @pytest.mark.parametrize("build", [
        lambda: GAPClassifier(nn.AvgPool2d(2), num_classes=2, sample_shape=(3, 8, 8)),
        lambda: BCNN(nn.AvgPool2d(2), num_classes=2, sample_shape=(3, 8, 8)),
    ])
    def test_features_of_another_dtype_than_the_classifier_say_so(self, build):
        """A backbone without parameters passes float64 images on: F.linear's "mat1 and
        mat2 must have the same dtype" came through."""
        model = build()
        model.backbone.in_channels = None  # a module of the user's: any input
        with pytest.raises(TypeError, match=r"^the classifier's weights are torch.float32, so the pooled "
                           r"features \(of torch.float64 images\) must be torch.float32 \(torch.autocast "
                           r"leaves float64 alone\), but got torch.float64: convert one of them \(e.g. the "
                           r"model with .to\(torch.float64\)\)$"):
            model(torch.randn(2, 3, 8, 8, dtype=torch.float64))

    def test_channel_reduction_of_another_dtype_says_so(self):
        from bilinearpool import ChannelReduction

        with pytest.raises(TypeError, match=r"^ChannelReduction's weights are torch.float32, so the input must "
                           r"be torch.float32 outside torch.autocast, but got torch.float16: convert one of "
                           r"them \(e.g. the layer with .to\(torch.float16\)\), or run under torch.autocast$"):
            ChannelReduction(3, 2)(torch.randn(1, 3, 4, 4, dtype=torch.float16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ChannelReduction(3, 2)(torch.randn(1, 3, 4, 4, dtype=torch.bfloat16)).shape == (1, 2, 4, 4)

    def test_two_backbones_of_two_dtypes_are_refused_when_built(self):
        """Accepted, the model failed at its first forward (one head cannot take both)."""
        def body():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

        with pytest.raises(TypeError, match=r"^the two backbones must have parameters of one dtype, but "
                           r"'Sequential' has torch.float32 and 'Sequential' torch.float64: build both in "
                           r"one dtype \(e.g. the second with .to\(torch.float32\)\)"):
            BCNN(body(), body().double(), num_classes=2)
        model = BCNN(body(), body(), num_classes=2).double()  # one dtype, converted after: fine
        assert model(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64

    def test_a_pool_class_given_for_an_instance_says_so(self):
        from bilinearpool import BilinearClassifier, FastBilinearPool

        with pytest.raises(TypeError, match=r"^pool must be an nn.Module, but got type: pass an instance, "
                           r"FastBilinearPool\(\)$"):
            BilinearClassifier(tiny(), num_classes=2, pool=FastBilinearPool)
        with pytest.raises(TypeError, match=r"^pool must be an nn.Module, but got str$"):
            BilinearClassifier(tiny(), num_classes=2, pool="fast")

