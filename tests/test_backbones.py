"""build_backbone: names, models with nodes, plain modules, weights."""

from __future__ import annotations

import io
import pickle
import re
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


def test_timm_reduction_is_that_of_the_last_map():
    assert build_backbone("timm:resnet18").reduction == 32


def test_timm_name_refuses_sample_shape():
    """timm knows its model's input channels (in_chans): a sample_shape would do nothing."""
    with pytest.raises(ValueError, match=r"sample_shape= applies to torchvision models and your own modules, "
                                         r"not to timm model 'timm:resnet18'.*in_chans=C\) as the backbone, "
                                         r"with sample_shape=\(C, H, W\)"):
        build_backbone("timm:resnet18", sample_shape=(1, 64, 64))
    import timm  # what the message says to do works

    gray = build_backbone(timm.create_model("resnet18", in_chans=1, features_only=True), sample_shape=(1, 64, 64))
    assert gray.in_channels == 1 and gray(torch.zeros(1, 1, 64, 64)).shape == (1, 512, 2, 2)


def test_reduction_of_a_module_is_measured_along_the_width():
    # 32 x 64 -> 15 x 31: the input's width over the map's, 64 // 31 = 2 (not 32 // 31 = 1)
    fx = build_backbone(nn.Conv2d(3, 8, 3, stride=2), sample_shape=(3, 32, 64))
    assert fx.reduction == 2 and fx(torch.randn(1, 3, 32, 64)).shape == (1, 8, 15, 31)


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


@pytest.mark.parametrize("wrap", ["state_dict", "model", "model_state_dict", "module.", None])
def test_local_weights_file_wrapped_or_saved_from_data_parallel(tmp_path, wrap):
    """Training scripts save {"model": ...} or {"model_state_dict": ...}; nn.DataParallel
    prefixes every key with "module."."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    state = reference.state_dict()
    if wrap == "module.":
        saved = {f"module.{k}": v for k, v in state.items()}
    elif wrap is None:
        saved = state
    else:
        saved = {wrap: state, "epoch": 3}
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)
    fx = build_backbone("resnet18", weights=path)
    torch.testing.assert_close(fx.body.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(fx.body.get_submodule("layer4.1.bn2").running_var, reference.layer4[1].bn2.running_var)


def test_local_weights_file_with_an_unexpected_key_is_refused(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["layer5.weight"] = torch.zeros(3)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"does not fit torchvision 'resnet18': missing \[\], unexpected \['layer5.weight'\]"):
        build_backbone("resnet18", weights=path)


def test_random_initialisation_is_torchvisions_own():
    """weights=None builds GoogLeNet with torchvision's initialisation (truncated normal,
    std 0.01), not PyTorch's default (uniform, std 1/sqrt(3 fan_in): 0.048 for conv1);
    only a build that loads weights skips it."""
    fx = build_backbone("googlenet", weights=None)
    convs = [m.weight for m in fx.body.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) > 50
    weights = torch.cat([w.detach().flatten() for w in convs])
    assert 0.009 < weights.std() < 0.011
    assert 0.009 < fx.body.conv1.conv.weight.std() < 0.011


def test_local_weights_file_timm(tmp_path):
    import timm

    reference = timm.create_model("resnet18")
    path = tmp_path / "timm_resnet18.pth"
    torch.save(reference.state_dict(), path)
    fx = build_backbone("timm:resnet18", weights=path)
    torch.testing.assert_close(fx.body.conv1.weight, reference.conv1.weight)


@pytest.mark.parametrize("layout", ["model_state_dict", "module.", "state_dict+ema"])
def test_local_weights_file_timm_read_as_checked(tmp_path, layout):
    """timm read the file again by its own rules after the library had checked it: a
    {"model_state_dict": ...} file loaded nothing (random weights, no error) and a file
    with "state_dict" and "state_dict_ema" gave the EMA weights, not the checked ones.
    A timm name now loads what a torchvision name would."""
    import timm

    torch.manual_seed(0)
    reference, other = timm.create_model("resnet18"), timm.create_model("resnet18")
    state = reference.state_dict()
    saved = {
        "model_state_dict": {"model_state_dict": state, "epoch": 3},
        "module.": {f"module.{k}": v for k, v in state.items()},
        "state_dict+ema": {"state_dict": state, "state_dict_ema": other.state_dict()},
    }[layout]
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)
    fx = build_backbone("timm:resnet18", weights=path).eval()
    for key, value in fx.body.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fx(x), reference.eval().forward_features(x))


@pytest.mark.parametrize("node", [["layer4"], 4])
def test_node_of_another_type_is_a_type_error(node):
    with pytest.raises(TypeError, match=rf"^node must be None or a str naming a graph node \(e.g. 'layer4'\), "
                       rf"but got {type(node).__name__}$"):
        build_backbone(torchvision.models.resnet18(), node=node)


@pytest.mark.parametrize("backbone", ["resnet18", "module"])
@pytest.mark.parametrize("node", ["", "  "])
def test_empty_node_is_refused_not_read_as_the_default(backbone, node):
    # "" once fell through ``node or default`` and silently gave the default node
    model = torchvision.models.resnet18() if backbone == "module" else backbone
    with pytest.raises(ValueError, match=rf"^node must name a graph node \(e.g. 'layer4'\) or be None for the "
                       rf"default, but got {node!r}$"):
        build_backbone(model, node=node)


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


@pytest.mark.parametrize("name", ["resnet18.badtag", "timm:resnet18.badtag"])
def test_timm_name_with_an_unknown_tag(name):
    """timm.is_model reads the bare name: the name passed the check, and building failed
    with timm's bare RuntimeError (with weights, as a weights download error)."""
    from bilinearpool import check_backbone_name

    expected = r"unknown pretrained tag 'badtag' for timm model 'resnet18': use one of its tags \[.*'a1_in1k'"
    with pytest.raises(ValueError, match=expected):
        check_backbone_name(name)
    for weights in (None, "imagenet"):
        with pytest.raises(ValueError, match=expected):
            build_backbone(name, weights=weights)


def test_timm_tag_of_a_configuration_without_weights():
    """A tag timm has a configuration for but no weights (".untrained") is a name timm
    builds: refused for a while, since list_pretrained leaves such tags out."""
    from bilinearpool import check_backbone_name

    check_backbone_name("timm:test_vit_relpos.untrained")
    assert build_backbone("timm:test_vit_relpos.untrained").out_channels > 0


def test_timm_vit_by_name_knows_its_image_size():
    fx = build_backbone("timm:vit_tiny_patch16_224")
    assert fx.image_size == (224, 224)
    with pytest.raises(ValueError, match=r"takes 224 x 224 images only, but got shape \(1, 3, 128, 128\)"):
        fx(torch.randn(1, 3, 128, 128))


def test_a_failing_probe_of_a_traced_module_prints_nothing(capfd):
    """torch.fx prints the traceback of a traced module's failure to stderr even where it is
    caught: building a classifier around one that fails on the probe's zero image printed
    24 lines of traceback above the clear ValueError (torchvision's maxvit_t)."""

    class FixedSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x.view(1, 3, 7, 7))  # 7 x 7 images only

    traced = torch.fx.symbolic_trace(FixedSize())
    with pytest.raises(RuntimeError):  # fx prints here: the check can fail
        traced(torch.zeros(1, 3, 8, 8))
    assert "Traceback" in capfd.readouterr().err
    with pytest.raises(ValueError, match=r"could not run the backbone on a zero image of shape \(1, 3, 128, 128"):
        build_backbone(traced)
    assert capfd.readouterr().err == ""
    fx = build_backbone(traced, sample_shape=(3, 7, 7))
    assert fx.out_channels == 4
    with pytest.raises(RuntimeError):  # the user's own pass fails (and fx prints), not the probes that follow
        fx(torch.zeros(1, 3, 8, 8))
    assert capfd.readouterr().err.count("Traceback") == 1


def test_probes_of_two_threads_leave_stderr_as_it_was(monkeypatch):
    """The real pass that reads the channel count swapped sys.stderr without the probe
    lock: two threads building at once, the first leaving first, left the process's
    stderr on a StringIO for good (every later warning lost). And without a stderr
    (None: pythonw) every build failed writing to it."""
    import threading

    entered = {name: threading.Event() for name in "ab"}
    go = {name: threading.Event() for name in "ab"}

    class Gate(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.conv, self.name = nn.Conv2d(3, 4, 3), name

        def forward(self, x):
            if x.device.type != "meta" and x.shape[-1] == 64:  # the real pass at the sample shape
                entered[self.name].set()
                assert go[self.name].wait(10)
            return self.conv(x)

    def traced(name):  # stderr is swapped for a body holding a traced module only
        return nn.Sequential(Gate(name), torch.fx.symbolic_trace(nn.Identity()))

    real = sys.stderr
    threads = {name: threading.Thread(target=build_backbone, args=(traced(name),),
                                      kwargs={"sample_shape": (3, 64, 64)}) for name in "ab"}
    threads["a"].start()
    assert entered["a"].wait(10)
    threads["b"].start()
    assert not entered["b"].wait(0.5)  # b waits for a's swap to end
    go["a"].set()
    threads["a"].join(10)
    assert entered["b"].wait(10)
    go["b"].set()
    threads["b"].join(10)
    assert sys.stderr is real
    monkeypatch.setattr(sys, "stderr", None)
    go["a"].clear()
    go["a"].set()
    assert build_backbone(traced("a"), sample_shape=(3, 64, 64)).out_channels == 4


class TestImagesTooSmall:
    """Images smaller than a network takes (InceptionV3 below 75 x 75) failed with torch's
    "Kernel size can't be greater than actual input size", naming no size to use. The
    smallest size is now found on the meta device and named in a ValueError."""

    def test_inception_v3_names_75(self):
        fx = build_backbone("inception_v3")
        with pytest.raises(ValueError, match=(
            r"backbone 'inception_v3:Mixed_7c' takes images of at least 75 x 75 pixels, but got shape "
            r"\(1, 3, 64, 64\) \(RuntimeError: .*Kernel size.*\); resize them first "
            r"\(e.g. torchvision.transforms.v2.Resize\(75\)\)"
        )):
            fx(torch.randn(1, 3, 64, 64))
        assert fx.eval()(torch.randn(1, 3, 75, 75)).shape == (1, 2048, 1, 1)

    def test_a_module_given_with_its_sample_shape(self):
        body = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.Conv2d(4, 4, 5))  # 9 x 9 at least
        fx = build_backbone(body, sample_shape=(3, 32, 32))
        for shape in [(2, 3, 8, 8), (2, 3, 8, 30), (2, 3, 1, 1)]:
            with pytest.raises(ValueError, match=rf"at least 9 x 9 pixels, but got shape \({shape[0]}, 3"):
                fx(torch.randn(shape))
        assert fx(torch.randn(2, 3, 9, 9)).shape == (2, 4, 1, 1)
        assert body.training  # the probe gave the mode back

    def test_the_probes_leave_the_module_alone(self):
        """The probes ran the module itself in eval mode with meta weights swapped in: a
        thread running the same model meanwhile got wrong results (max diff 1e23), and two
        probes at once left the warning filters at "ignore" for good."""
        import threading
        import warnings

        calls = []

        class Spy(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 5)

            def forward(self, x):
                calls.append((self, self.training, self.conv.weight.device.type))
                return self.conv(x)

        body = Spy()
        fx = build_backbone(body, sample_shape=(3, 16, 16))
        calls.clear()
        with pytest.raises(ValueError, match="at least 5 x 5 pixels"):
            fx(torch.randn(1, 3, 4, 4))
        assert [c[1:] for c in calls if c[0] is body] == [(True, "cpu")]  # the failing call only
        assert len(calls) > 3 and all(c[1:] == (False, "meta") for c in calls if c[0] is not body)

        filters = list(warnings.filters)
        x = torch.randn(2, 3, 16, 16)
        expected = fx.eval()(x)
        wrong = []

        def serve():
            for _ in range(30):
                if not torch.equal(fx(x), expected):
                    wrong.append(1)

        def bad_requests():
            for _ in range(5):
                with pytest.raises(ValueError, match="at least 5 x 5"):
                    fx(torch.randn(1, 3, 4, 4))

        threads = [threading.Thread(target=f) for f in (serve, bad_requests, bad_requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not wrong and warnings.filters == filters

    def test_nested_extractors_and_modules_that_cannot_be_copied(self):
        """An extractor inside a backbone probes within the outer probe (a plain lock
        deadlocked); weight_norm cannot be deep-copied: probed in place, the size still said."""
        inner = build_backbone(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), sample_shape=(3, 16, 16))
        outer = build_backbone(nn.Sequential(inner, nn.Conv2d(8, 8, 7)), sample_shape=(3, 16, 16))
        with pytest.raises(ValueError, match="at least 9 x 9 pixels"):
            outer(torch.randn(1, 3, 8, 8))
        normed = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 5)))
        fx = build_backbone(normed, sample_shape=(3, 16, 16))
        with pytest.raises(ValueError, match="at least 5 x 5 pixels"):
            fx(torch.randn(1, 3, 4, 4))
        assert normed.training and normed[0].weight_v.device.type == "cpu"

    @pytest.mark.parametrize("kind", ["even sizes only", "one size fails", "not the size"])
    def test_other_failures_keep_torchs_error(self, kind):
        class Picky(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 1)

            def forward(self, x):
                side = x.shape[-1]
                if ((kind == "even sizes only" and side % 2) or (kind == "one size fails" and side == 7)
                        or (kind == "not the size" and side == 7 and x.device.type != "meta")):
                    raise RuntimeError(f"picky about {side}")
                return self.conv(x)

        fx = build_backbone(Picky(), sample_shape=(3, 8, 8))
        with pytest.raises(RuntimeError, match="picky about 7"):
            fx(torch.randn(1, 3, 7, 7))

    def test_the_check_compiles_in_one_graph(self):
        """The try around the network, where the input is known, costs no graph break."""
        from bilinearpool import FastBCNN

        body = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU())
        model = FastBCNN(body, num_classes=2, sample_shape=(3, 16, 16)).eval()
        x = torch.randn(2, 3, 12, 12)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x))


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
        with pytest.raises(ValueError, match=r"output_fmt must be None or one of \('NCHW', 'NHWC'\), but got 'NLC'"):
            build_backbone(NHWCNet(), output_fmt="NLC")

    def test_output_fmt_against_a_known_layout(self):
        """A layout that contradicts the known one of a default node or a timm model was
        taken without a check: FastBCNN("resnet18", output_fmt="NHWC") built a model that
        read the maps' width as 4 channels at the 128-pixel probe, and ran."""
        from bilinearpool import FastBCNN, GAPClassifier

        with pytest.raises(ValueError, match=r"^output_fmt='NHWC' contradicts the layout of resnet18 cut at "
                           r"'layer4', which gives NCHW maps; drop output_fmt .* or pass output_fmt='NCHW'$"):
            FastBCNN("resnet18", num_classes=3, output_fmt="NHWC")
        with pytest.raises(ValueError, match=r"contradicts the layout of swin_t cut at 'norm', which gives NHWC"):
            GAPClassifier("swin_t", num_classes=3, output_fmt="NCHW")
        with pytest.raises(ValueError, match=r"contradicts the layout of timm model 'timm:resnet18', which "
                           r"reports NCHW maps"):
            build_backbone("timm:resnet18", output_fmt="NHWC")
        with pytest.raises(ValueError, match=r"contradicts the layout of ResNet cut at 'layer4'"):
            build_backbone(torchvision.models.resnet18(), output_fmt="NHWC")
        # refused before SE blocks go into the user's model in place (a retry then failed
        # with "already contains 8 SEBlocks")
        model = torchvision.models.resnet18()
        with pytest.raises(ValueError, match="contradicts the layout"):
            build_backbone(model, se_reduction=8, output_fmt="NHWC")
        assert build_backbone(model, se_reduction=8).out_channels == 512
        # the known layout, given: accepted
        assert build_backbone("resnet18", output_fmt="NCHW").out_channels == 512
        assert build_backbone("timm:resnet18", output_fmt="NCHW").output_fmt == "NCHW"

    def test_output_fmt_against_the_layout_a_module_reports(self):
        """A timm model or feature net passed as a module (and torchvision Swin stages)
        say their layout; a contradicting output_fmt was taken without a check for a
        module (only names were checked): a timm Swin read as NCHW at its one image size
        gave out_channels 7 (the maps' width) and (B, 7, 7, 768) maps."""
        timm = pytest.importorskip("timm")

        swin = dict(img_size=64, window_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 1))
        for model in (
            timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, global_pool="", **swin),
            timm.create_model("swin_tiny_patch4_window7_224", features_only=True, out_indices=(-1,), **swin),
        ):
            name = type(model).__name__
            with pytest.raises(ValueError, match=rf"^output_fmt='NCHW' contradicts the layout of {name}, which "
                               r"reports NHWC maps; drop output_fmt .* or pass output_fmt='NHWC'$"):
                build_backbone(model, sample_shape=(3, 64, 64), output_fmt="NCHW")
            fx = build_backbone(model, sample_shape=(3, 64, 64), output_fmt="NHWC")
            assert fx.out_channels == 32 and fx(torch.randn(1, 3, 64, 64)).shape == (1, 32, 8, 8)
        with pytest.raises(ValueError, match=r"contradicts the layout of Sequential, which reports NHWC"):
            build_backbone(tiny_swin().features, output_fmt="NCHW", sample_shape=(3, 32, 32))
        resnet = timm.create_model("resnet18", features_only=True, out_indices=(-1,))
        with pytest.raises(ValueError, match=r"contradicts the layout of FeatureListNet, which reports NCHW"):
            build_backbone(resnet, output_fmt="NHWC")
        assert build_backbone(resnet, output_fmt="NCHW").out_channels == 512
        # a module that says nothing: output_fmt is the user's word
        assert build_backbone(NHWCNet(), output_fmt="NHWC").output_fmt == "NHWC"

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
    with pytest.raises(TypeError, match=r"sample_shape must be \(C, H, W\) .* but got 32 \(int\)"):
        build_backbone(nn.Conv2d(3, 4, 3), sample_shape=32)
    with pytest.raises(ValueError, match=r"zero image of shape \(1, 3, 128, 128\).*pass sample_shape"):
        build_backbone(nn.Conv2d(1, 4, 3))
    assert build_backbone(nn.Conv2d(1, 4, 3), sample_shape=(1, 8, 8)).out_channels == 4


def test_probe_keeps_submodule_modes():
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    body[1].eval()  # a frozen batch norm stays frozen
    build_backbone(body)
    assert [m.training for m in body] == [True, False, True] and body.training


class TestCuttingKeepsSubmoduleModes:
    """Cutting a model at a node (torchvision's create_feature_extractor, which calls
    train() on the model) leaves each submodule's training mode as the user set it, in the
    user's model and in the extractor, which shares its layers: a frozen batch norm stays
    frozen."""

    @staticmethod
    def frozen_resnet() -> nn.Module:
        model = torchvision.models.resnet18().train()
        model.bn1.eval()
        model.layer2[0].bn1.eval()
        return model

    @pytest.mark.parametrize(
        ("node", "se_reduction"), [(None, None), ("layer4", None), ("layer4.1.add", None), ("layer4", 8)]
    )
    def test_frozen_batch_norm_stays_frozen(self, node, se_reduction):
        model = self.frozen_resnet()
        modes = {name: m.training for name, m in model.named_modules()}
        fx = build_backbone(model, node=node, se_reduction=se_reduction)
        after = {name: m.training for name, m in model.named_modules()}
        assert {name: after[name] for name in modes} == modes
        assert not fx.body.bn1.training and not fx.body.get_submodule("layer2.0.bn1").training
        assert fx.body.training and fx.body.get_submodule("layer2.0.bn2").training
        for name, m in fx.body.named_modules():
            if name in modes:
                assert m.training == modes[name], name
        stats = fx.body.bn1.running_mean.clone()
        fx(torch.randn(2, 3, 64, 64))
        assert torch.equal(fx.body.bn1.running_mean, stats)

    def test_model_in_eval_mode_with_a_layer_in_training(self):
        model = torchvision.models.resnet18().eval()
        model.layer4.train()
        fx = build_backbone(model)
        assert not model.training and model.layer4.training and not model.layer3.training
        assert not fx.body.training and fx.body.graph is fx.body.eval_graph
        assert fx.body.layer4.training and fx.body.get_submodule("layer4.0.bn1").training
        assert not fx.body.get_submodule("layer3.0.bn1").training

    def test_wrong_node_leaves_the_modes_alone(self):
        model = self.frozen_resnet()
        with pytest.raises(ValueError, match="node 'layer_4' is not in ResNet"):
            build_backbone(model, node="layer_4")
        assert not model.bn1.training and model.training and model.layer1[0].bn1.training

    def test_train_afterwards_trains_everything(self):
        """Only the build keeps the modes; train() then sets every one, as torch does."""
        fx = build_backbone(self.frozen_resnet())
        fx.train()
        assert all(m.training for m in fx.modules()) and fx.body.graph is fx.body.train_graph


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
    with pytest.raises(RuntimeError, match=r"could not obtain pretrained ImageNet weights .*weights=None") as info:
        build_backbone("resnet18", weights="imagenet")
    assert "HF_HUB_OFFLINE" not in str(info.value)  # torchvision: no Hugging Face Hub


def test_offline_timm_weights_name_hf_hub_offline(monkeypatch):
    """Offline, the Hugging Face Hub retries for about 45 s before timm fails: the error says
    how to fail at once."""
    timm = pytest.importorskip("timm")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(RuntimeError, match=r"could not obtain pretrained .*HF_HUB_OFFLINE=1"):
        build_backbone("timm:resnet18", weights="imagenet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set already: not advised again
    with pytest.raises(RuntimeError, match=r"could not obtain pretrained ") as info:
        build_backbone("timm:resnet18", weights="imagenet")
    assert "HF_HUB_OFFLINE" not in str(info.value)


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
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(ValueError, match="returned \\(1, 10\\); pass node= to cut a classification model "
                       "at its last feature map, or make a module of your own return the map"):
        build_backbone(classifier)  # a classifier, not a feature map (torchvision models get their node)
    with pytest.raises(ValueError, match="weights= applies to named backbones"):
        build_backbone(nn.Conv2d(3, 4, 3), weights="imagenet")


@pytest.mark.parametrize(("options", "returned", "ends"), [
    ({}, "(1, 1000)", r"its classifier \(num_classes=1000\)"),
    ({"num_classes": 0}, "(1, 512)", "its global pooling"),
])
def test_timm_model_without_maps_says_how_to_get_them(options, returned, ends):
    # before: the generic "pass node= to cut a classification model", the timm advice
    # (num_classes=0, global_pool='') built for the message and dropped
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, **options)
    with pytest.raises(ValueError, match=re.escape(f"returned {returned}; it is a timm model whose forward ends in ")
                       + ends + ": create it with num_classes=0, global_pool='' "):
        build_backbone(model)
    fixed = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="")
    assert build_backbone(fixed).out_channels == 512


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


class TestTimmWeightsTag:
    """weights="<tag>" for a timm model loads the weights of "<name>.<tag>" (was: timm's default)."""

    @pytest.fixture
    def fetched(self, monkeypatch):
        import timm.models._builder as builder

        seen = []

        def record(model, pretrained_cfg=None, *args, **kwargs):  # stands in for the download
            seen.append(pretrained_cfg)

        monkeypatch.setattr(builder, "load_pretrained", record)
        return seen

    def test_tag_selects_its_weights(self, fetched):
        fx = build_backbone("timm:resnet18", weights="tv_in1k")
        assert [cfg["hf_hub_id"] for cfg in fetched] == ["timm/resnet18.tv_in1k"]
        assert fx.body.pretrained_cfg["tag"] == "tv_in1k" and fx.out_channels == 512
        build_backbone("timm:resnet18.tv_in1k", weights="imagenet")  # the tag in the name, as before
        build_backbone("resnet18.tv_in1k", weights="tv_in1k")  # the same tag twice
        assert [cfg["hf_hub_id"] for cfg in fetched[1:]] == ["timm/resnet18.tv_in1k"] * 2

    def test_unknown_tag_lists_the_tags(self, fetched):
        tags = r"unknown weights 'no_such_tag' for timm 'resnet18'.*'a1_in1k'.*'tv_in1k'"
        with pytest.raises(ValueError, match=tags):
            build_backbone("timm:resnet18", weights="no_such_tag")
        with pytest.raises(ValueError, match="unknown weights 'IMAGENET1K_V1' for timm 'resnet18'"):
            build_backbone("timm:resnet18", weights="IMAGENET1K_V1")
        with pytest.raises(ValueError, match="already names the pretrained tag 'a1_in1k', but weights='tv_in1k'"):
            build_backbone("resnet18.a1_in1k", weights="tv_in1k")
        assert fetched == []

    @pytest.mark.parametrize("name", ["resnet18", "timm:resnet18"])
    def test_file_name_without_separator(self, name, tmp_path, monkeypatch):
        """A string with a weights file's suffix is a file, even without "/": it must exist."""
        monkeypatch.chdir(tmp_path)
        for missing in ("nonexist.pth", "typo.safetensors", "model.ckpt"):
            with pytest.raises(FileNotFoundError, match=f"weights file '{missing}' does not exist"):
                build_backbone(name, weights=missing)
        (tmp_path / "weights").mkdir()  # was "weights file ... does not exist"
        for folder in (tmp_path / "weights", "weights/"):
            with pytest.raises(IsADirectoryError, match=r"weights must be a file, but '.*weights/?' is a folder"):
                build_backbone(name, weights=folder)


def test_safetensors_weights_file(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.safetensors"
    safetensors.save_file(reference.state_dict(), str(path))
    fx = build_backbone("resnet18", weights=str(path))
    torch.testing.assert_close(fx.body.get_submodule("layer4.1.bn2").running_var, reference.layer4[1].bn2.running_var)


@pytest.mark.parametrize(("name", "node"), [("googlenet", "conv1"), ("inception_v3", "Conv2d_1a_3x3")])
def test_local_inception_weights_preprocess_as_imagenet(name, node, tmp_path, monkeypatch):
    """torchvision's builders set transform_input=True with pretrained weights; a local copy
    of the same weights, and a model built without weights that loads them, must give the
    same feature maps as weights="imagenet" (compared at the first convolution: random
    weights leave deep maps of Inception-v3 near zero)."""
    from torchvision.models import get_model_weights

    reference = torchvision.models.get_model(name, weights=None, aux_logits=True, init_weights=False)
    url = get_model_weights(name).DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / url.rsplit("/", 1)[-1])  # the "downloaded" file
    local = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), local)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    imagenet = build_backbone(name, weights="imagenet", node=node).eval()
    from_file = build_backbone(name, weights=local, node=node).eval()
    # A model rebuilt without weights to load a checkpoint into (as breakhis's evaluate
    # and resume do) preprocesses as the pretrained one too.
    rebuilt = build_backbone(name, weights=None, node=node).eval()
    rebuilt.load_state_dict(imagenet.state_dict())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected = imagenet(x)
        assert expected.abs().amax() > 0.1
        torch.testing.assert_close(from_file(x), expected)
        torch.testing.assert_close(rebuilt(x), expected)


def test_whole_pickled_model_is_refused_clearly(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(torchvision.models.resnet18(), path)  # a whole model, not its state_dict
    with pytest.raises(ValueError, match=r"not a state_dict file.*save model.state_dict\(\) instead"):
        build_backbone("resnet18", weights=path)
    # also in the old format, which torch.load refuses as it reads it; both name the model's class
    legacy = tmp_path / "whole_legacy.pth"
    torch.save(torchvision.models.resnet18(), legacy, _use_new_zipfile_serialization=False)
    for file in (path, legacy):
        with pytest.raises(ValueError, match=r"holds pickled objects \(.*torchvision\.models\.resnet\.ResNet"):
            build_backbone("resnet18", weights=file)


def _saved(state: object, **kwargs: object) -> bytes:
    """What torch.save writes for ``state``."""
    buffer = io.BytesIO()
    torch.save(state, buffer, **kwargs)
    return buffer.getvalue()


def _damaged_archive() -> bytes:
    """What torch.save writes for a state_dict, with the start of its pickle (data.pkl) zeroed."""
    import struct
    import zipfile

    data = bytearray(_saved({"w": torch.arange(1000.0)}))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    # after its local header, whose name and extra field (torch's padding) have the lengths at 26 and 28
    name, extra = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name + extra
    data[start : start + 16] = bytes(16)
    return bytes(data)


def _random_bytes() -> bytes:
    import random

    return b"." + random.Random(0).randbytes(99)  # "." (pickle's STOP) first: IndexError before


def _half_a_resnet18() -> bytes:
    whole = _saved(torchvision.models.resnet18().state_dict())
    return whole[: len(whole) // 2]


def _foreign_pickle() -> bytes:
    import pickle

    return pickle.dumps({"w": [1.0, 2.0]}, protocol=2)


def _torchscript() -> bytes:
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated: users still have files
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), buffer)
    return buffer.getvalue()


def _safetensors_bytes() -> bytes:
    safetensors = pytest.importorskip("safetensors.torch")
    return safetensors.save({"w": torch.zeros(3)})


_SAVE = r"expected a state_dict written by torch.save\(model.state_dict\(\), path\)"
_NEITHER = r"it is not a file torch.save wrote: neither a zip archive \(its format\) nor a pickle \(its format "
_AGAIN = "save or download it again"


class TestWeightsFileThatIsNone:
    """A weights file that is no state_dict file (empty, cut short, damaged, text, another
    program's pickle) raised EOFError, IndexError or torch's words ("PytorchStreamReader
    failed reading zip archive ... internal miniz error") naming neither the file nor what
    is wrong, or said a text file "holds pickled objects": now a ValueError naming the file
    and what is wrong. check_backbone_name (breakhis-repro's check before indexing) finds
    what the file's first bytes and zip directory tell; damage within, when it is loaded."""

    @pytest.mark.parametrize(
        ("content", "expected", "checked"),
        [
            pytest.param(lambda: b"", rf"it is empty \(0 bytes\); {_AGAIN}", True, id="empty"),
            pytest.param(_random_bytes, rf"{_NEITHER}before PyTorch 1.6\); {_SAVE}", True, id="random"),
            pytest.param(
                lambda: b"<html>\n<body>Not Found</body>\n</html>\n",
                rf"{_NEITHER}before PyTorch 1.6\), but text beginning '<html> <body>Not Found</body> </html>'; "
                rf"{_SAVE}",
                True,
                id="text",
            ),
            pytest.param(
                _half_a_resnet18,
                rf"it is a zip archive, damaged or cut short \(.+\); {_AGAIN}",
                True,
                id="zip-cut-short",
            ),
            pytest.param(
                _damaged_archive,
                rf"it is a torch.save archive, damaged \(torch.load: .+\); {_AGAIN}",
                False,
                id="archive-damaged",
            ),
            pytest.param(
                lambda: _saved({"w": torch.arange(1000.0)}, _use_new_zipfile_serialization=False)[:-1000],
                rf"it is cut short; {_AGAIN}",
                False,
                id="old-format-cut-short",
            ),
            pytest.param(  # refused only when loaded, after breakhis-repro had indexed the data
                _foreign_pickle,
                rf"it is a pickle that torch.save did not write \(pickle.dump writes such files; torch.load "
                rf"reads none\); {_SAVE} in the program that made it",
                True,
                id="foreign-pickle",
            ),
            *[pytest.param(
                lambda protocol=protocol: pickle.dumps({"w": torch.zeros(3)}, protocol=protocol),
                rf"it is a pickle that torch.save did not write \(pickle.dump writes such files; torch.load "
                rf"reads none\); {_SAVE} in the program that made it",
                True,
                id=f"pickle-dump-protocol-{protocol}",
            ) for protocol in (2, 4, 5)],
            # files torch wrote whole, which were called damaged (helper-159)
            *[pytest.param(
                lambda zipped=zipped: _saved({"w": torch.zeros(3)}, pickle_protocol=4,
                                             _use_new_zipfile_serialization=zipped),
                r"it was saved with pickle protocol 4, which torch.load\(weights_only=True\) cannot read; "
                r"save it again with torch.save's default protocol",
                False,
                id=f"protocol-4-{'zip' if zipped else 'legacy'}",
            ) for zipped in (True, False)],
            pytest.param(
                _torchscript,
                r"it is a TorchScript archive \(torch.jit.save\), not a state_dict: load it with "
                r"torch.jit.load and save its state_dict\(\) with torch.save",
                True,
                id="torchscript",
            ),
            pytest.param(
                _safetensors_bytes,
                r"it is a safetensors file: name it .safetensors \(safetensors.torch.load_file reads it\)",
                True,
                id="safetensors-named-pt",
            ),
        ],
    )
    @pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, before it fails
    def test_torch_file(self, content, expected, checked, tmp_path):
        from bilinearpool import check_backbone_name

        path = tmp_path / "w.pt"
        path.write_bytes(content())
        message = rf"^weights file '{re.escape(str(path))}' is not a state_dict file: {expected}$"
        with pytest.raises(ValueError, match=message):
            build_backbone("resnet18", weights=str(path))
        if checked:
            with pytest.raises(ValueError, match=message):
                check_backbone_name("resnet18", weights=path)
        else:  # damage within the file: found when it is loaded
            check_backbone_name("resnet18", weights=path)

    def test_a_zip_python_finds_strict_but_torch_reads_is_taken(self, tmp_path):
        """A version field of the zip directory off (one byte) made Python's zipfile raise
        NotImplementedError, a traceback, for a file torch loads whole (helper-159)."""
        from bilinearpool import check_backbone_name

        data = bytearray(_saved(torchvision.models.resnet18().state_dict()))
        data[data.find(b"PK\x01\x02") + 6] = 196
        path = tmp_path / "w.pth"
        path.write_bytes(bytes(data))
        check_backbone_name("resnet18", weights=path)
        assert build_backbone("resnet18", weights=str(path)).out_channels == 512

    def test_timm_and_classifiers(self, tmp_path):
        from bilinearpool import FastBCNN, check_backbone_name

        path = tmp_path / "w.pth"
        path.write_bytes(b"")
        message = r"^weights file '.*w\.pth' is not a state_dict file: it is empty \(0 bytes\)"
        with pytest.raises(ValueError, match=message):
            check_backbone_name("timm:resnet18", weights=path)
        with pytest.raises(ValueError, match=message):
            FastBCNN("resnet18", num_classes=2, weights=path)

    def test_safetensors_file(self, tmp_path):
        safetensors = pytest.importorskip("safetensors.torch")
        good = tmp_path / "good.safetensors"
        safetensors.save_file(torchvision.models.resnet18().state_dict(), str(good))
        for content, expected in [
            (b"", r"it is empty \(0 bytes\)"),
            (
                good.read_bytes()[:-1000],
                rf"it is not a safetensors file, or is damaged or cut short \(safetensors: .+\); {_AGAIN}",
            ),
            (
                b"<html>Not Found</html>",
                r"it is not a safetensors file but text, beginning '<html>Not Found</html>'; "
                r"expected a state_dict written by safetensors.torch.save_file",
            ),
            (
                _saved({"w": torch.zeros(2)}),
                r"it is not a safetensors file but one torch.save wrote: name it .pt",
            ),
        ]:
            path = tmp_path / "w.safetensors"
            path.write_bytes(content)
            message = rf"^weights file '.*w\.safetensors' is not a state_dict file: {expected}"
            with pytest.raises(ValueError, match=message):
                build_backbone("resnet18", weights=path)


class TestClassifierOfAnotherSize:
    """The classifier of a weights file is not loaded (the extractor cuts it off): one
    fine-tuned on other classes, or none, is accepted; every other key must still fit."""

    def test_torchvision_fine_tuned(self, tmp_path):
        tuned = torchvision.models.resnet18(num_classes=8)
        path = tmp_path / "r18_8.pth"
        torch.save(tuned.state_dict(), path)
        fx = build_backbone("resnet18", weights=path)
        torch.testing.assert_close(fx.body.get_submodule("layer4.1.bn2").running_var, tuned.layer4[1].bn2.running_var)
        state = tuned.state_dict()
        del state["layer4.1.bn2.running_var"]
        torch.save(state, path)
        with pytest.raises(ValueError, match=r"missing \['layer4.1.bn2.running_var'\]"):
            build_backbone("resnet18", weights=path)

    def test_torchvision_swin_without_head(self, tmp_path):
        reference = torchvision.models.swin_t()
        path = tmp_path / "swin_nohead.pth"
        torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}, path)
        fx = build_backbone("swin_t", weights=path)
        torch.testing.assert_close(fx.body.get_submodule("norm").weight, reference.norm.weight)

    def test_timm_fine_tuned(self, tmp_path):
        import timm

        tuned = timm.create_model("resnet18", num_classes=8)
        path = tmp_path / "timm_r18_8.pth"
        torch.save(tuned.state_dict(), path)
        fx = build_backbone("timm:resnet18", weights=path)
        torch.testing.assert_close(fx.body.get_submodule("layer4.1.bn2").running_var, tuned.layer4[1].bn2.running_var)
        torch.testing.assert_close(fx.body.conv1.weight, tuned.conv1.weight)


def tiny_swin() -> nn.Module:
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2]
    ).eval()


def tiny_timm_swin(**kwargs):
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=32, patch_size=4, window_size=2, embed_dim=8, depths=(1, 1), num_heads=(1, 1), **kwargs,
    ).eval()


class TestChannelsLastModules:
    """Modules with NHWC maps are recognised (they were read as NCHW: channels = H)."""

    def test_torchvision_swin_features_alone(self):
        net = tiny_swin()
        fx = build_backbone(net.features, sample_shape=(3, 32, 32)).eval()
        assert fx.output_fmt == "NHWC" and fx.out_channels == 16 and fx.reduction == 8
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(fx(x), net.features(x).permute(0, 3, 1, 2))

    @pytest.mark.parametrize("node", [None, "layers.1", "norm"])
    def test_timm_swin_module(self, node):
        if node is None:
            net = tiny_timm_swin(features_only=True, out_indices=(-1,))
        else:
            net = tiny_timm_swin()
        fx = build_backbone(net, node=node, sample_shape=(3, 32, 32)).eval()
        assert fx.output_fmt == "NHWC" and fx.out_channels == 16
        assert fx(torch.randn(2, 3, 32, 32)).shape == (2, 16, 4, 4)

    def test_layout_misread_is_an_error(self):
        with pytest.raises(ValueError, match=r"channel count changes with the input size.*pass output_fmt='NHWC'"):
            build_backbone(NHWCNet())
        with pytest.raises(ValueError, match=r"channel count changes.*pass output_fmt='NCHW'"):
            build_backbone(nn.Conv2d(3, 6, 3, stride=4), output_fmt="NHWC")
        with pytest.raises(ValueError, match="channel count changes"):
            build_backbone(tiny_swin(), node="features", output_fmt="NCHW", sample_shape=(3, 32, 32))
        with pytest.raises(ValueError, match=r"changes .* as tokens \(B, N, C\).*tokens must be \(B, N, C\)"):
            build_backbone(nn.Flatten(2))  # (B, C, HW): tokens the wrong way round

    def test_layout_misread_at_a_node_of_a_named_model_is_an_error(self):
        # The default nodes' layouts are known; a node the user names is checked (here
        # resnet18's layer4 read as NHWC, quicker to build than swin_t's features as NCHW).
        with pytest.raises(ValueError, match=r"channel count changes with the input size when its output is read "
                                             r"as NHWC: 4 channels at \(128, 128\), 2 at \(64, 64\).*"
                                             r"pass output_fmt='NCHW'"):  # fmt: skip
            build_backbone("resnet18", node="layer4", output_fmt="NHWC")
        assert build_backbone("resnet18", node="layer4", output_fmt="NCHW").out_channels == 512


class TestLastConv:
    def test_none_for_transformers(self):
        assert build_backbone(tiny_swin(), node="features", sample_shape=(3, 32, 32)).last_conv is None
        vit = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8
        )
        tokens = build_backbone(vit, node="encoder", sample_shape=(3, 32, 32))
        assert tokens.tokens and tokens.reduction is None and tokens.last_conv is None
        for fmt in ("NHWC", "NCHW"):  # the layout of 4-D maps: for tokens it would do nothing
            with pytest.raises(ValueError, match=f"output_fmt='{fmt}' applies to 4-D feature maps, but the "
                                                 r"backbone returns tokens \(B, N, C\); drop output_fmt"):
                build_backbone(vit, node="encoder", sample_shape=(3, 32, 32), output_fmt=fmt)
        assert build_backbone(nn.AvgPool2d(4)).last_conv is None  # no convolution at all

    def test_none_for_a_patch_embedding_alone(self):
        assert build_backbone(nn.Conv2d(3, 8, 4, stride=4)).last_conv is None
        assert build_backbone(nn.Conv2d(3, 8, (4, 2), stride=(4, 2))).last_conv is None
        # a convolution whose kernel overlaps its steps, or one of stride 1, is not a patch embedding
        for conv in (nn.Conv2d(3, 8, 4, stride=2), nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 4, stride=(4, 2))):
            assert build_backbone(conv).last_conv is conv

    def test_last_conv_of_a_cnn(self):
        net = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU())
        fx = build_backbone(net)
        assert fx.last_conv is net[2] and not fx.tokens
        patchify_then_conv = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.Conv2d(4, 4, 2, stride=2))
        assert build_backbone(patchify_then_conv).last_conv is patchify_then_conv[1]


class TestSEWithWrongNode:
    def test_error_names_the_nodes_and_leaves_the_model_alone(self):
        from bilinearpool import SEBlock

        net = torchvision.models.resnet18()
        with pytest.raises(ValueError, match=r"node 'layer_4' is not in ResNet; its last nodes are \[.*'fc'\]"):
            build_backbone(net, node="layer_4", se_reduction=8)
        assert not any(isinstance(m, SEBlock) for m in net.modules())
        fx = build_backbone(net, node="layer4", se_reduction=8)  # the typo fixed: builds
        assert sum(isinstance(m, SEBlock) for m in fx.modules()) == 8

    def test_named_backbone(self):
        with pytest.raises(ValueError, match=r"node 'layer_4' is not in ResNet; its last nodes are \[.*'fc'\]"):
            build_backbone("resnet18", node="layer_4", se_reduction=8)

    def test_function_node(self):
        """Nodes of function calls (no submodule of that name) are found by tracing."""
        fx = build_backbone(torchvision.models.resnet18(), node="layer4.1.add", se_reduction=8)
        assert fx.out_channels == 512


def test_vgg_and_alexnet_cut_before_the_last_max_pool():
    """The B-CNN of Lin et al. (2015) takes VGG-16's relu5_3: 14 x 14 at 224 pixels."""
    vgg = build_backbone("vgg16").eval()
    assert vgg.name == "vgg16:features.29" and vgg.reduction == 16
    with torch.no_grad():
        out = vgg(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 512, 14, 14) and (out >= 0).all()
    alex = build_backbone("alexnet")
    assert alex.name == "alexnet:features.11" and alex.out_channels == 256


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: torchvision.models.resnet18(), "resnet18"),
        (lambda: torchvision.models.vgg11(), "vgg11"),
        (lambda: torchvision.models.inception_v3(init_weights=False, aux_logits=True), "inception_v3"),
        (lambda: torchvision.models.swin_t(), "swin_t"),
    ],
)
def test_torchvision_model_passed_as_module_gets_its_names_default_node(make, name):
    """A torchvision classification model passed as a module is cut where its name is
    (it ran to the logits and was refused: 'returned (1, 1000); pass node=')."""
    torch.manual_seed(0)
    model = make().eval()
    by_module = build_backbone(model).eval()
    by_name = build_backbone(name).eval()
    by_name.load_state_dict(by_module.state_dict())
    assert (by_module.out_channels, by_module.output_fmt) == (by_name.out_channels, by_name.output_fmt)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(by_module(x), by_name(x))


class TestCheckWeightsWithoutBuilding:
    """check_backbone_name(name, weights=...) refuses what build_backbone would refuse in
    the weights, without building or downloading: a missing file or a typo in a weights
    name was found only once the model was built (in breakhis-repro, after indexing)."""

    @pytest.fixture(autouse=True)
    def no_build(self, monkeypatch):
        import timm

        def refuse(*args, **kwargs):
            raise AssertionError("built a model")

        monkeypatch.setattr(torchvision.models, "get_model", refuse)
        monkeypatch.setattr(timm, "create_model", refuse)

    @pytest.mark.parametrize("name, weights", [
        ("resnet50", None), ("resnet50", "imagenet"), ("resnet50", "IMAGENET1K_V2"),
        ("resnet50", "ResNet50_Weights.IMAGENET1K_V1"), ("resnet50", "DEFAULT"),
        ("resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
        ("timm:resnet18", "a1_in1k"), ("resnet18.a1_in1k", "imagenet"), ("inception_resnet_v2", "imagenet"),
    ])
    def test_weights_the_model_has(self, name, weights):
        from bilinearpool import check_backbone_name

        check_backbone_name(name, weights=weights)

    @pytest.mark.parametrize("name, weights, error, match", [
        ("resnet50", "IMAGENET1K_V9", ValueError, r"unknown weights 'IMAGENET1K_V9' for 'resnet50'.*IMAGENET1K_V2"),
        ("resnet50", torchvision.models.ResNet18_Weights.IMAGENET1K_V1, ValueError,
         r"are the weights of torchvision 'resnet18', not of 'resnet50'"),
        ("resnet18", "a1_in1k", ValueError, r"unknown weights 'a1_in1k' for 'resnet18'"),
        ("timm:resnet18", "zz", ValueError, r"unknown weights 'zz' for timm 'resnet18'.*'a1_in1k'"),
        ("timm:resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1, ValueError,
         r"is a torchvision weights enum, but 'resnet18' is a timm model"),
        ("resnet50", "missing.pth", FileNotFoundError, r"weights file 'missing.pth' does not exist"),
        ("timm:resnet18", "missing.safetensors", FileNotFoundError, r"does not exist"),
    ])
    def test_weights_build_backbone_refuses(self, name, weights, error, match, tmp_path, monkeypatch):
        from bilinearpool import check_backbone_name

        monkeypatch.chdir(tmp_path)
        with pytest.raises(error, match=match):
            check_backbone_name(name, weights=weights)
        (tmp_path / "folder.pth").mkdir()
        with pytest.raises(IsADirectoryError, match="is a folder"):
            check_backbone_name(name, weights="folder.pth")


@pytest.mark.parametrize("make", [torchvision.models.resnet18, lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())])
def test_extractor_of_a_model_in_eval_mode_says_it_is_in_eval_mode(make):
    """The wrapper said training=True around a network in eval mode."""
    fx = build_backbone(make().eval())
    assert not fx.training and not fx.body.training
    assert build_backbone(make()).training
    fx.train()
    assert fx.training and all(m.training for m in fx.modules())
