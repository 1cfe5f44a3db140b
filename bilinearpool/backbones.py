"""Turn a name, a torchvision model or any module into a feature extractor.

The library's heads need one thing from a backbone: its last convolutional feature map
``(B, C, H, W)`` and the channel count ``C``. :func:`build_backbone` resolves

- a name: ``"resnet50"``, ``"inception_v3"`` and every other torchvision classification
  model (cut at its last feature map with :mod:`torchvision.models.feature_extraction`),
  ``"inception_resnet_v2"`` and every other `timm <https://github.com/huggingface/pytorch-image-models>`_
  model when timm is installed (``timm.create_model(..., features_only=True)``), or
  ``"timm:<name>"`` to ask for timm explicitly;
- a torchvision (or any fx-traceable) model together with ``node=``, the node whose
  output is the feature map;
- any ``nn.Module`` whose forward returns a feature map (or a list/tuple/dict of them:
  the last is used).

Channel counts are read from the network (timm's ``feature_info``, or a forward pass
on a small zero image), never typed by hand. Nothing is downloaded unless pretrained
weights are asked for.

Default cuts follow the papers: ResNet's ``layer4``, Inception-v3's ``Mixed_7c``, and for
VGG and AlexNet the last ReLU before the final max-pool (VGG-16's ``relu5_3``, a 14 x 14
map at 224 pixels, as in the B-CNN of Lin et al. 2015).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import enum
import importlib.util
import itertools
import io
import os
import pickle
import pickletools
import re
import sys
import threading
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .attention import SEBlock, insert_se_blocks
from .functional._checks import (
    AUTOCAST_CASTS,
    as_int,
    autocast_on,
    check_choice,
    check_optional_positive_int,
    check_positive_int,
    does_nothing,
    plural,
)

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

__all__ = ["FeatureExtractor", "build_backbone", "check_backbone_name", "list_backbones"]

#: ``weights=``: None, a name or tag, a path, or a torchvision weights enum member.
WeightsArg = Union[str, os.PathLike, "WeightsEnum", None]


def _before_last_pool(model: nn.Module) -> str:
    """VGG and AlexNet: the last ReLU of ``features``, before its final max-pool."""
    return f"features.{len(model.features) - 2}"  # type: ignore[arg-type]


# Node of the last feature map, per torchvision family (longest prefix wins); a function
# of the model where the node's name depends on the depth.
_TORCHVISION_NODES: dict[str, str | Callable[[nn.Module], str]] = {
    "resnet": "layer4",
    "resnext": "layer4",
    "wide_resnet": "layer4",
    "inception_v3": "Mixed_7c",
    "googlenet": "inception5b",
    "vgg": _before_last_pool,  # relu5_3 of VGG-16 (Lin et al. 2015), 14 x 14 at 224
    "alexnet": _before_last_pool,
    "densenet": "relu",  # after features.norm5: the ReLU of its forward
    "mobilenet": "features",
    "efficientnet": "features",
    "convnext": "features",
    "squeezenet": "features",
    "mnasnet": "layers",
    "regnet": "trunk_output",
    "shufflenet": "conv5",
    "swin": "norm",  # (B, H, W, C): read as NHWC
    "maxvit": "blocks.3",  # the last stage (the model takes 224 x 224 only)
}
#: Backbones of Liu, Juhas & Zhang (2020): name -> library that provides them.
PAPER_BACKBONES = {"resnet50": "torchvision", "inception_v3": "torchvision", "inception_resnet_v2": "timm"}
_IMAGENET = ("imagenet", "default", "pretrained")
_FORMATS = ("NCHW", "NHWC")
#: Suffixes that make a string in ``weights=`` a file name rather than a weights name or tag.
_WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
#: Classifier modules of torchvision's classification models (the extractors cut before them).
_TORCHVISION_HEADS = ("fc.", "classifier.", "head.", "heads.", "AuxLogits.", "aux1.", "aux2.")


class FeatureExtractor(nn.Module):
    """A backbone that returns its last feature map, with its channel count.

    Built by :func:`build_backbone`; wraps a network whose output may be a tensor or a
    list/tuple/dict of tensors (the last one is used).

    Args:
        body: the network.
        out_channels: channels :math:`C` of the returned feature map.
        reduction: total stride of the feature map (input size / feature size), if known.
        name: where the backbone came from, for ``repr``.
        output_fmt: layout of the network's 4-D output: ``"NCHW"``, or ``"NHWC"`` (Swin
            transformers), which is permuted to :math:`(B, C, H, W)`.
        tokens: whether the network gives tokens :math:`(B, N, C)` rather than a map
            (set by :func:`build_backbone` from its probe).
        in_channels: channels :math:`C_{in}` of the images the network takes, where that is
            known (:func:`build_backbone` sets it for names, torchvision and timm models, and
            modules given with ``sample_shape``), else ``None``. When set, ``forward``
            refuses anything but a floating-point tensor :math:`(B, C_{in}, H, W)` of the
            network's parameters' dtype (under ``torch.autocast`` also another of float16,
            bfloat16 and float32 for a network in one of them: autocast leaves float64
            alone) with a TypeError or ValueError that says what was expected and what
            arrived; set it to ``None`` for a network that takes other inputs. When
            ``None``, an input whose dtype the network's parameters cannot take (integers,
            another floating dtype) is reported as a TypeError only once the network
            fails on it.
        image_size: ``(H, W)``, the one image size the network takes, where it says so
            (torchvision's ViTs, timm's ViT-like models with a fixed size; set by
            :func:`build_backbone`), else ``None``. When set, ``forward`` refuses images of
            another size with a ValueError that says to resize them (the network's own
            error, raised inside the traced graph, named no size).

    Where the input is known (``in_channels`` set), images too small for the network (a
    kernel larger than a map) are a ValueError naming the smallest size that runs,
    found on the meta device once the network has failed (e.g. InceptionV3 takes at
    least 75 x 75); other failures are the network's own errors.

    Shape:
        - Input: :math:`(B, C_{in}, H_{in}, W_{in})`.
        - Output: :math:`(B, C, H, W)` (or tokens :math:`(B, N, C)` if the network gives tokens).

    Examples:
        >>> body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=4), nn.ReLU())
        >>> fx = build_backbone(body)
        >>> fx.out_channels, fx(torch.randn(2, 3, 64, 64)).shape
        (16, torch.Size([2, 16, 16, 16]))
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        out_channels: int,
        reduction: int | None = None,
        name: str = "",
        output_fmt: str = "NCHW",
        tokens: bool = False,
        in_channels: int | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        check_choice("output_fmt", output_fmt, _FORMATS)
        if in_channels is not None:
            in_channels = check_positive_int("in_channels", in_channels)
        self.body = body
        self.training = body.training  # a model given in eval mode: the wrapper says so too
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.reduction = check_optional_positive_int("reduction", reduction)
        self.name = name
        self.output_fmt = output_fmt
        self.tokens = bool(tokens)
        self.in_channels = None if in_channels is None else int(in_channels)
        if image_size is not None:
            if not isinstance(image_size, (tuple, list)):
                raise TypeError(f"image_size must be (H, W) or None, but got {image_size!r}")
            if len(image_size) != 2:
                raise ValueError(f"image_size must be (H, W) or None, but got {image_size!r}")
            image_size = (check_positive_int("image_size[0]", image_size[0]),
                          check_positive_int("image_size[1]", image_size[1]))
        self.image_size = image_size

    @property
    def feature_info(self) -> dict[str, Any]:
        """timm-style description of the output: channels and reduction."""
        return {"num_chs": self.out_channels, "reduction": self.reduction, "module": "body"}

    @property
    def last_conv(self) -> nn.Conv2d | None:
        """The last ``nn.Conv2d`` of a convolutional backbone (a Grad-CAM target).

        ``None`` where no convolution gives the feature map: a backbone without
        ``nn.Conv2d``, or a transformer (tokens, NHWC maps such as Swin's, or a patch
        embedding as its only convolution, as in ViT), whose last ``nn.Conv2d`` is the
        patch embedding. The extractor itself (a classifier's ``gradcam_layers``) is a
        target for every backbone.
        """
        convs = [m for m in self.body.modules() if isinstance(m, nn.Conv2d)]
        if not convs or self.tokens or self.output_fmt == "NHWC":
            return None
        if len(convs) == 1 and convs[0].kernel_size == convs[0].stride != (1, 1):  # a patch embedding
            return None
        return convs[-1]

    def forward(self, x: Tensor) -> Tensor:
        if self.in_channels is not None:  # the input is known: checked before the network runs
            error = _image_error(x, self.in_channels, _first_float_param(self.body), self.name)
            if error is not None:
                raise error
            if self.image_size is not None and not torch.jit.is_tracing() and tuple(x.shape[-2:]) != self.image_size:
                h, w = self.image_size
                raise ValueError(
                    f"backbone {self.name!r} takes {h} x {w} images only, but got shape {tuple(x.shape)}; "
                    f"resize them first (e.g. torchvision.transforms.v2.Resize(({h}, {w})))"
                )
            try:
                out = self.body(x)
            except RuntimeError as err:  # images too small for the network? said so, with the size
                tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
                side = None if tracing else _smallest_side(self.body, x)
                if side is None:
                    raise
                raise ValueError(
                    f"backbone {self.name!r} takes images of at least {side} x {side} pixels, but got "
                    f"shape {tuple(x.shape)} ({type(err).__name__}: {_first_line(err)}); resize them "
                    f"first (e.g. torchvision.transforms.v2.Resize({side}))"
                ) from err
        else:  # any module, which may take other inputs: an input's dtype is blamed only on failure
            try:
                out = self.body(x)
            except RuntimeError as err:
                param = _first_float_param(self.body)
                fix = _dtype_fix(x, param)
                if fix is None or param is None:
                    raise
                want = param.dtype
                raise TypeError(
                    f"backbone {self.name!r} failed on input of dtype {x.dtype}, its parameters being "
                    f"{want} ({type(err).__name__}: {_first_line(err)}); {fix}"
                ) from err
        out = _last_map(out)
        if out.dim() == 3 and not self.tokens and isinstance(x, Tensor) and x.dim() == 3:
            # torch's layers take one image without its batch dimension, and give one map
            # (C, H, W): read as tokens (B, N, C), it made a batch of C samples
            raise ValueError(
                f"backbone {self.name!r} expected a batch of images (B, C, H, W), but got shape "
                f"{tuple(x.shape)} and gave a map without a batch dimension, {tuple(out.shape)}; "
                "add the batch dimension to a single image (x.unsqueeze(0))"
            )
        return _to_nchw(out, self.output_fmt)

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("output_fmt", "NCHW")  # extractors pickled before the options existed
        state.setdefault("tokens", False)
        state.setdefault("in_channels", None)
        state.setdefault("image_size", None)
        super().__setstate__(state)

    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureExtractor:
        # torchvision's feature extractors (fx DualGraphModule) rebuild themselves on
        # deepcopy through __init__, which calls train(): the copy (BCNN's second stream,
        # to_triu, an EMA copy) would come back in training mode. Copy as nn.Module
        # does, then give every submodule its original mode back.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        _set_training_modes(new, _training_modes(self))
        return new

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, "
            + (f"in_channels={self.in_channels}, " if self.in_channels is not None else "")
            + f"out_channels={self.out_channels}, reduction={self.reduction}, "
            f"output_fmt={self.output_fmt!r}" + (", tokens=True" if self.tokens else "")
            + (f", image_size={self.image_size}" if self.image_size is not None else "")
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _first_float_param(module: nn.Module, _seen: set[int] | None = None) -> Tensor | None:
    """The first floating-point parameter of ``module`` (its first layer's, typically), if any.

    The one ``module.parameters()`` gives first, looked up afresh on each call (the
    extractor checks every input against it: the model may have been moved, converted or
    given new parameters since), but by reading the modules' own parameters depth first,
    in ``parameters()``'s order, stopping at the first: about 1.5 us for a resnet18
    extractor on the 2-core CPU, where the generators of ``parameters()`` took 4 us.
    """
    seen = set() if _seen is None else _seen
    seen.add(id(module))  # a module registered twice (or inside itself) is read once
    for p in module._parameters.values():
        if p is not None and p.is_floating_point():
            return p
    for sub in module._modules.values():
        if sub is not None and id(sub) not in seen:
            found = _first_float_param(sub, seen)
            if found is not None:
                return found
    return None


#: ImageNet's normalisation, which torchvision's and most timm weights expect.
_IMAGENET_NORM = "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"


def _cast(dtype: torch.dtype) -> str:
    """How to cast ``x`` to ``dtype``, for error messages: ``x.float()``, ``x.half()``, ..."""
    short = {
        torch.float32: "float", torch.float16: "half", torch.float64: "double", torch.bfloat16: "bfloat16"
    }
    return f"x.{short[dtype]}()" if dtype in short else f"x.to({dtype})"


def _dtype_fix(x: object, param: Tensor | None) -> str | None:
    """How to fix the dtype of input ``x`` for a network whose first floating parameter
    is ``param``; ``None`` if nothing is wrong with it (or that cannot be told).

    Integers (``uint8`` images above all), booleans and complex numbers are wrong; a
    floating dtype other than the parameters' is wrong outside ``torch.autocast`` (which
    casts the inputs of its operations itself), and under it too where either is float64
    (which autocast leaves alone). A network without floating parameters (``param`` is
    ``None``) takes any floating dtype.
    """
    if not isinstance(x, Tensor) or (x.is_floating_point() if param is None else x.dtype == param.dtype):
        return None
    want = torch.float32 if param is None else param.dtype
    if x.dtype == torch.uint8:
        scaled = "x.float() / 255" if want == torch.float32 else f"(x.float() / 255).to({want})"
        return (
            f"convert 8-bit images with {scaled} and normalise them as the weights expect (ImageNet: "
            f"{_IMAGENET_NORM}), e.g. with torchvision.transforms.v2.ToDtype({want}, scale=True) "
            "and Normalize"
        )
    if not x.is_floating_point():
        return f"convert the images with {_cast(want)}"
    castable = x.dtype in AUTOCAST_CASTS and want in AUTOCAST_CASTS
    if castable and autocast_on(x.device.type):
        return None
    return (
        f"convert the images with {_cast(want)}, or the model with model.to({x.dtype})"
        + (", or run it under torch.autocast" if castable else "")
    )


def _layout_fix(x: Tensor, channels: int) -> str | None:
    """How to fix the shape of images ``x`` for a network that takes :math:`(B, C, H, W)`
    with ``channels`` channels; ``None`` if nothing is wrong with it."""
    # (jit.trace records sizes as tensors: comparing one would warn that the trace may be wrong)
    if x.dim() == 4 and (torch.jit.is_tracing() or (x.shape[1] == channels and min(x.shape[-2:]) > 0)):
        return None
    shape = tuple(x.shape)
    if x.dim() == 4 and shape[1] == channels:  # no pixels: torch's error named a padded size instead
        return "images need at least one pixel a side (H >= 1 and W >= 1)"
    if x.dim() == 3 and shape[0] == channels:
        return "a single image needs a batch dimension: x.unsqueeze(0)"
    if x.dim() == 3 and shape[-1] == channels:
        return "a single channels-last image (H, W, C) needs x.permute(2, 0, 1).unsqueeze(0)"
    if x.dim() == 4 and shape[-1] == channels:
        return (
            "channels-last data (B, H, W, C) needs x.permute(0, 3, 1, 2) (the channels_last memory "
            "format keeps the shape (B, C, H, W))"
        )
    if x.dim() == 4:
        gray = ": gray images can be repeated, x.expand(-1, 3, -1, -1)"
        gray = gray if (channels, shape[1]) == (3, 1) else ""
        return f"the images have {shape[1]} {plural(shape[1], 'channel')}, the backbone takes {channels}{gray}"
    return f"images must be 4-D (B, {channels}, H, W)"


def _expected_images(channels: int, param: Tensor | None, name: str) -> str:
    """``"backbone 'resnet18' takes images (B, 3, H, W) of dtype torch.float32"``."""
    want = f" of dtype {param.dtype}" if param is not None else " of a floating-point dtype"
    return f"backbone {name!r} takes images (B, {channels}, H, W){want}"


def _image_error(x: object, channels: int, param: Tensor | None, name: str) -> Exception | None:
    """TypeError (a wrong dtype or no tensor) or ValueError (a wrong shape) for input ``x``
    of a backbone that takes images :math:`(B, C, H, W)` with ``channels`` channels, of
    the dtype of ``param`` (its first floating parameter); ``None`` for a fitting input.
    Only the input's type, dtype and shape are read."""
    # (run on every forward: the messages are built only for an input that is wrong)
    if not isinstance(x, Tensor):
        return TypeError(
            f"{_expected_images(channels, param, name)}, but got {type(x).__name__}; convert the "
            "images to a tensor first (e.g. torchvision.transforms.v2.functional.to_image, or "
            "torch.from_numpy(array).permute(2, 0, 1))"
        )
    dtype, layout = _dtype_fix(x, param), _layout_fix(x, channels)
    if dtype is None and layout is None:
        return None
    got = " and ".join(
        part for part, wrong in ((f"dtype {x.dtype}", dtype), (f"shape {tuple(x.shape)}", layout)) if wrong
    )
    fixes = "; ".join(fix for fix in (dtype, layout) if fix is not None)
    message = f"{_expected_images(channels, param, name)}, but got {got}: {fixes}"
    return TypeError(message) if dtype is not None else ValueError(message)


def _training_modes(module: nn.Module) -> dict[str, bool]:
    return {name: sub.training for name, sub in module.named_modules()}


def _set_training_modes(module: nn.Module, modes: Mapping[str, bool]) -> None:
    """Give the submodules of ``module`` the training modes ``modes`` (by qualified name).

    Top-down and through ``train()``, so that modules which switch behaviour in
    ``train()`` (torchvision's feature extractors swap their train and eval graphs) do so.
    """
    for name, sub in module.named_modules():
        mode = modes.get(name)
        if mode is not None and sub.training != mode:
            sub.train(mode)


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[dict[str, bool]]:
    """Give every submodule of ``model`` its training mode back after the block, which
    gets the modes: torchvision's tracing (``create_feature_extractor``,
    ``get_graph_node_names``) ends in ``model.train(model.training)``, which would put a
    batch norm the user froze with ``eval()`` back in training mode."""
    modes = _training_modes(model)
    try:
        yield modes
    finally:
        _set_training_modes(model, modes)


@contextlib.contextmanager
def _in_eval_mode(module: nn.Module) -> Iterator[None]:
    """Run the block with ``module`` in eval mode (a probe, a dry run), then give every
    submodule its own mode back (e.g. a batch norm the user froze)."""
    with _modes_kept(module):
        module.eval()
        yield


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in eval mode whose parameters and buffers are on the meta device
    (no weight is copied): probes run on it, never on the module itself, which other
    threads may be running meanwhile (an eval-mode switch or weights swapped for meta
    tensors there gave their passes wrong results without an error)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    for sub in module.modules():  # tensors held otherwise are shared, not copied
        for value in vars(sub).values():
            if isinstance(value, Tensor) and id(value) not in memo:
                memo[id(value)] = value
    return copy.deepcopy(module, memo).eval()


#: Held while a probe ignores warnings: ``warnings.catch_warnings`` saves and restores the
#: process's filters, so two probes of two threads interleaving left "ignore" in place.
#: Reentrant: a backbone that holds a FeatureExtractor probes it within its own probe.
_PROBE_WARNINGS = threading.RLock()


@contextlib.contextmanager
def _quiet_probe() -> Iterator[None]:
    """A probe's block: without gradients and without the module's warnings and what it
    writes to stderr (they come with its real passes; torch.fx prints the traceback of a
    traced module's failure there even where the failure is caught), under
    :data:`_PROBE_WARNINGS` (both are the whole process's: what other threads warn or
    write to stderr meanwhile is dropped too, for the few milliseconds of a meta pass)."""
    with torch.no_grad(), _PROBE_WARNINGS, warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _stderr_unless_raising(body: nn.Module) -> Iterator[None]:
    """What the block writes to stderr, written there after it unless it raises: torch.fx
    prints the traceback of a traced module's failure even where the failure is caught
    and said otherwise (a failing pass of ours ends in our own error).

    ``sys.stderr`` is one stream for the whole process: it is swapped under
    :data:`_PROBE_WARNINGS`, as :func:`_quiet_probe` swaps it, so that the swaps of two
    threads nest (each puts back the stream it replaced; unordered, the real stream could
    be lost for good), and what other threads write meanwhile is held with it. So it is
    swapped only for a ``body`` holding a traced module (``torch.fx.GraphModule``: what
    torchvision's feature extraction makes), the one kind that prints so, and not at all
    without a stderr (``None``: pythonw, some services).
    """
    traced = any(isinstance(m, torch.fx.GraphModule) for m in body.modules())
    if sys.stderr is None or not traced:
        yield
        return
    held = io.StringIO()
    with _PROBE_WARNINGS, contextlib.redirect_stderr(held):
        yield
    if held.getvalue() and sys.stderr is not None:
        sys.stderr.write(held.getvalue())


def _prober(module: nn.Module) -> Callable[[Tensor], Any]:
    """A function that runs ``module``'s shapes on a meta tensor: on a :func:`_meta_copy`
    (the module itself untouched), or, for a module that cannot be copied (``weight_norm``,
    a lock among its attributes), on the module itself with meta tensors swapped in and
    in eval mode meanwhile, under the probe lock (other threads running it then see that)."""
    try:
        probe = _meta_copy(module)
    except Exception:  # noqa: BLE001 - whatever deepcopy raises: probe in place
        def in_place(x: Tensor) -> Any:
            state = {
                name: torch.empty_like(t, device="meta")
                for name, t in itertools.chain(module.named_parameters(), module.named_buffers())
            }
            with _quiet_probe(), _in_eval_mode(module):
                return torch.func.functional_call(module, state, (x,))

        return in_place

    def on_copy(x: Tensor) -> Any:
        with _quiet_probe():
            return probe(x)

    return on_copy


def _meta_pass(module: nn.Module, x: Tensor) -> Any:
    """``module`` run on ``x`` (a meta tensor) with its parameters and buffers on the meta
    device: shapes only (no computation, no memory, the weights untouched), in eval mode,
    without gradients and without the module's warnings (:func:`_prober`). Raises
    whatever the module raises there."""
    return _prober(module)(x)


#: The largest image side :func:`_smallest_side` tries.
_LARGEST_PROBE = 4096


def _smallest_side(body: nn.Module, x: Tensor) -> int | None:
    """The smallest side :math:`s` such that ``body`` runs on images of ``x``'s channels and
    dtype whose sides are brought up to :math:`s` (``(max(H, s), max(W, s))``), where
    ``body`` fails on ``x`` for its size alone; else ``None``.

    Found on the meta device (:func:`_meta_pass`; about 0.1 s a pass for InceptionV3 on
    the 2-core CPU, a dozen passes in all): ``None`` when ``body`` runs on ``x``'s size
    there (it failed for another reason), does not run there at all, or runs at no size
    up to :data:`_LARGEST_PROBE`. A floor, not a size the network must be a multiple of
    or avoid: ``None`` unless the three sizes above :math:`s` run too and half ``x``'s
    smaller side fails as well.
    """
    batch, channels, h, w = (1, *x.shape[1:])
    probe = _prober(body)  # one copy for the dozen passes

    def runs_at(size: tuple[int, int]) -> bool:
        try:
            probe(torch.zeros(batch, channels, *size, device="meta", dtype=x.dtype))
        except Exception:  # noqa: BLE001 - any failure of a probe is a "no"
            return False
        return True

    def runs(side: int) -> bool:
        return runs_at((max(h, side), max(w, side)))

    lo = min(h, w)  # fails: the size of x
    if runs(lo) or runs_at((max(1, h // 2), max(1, w // 2))):  # another reason; or no floor
        return None
    hi = max(2 * lo, 8)
    while not runs(hi):
        lo, hi = hi, 2 * hi
        if hi > _LARGEST_PROBE:
            return None
    while hi - lo > 1:  # lo fails, hi runs
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs(mid) else (mid, hi)
    return hi if all(runs(hi + k) for k in (1, 2, 3)) else None


def _last_map(out: object, hint: str | None = None) -> Tensor:
    """The last feature map of a backbone's output (a map, a list or dict of maps);
    ``hint``: what to do when it is not a map (default: cut at a feature map)."""
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        if not out:
            raise ValueError("the backbone returned an empty list of feature maps")
        out = out[-1]
    if not isinstance(out, Tensor) or out.dim() not in (3, 4):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            "a backbone must return a feature map (B, C, H, W) or tokens (B, N, C), "
            f"but returned {shape}; "
            + (hint or "pass node= to cut a classification model at its last feature map, or "
                       "make a module of your own return the map, not pooled features")
        )
    return out


def _to_nchw(out: Tensor, output_fmt: str) -> Tensor:
    return out.permute(0, 3, 1, 2) if output_fmt == "NHWC" and out.dim() == 4 else out


def _probe(
    body: nn.Module,
    sample_shape: tuple[int, ...],
    output_fmt: str = "NCHW",
    *,
    check_layout: bool = True,
    needs: Sequence[str] = (),
    flat_hint: str | None = None,
) -> tuple[int, int | None]:
    """Channels and stride of ``body``'s output (stride ``None`` for tokens), from a
    forward pass on zeros of ``sample_shape``.

    ``needs``: what to pass when that pass fails, where known (e.g. the one size a ViT
    takes, and the node= it needs too); default: a ``sample_shape`` it accepts.
    ``flat_hint``: what to do when the output is not a map (e.g. a timm model's logits).

    With ``check_layout`` (for layouts not known for sure), a second pass at half the
    size checks that the channel count does not change with the input size, as it does
    when an NHWC map is read as NCHW or vice versa (skipped if that size does not run).
    """
    param = next(iter(body.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    sample = torch.zeros(1, *sample_shape, device=device, dtype=dtype)
    half = (sample_shape[0], max(1, sample_shape[1] // 2), max(1, sample_shape[2] // 2))
    with _in_eval_mode(body):  # each submodule's own mode afterwards, e.g. a frozen batch norm
        with torch.no_grad():
            try:
                with _stderr_unless_raising(body):
                    raw = body(sample)
            except (RuntimeError, ValueError, AssertionError) as err:
                fix = " and ".join(needs) or "sample_shape=(C, H, W) with the channels and a size it accepts"
                raise ValueError(
                    f"could not run the backbone on a zero image of shape {tuple(sample.shape)} to read its "
                    f"channel count ({type(err).__name__}: {_first_line(err)}); pass {fix}"
                ) from err
            out = _to_nchw(_last_map(raw, flat_hint), output_fmt)
            small = None
            if check_layout and half != tuple(sample_shape):
                try:
                    with _stderr_unless_raising(body):
                        small = _to_nchw(_last_map(body(sample.new_zeros(1, *half))), output_fmt)
                except Exception:  # noqa: BLE001 - a backbone that takes one input size only: no check
                    small = None
    channel_dim = 2 if out.dim() == 3 else 1
    if small is not None and small.dim() == out.dim() and small.shape[channel_dim] != out.shape[channel_dim]:
        other = "NCHW" if output_fmt == "NHWC" else "NHWC"
        layout = "tokens (B, N, C)" if out.dim() == 3 else output_fmt
        hint = (
            "tokens must be (B, N, C)"
            if out.dim() == 3
            else f"its maps are likely {other}: pass output_fmt={other!r}"
        )
        raise ValueError(
            f"the backbone's channel count changes with the input size when its output is read as "
            f"{layout}: {int(out.shape[channel_dim])} channels at {tuple(sample_shape[1:])}, "
            f"{int(small.shape[channel_dim])} at {half[1:]} (output shapes {tuple(out.shape)} and "
            f"{tuple(small.shape)}); {hint}"
        )
    if out.dim() == 3:  # tokens (B, N, C)
        return int(out.shape[2]), None
    return int(out.shape[1]), max(1, sample_shape[-1] // out.shape[-1])


def _torchvision_node(name: str, model: nn.Module) -> str | None:
    matches = [prefix for prefix in _TORCHVISION_NODES if name.startswith(prefix)]
    if not matches:
        return None
    node = _TORCHVISION_NODES[max(matches, key=len)]
    return node if isinstance(node, str) else node(model)


#: torchvision model classes whose lower-cased name is not their family's name prefix.
_TORCHVISION_CLASS_FAMILY = {"Inception3": "inception_v3"}


def _torchvision_model_node(model: nn.Module) -> str | None:
    """The default node of a torchvision classification model passed as a module (as for
    its name: ``resnet18()`` is cut at ``layer4``), ``None`` for any other module."""
    cls = type(model)
    if not cls.__module__.startswith("torchvision.models."):
        return None
    family = _TORCHVISION_CLASS_FAMILY.get(cls.__name__, cls.__name__.lower())
    return _torchvision_node(family, model)


def _is_torchvision_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is one of torchvision's classification models (``ResNet``,
    ``VisionTransformer``, ...: a class of ``torchvision.models`` itself, not a block)."""
    cls = type(model)
    if not cls.__module__.startswith("torchvision.models."):
        return False
    import torchvision

    return getattr(torchvision.models, cls.__name__, None) is cls


def _is_timm_model(model: nn.Module) -> bool:
    """Whether ``model`` is a timm model or feature net (it has a ``pretrained_cfg``), not a block."""
    return type(model).__module__.startswith("timm.") and hasattr(model, "pretrained_cfg")


def _is_timm_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is a timm model whose forward ends in its classifier (``num_classes`` > 0)."""
    return (
        _is_timm_model(model)
        and callable(getattr(model, "get_classifier", None))
        and isinstance(getattr(model, "num_classes", None), int)
        and model.num_classes > 0  # type: ignore[operator]
    )


#: Nodes to suggest for torchvision classification models that have no default node.
_TORCHVISION_NODE_EXAMPLES = {"VisionTransformer": ("encoder", "tokens (B, N, C), the class token included")}


def _node_hint(model: nn.Module) -> str:
    """What to pass for a classification model without a known feature node (``"node=..."``)."""
    if _is_timm_classifier(model):
        return (
            f"node= naming its last feature map (its forward ends in its classifier, num_classes="
            f"{model.num_classes}; or create it with num_classes=0, global_pool='', or pass its name)"
        )
    example = _TORCHVISION_NODE_EXAMPLES.get(type(model).__name__)
    suggestion = f"e.g. node={example[0]!r}: {example[1]}; " if example else ""
    return (
        f"node= naming its last feature map ({suggestion}see "
        "torchvision.models.feature_extraction.get_graph_node_names)"
    )


def _timm_flat_hint(model: nn.Module) -> str:
    """What to do with a timm model (passed as a module) whose forward gives no map: its
    logits, or pooled features (``num_classes=0``)."""
    ends = (f"its classifier (num_classes={model.num_classes})" if _is_timm_classifier(model)
            else "its global pooling")
    return (
        f"it is a timm model whose forward ends in {ends}: create it with num_classes=0, "
        "global_pool='' (or features_only=True), pass its name instead of the module, or pass "
        "node= naming its last feature map"
    )


def _no_node_error(model: nn.Module, what: str, size: str | None) -> ValueError:
    """The error for a torchvision classification model (named ``what``: the name given,
    or the module's class) without a default feature node, which would give its logits:
    all that it needs at once, ``node=`` and its one image size (``size``, the
    :func:`_size_hint`, where ``sample_shape`` is not it)."""
    needs = [_node_hint(model)] + ([size] if size else [])
    return ValueError(
        f"{what} is a torchvision classification model with no default feature node (its output is "
        f"its logits); pass {' and '.join(needs)}"
    )


def _fixed_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The one image size ``model`` takes, where it says so: torchvision's ViT
    (``image_size``), timm's ViT-like models (a strict ``patch_embed.img_size``)."""
    size = getattr(model, "image_size", None)
    if _is_torchvision_classifier(model) and isinstance(size, int):
        return size, size
    inner = getattr(model, "model", None)  # timm's features_only wrappers (FeatureGetterNet)
    if getattr(model, "patch_embed", None) is None and isinstance(inner, nn.Module):
        model = inner
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if (
        getattr(embed, "strict_img_size", False)
        and not getattr(model, "dynamic_img_size", False)
        and isinstance(img_size, (tuple, list))
        and len(img_size) == 2
    ):
        return int(img_size[0]), int(img_size[1])
    return None


def _size_hint(model: nn.Module, sample_shape: tuple[int, ...]) -> str | None:
    """``"sample_shape=(3, 224, 224) (...)"`` for a model that takes one image size only,
    other than ``sample_shape``'s; else ``None``."""
    size = _fixed_image_size(model)
    if size is None or tuple(sample_shape[1:]) == size:
        return None
    return (
        f"sample_shape=({sample_shape[0]}, {size[0]}, {size[1]}) ({type(model).__name__} takes "
        f"{size[0]} x {size[1]} images only)"
    )


def _torchvision_names() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models(module=torchvision.models))


def _timm_names(pattern: str = "") -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return list(timm.list_models(pattern or "*"))


def _install(extra: str) -> str:
    """How to install an extra, for error messages (the package is not on PyPI yet)."""
    return f"pip install 'bilinearpool[{extra}]' (from a clone: pip install '.[{extra}]')"


def _missing(module: str, extra: str) -> str:
    """For an error message: ``"torchvision not installed: pip install ..."`` when
    ``module`` cannot be imported, else ``""``."""
    if importlib.util.find_spec(module) is not None:
        return ""
    return f"{module} not installed: {_install(extra)}"


def list_backbones() -> dict[str, list[str]]:
    """Names :func:`build_backbone` accepts, by provider (empty lists for missing packages).

    Examples:
        >>> names = list_backbones()
        >>> "resnet50" in names["torchvision"], "inception_resnet_v2" in names["timm"]
        (True, True)
    """
    return {"torchvision": _torchvision_names(), "timm": _timm_names()}


#: What a weights file should hold, for the errors about one that does not.
_SAVE_HINT = "expected a state_dict written by torch.save(model.state_dict(), path)"
#: The first bytes of a zip archive: torch.save's format since PyTorch 1.6.
_ZIP_MAGIC = b"PK\x03\x04"
#: A GLOBAL (a class or function) that ``torch.load(weights_only=True)`` refused, in its message.
_REFUSED_GLOBAL = re.compile(
    r"GLOBAL (\S+) (?:was not an allowed global by default|whose module \S+ is blocked)"
)


def _is_pickle(head: bytes) -> bool:
    """Whether ``head`` starts as a pickle of protocol 2 to 5 does (torch.save's format
    before PyTorch 1.6 is a series of protocol-2 pickles)."""
    return len(head) >= 2 and head[0] == pickle.PROTO[0] and 2 <= head[1] <= 5


#: The number torch.save's format before PyTorch 1.6 pickles first (torch.serialization's
#: MAGIC_NUMBER); torch.load reads no pickle without it.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _is_legacy_torch_save(head: bytes) -> bool:
    """Whether ``head``, a pickle (:func:`_is_pickle`), starts as torch.save's format before
    PyTorch 1.6 does: a first pickle holding its magic number alone. A pickle that
    ``pickle.dump`` wrote starts with its object instead.

    Examples:
        >>> import io, pickle
        >>> _is_legacy_torch_save(pickle.dumps({"w": 1.0}, protocol=2))
        False
        >>> buffer = io.BytesIO()
        >>> torch.save({"w": torch.zeros(1)}, buffer, _use_new_zipfile_serialization=False)
        >>> _is_legacy_torch_save(buffer.getvalue()[:64])
        True
    """
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(head)):
            if op.name == "STOP":
                return False
            if op.name not in ("PROTO", "FRAME"):  # FRAME: protocol 4 and 5
                return arg == _LEGACY_MAGIC and isinstance(arg, int)
    except Exception:  # noqa: BLE001 - not a pickle of a number there
        return False
    return False


def _text_start(head: bytes) -> str | None:
    """The start of ``head`` when it reads as text (a web page or an error message saved
    under a weights file's name), its whitespace collapsed; ``None`` for binary bytes."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not a character cut off at the end
            return None
        text = head[: err.start].decode("utf-8")
    if not text.strip() or not all(c.isprintable() or c in "\t\n\r" for c in text):
        return None
    return " ".join(text.split())[:40]


def _pickled_objects(names: Sequence[str]) -> str:
    """Why a weights file holding pickles of ``names`` (classes, functions) is refused."""
    named = f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}; " if names else ""
    return (
        f"it holds pickled objects ({named}e.g. a whole model saved with torch.save(model)), which "
        "are not loaded (they can run code); save model.state_dict() instead"
    )


def _data_pkl(names: Sequence[str]) -> str | None:
    """The ``<name>/data.pkl`` among a zip archive's ``names``, the pickle torch.save writes
    beside the tensors; ``None`` in a zip torch.save did not write."""
    return next((name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")), None)


def _not_a_state_dict(path: Path, problem: str) -> ValueError:
    """The error for the weights file ``path`` that is no state_dict file, for ``problem``."""
    return ValueError(f"weights file {str(path)!r} is not a state_dict file: {problem}")


def _zip_problem(path: Path) -> str | None:
    """What is wrong with the zip archive ``path``, read from its directory and its pickle
    (not its tensors), or ``None`` when it looks like what torch.save writes."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        return f"it is a zip archive, damaged or cut short ({err}); save or download it again"
    except Exception:  # noqa: BLE001 - zipfile is stricter than torch's reader (NotImplementedError
        return None  # for a version field torch ignores): torch.load decides, and says why
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        return ("it is a TorchScript archive (torch.jit.save), not a state_dict: load it with "
                "torch.jit.load and save its state_dict() with torch.save")
    if _data_pkl(names) is None:
        return f"it is a zip archive that torch.save did not write (no <name>/data.pkl in it); {_SAVE_HINT}"
    unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if unsafe is None:
        return None
    try:  # reads the pickle's GLOBALs, none of its tensors
        refused = sorted(unsafe(path), key=lambda name: (name.startswith("torch."), name))  # the model first
    except Exception:  # noqa: BLE001 - torch.load, which reads it next, says what is wrong
        return None
    return _pickled_objects(refused) if refused else None


def _safetensors_problem(path: Path, head: bytes, text: str | None) -> str | None:
    """What is wrong with the ``.safetensors`` file ``path``, found by safetensors reading
    its header (which it checks against the file's size), or ``None``."""
    try:
        from safetensors import safe_open
    except ImportError:
        return None  # _load_state_dict says to install it
    try:
        with safe_open(str(path), framework="pt"):
            return None
    except Exception as err:  # noqa: BLE001 - a SafetensorError
        if head.startswith(_ZIP_MAGIC) or _is_pickle(head):
            return "it is not a safetensors file but one torch.save wrote: name it .pt (torch.load reads it)"
        if text is not None:
            return (
                f"it is not a safetensors file but text, beginning {text!r}; expected a state_dict "
                "written by safetensors.torch.save_file(model.state_dict(), path)"
            )
        return (
            f"it is not a safetensors file, or is damaged or cut short (safetensors: {err}); "
            "save or download it again"
        )


def _weights_file_problem(path: Path) -> str | None:
    """What is wrong with the weights file ``path``, found from its first bytes, its zip
    directory and pickle, or a safetensors header, without loading its tensors (cheap
    enough for :func:`check_backbone_name`); ``None`` when it looks like a weights file.

    torch.save writes a zip archive holding ``<name>/data.pkl`` (since PyTorch 1.6) or a
    pickle; a file that is neither (an empty file, text such as a web page saved in its
    place) or a zip archive cut short cannot be one, nor one whose pickle names classes
    that ``weights_only`` refuses (a whole model; listed without unpickling from torch
    2.5). Damage within the archive is found when the file is loaded
    (:func:`_load_state_dict`).

    Raises:
        OSError: when ``path`` cannot be read (naming it).
    """
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head:
        return "it is empty (0 bytes); save or download it again"
    text = _text_start(head)
    if path.suffix.lower() == ".safetensors":
        return _safetensors_problem(path, head, text)
    if head.startswith(_ZIP_MAGIC):
        return _zip_problem(path)
    if _is_pickle(head):
        if _is_legacy_torch_save(head):
            return None
        return (
            "it is a pickle that torch.save did not write (pickle.dump writes such files; torch.load reads "
            f"none); {_SAVE_HINT} in the program that made it"
        )
    header = int.from_bytes(head[:8], "little")  # a safetensors file: its header's length, then JSON
    if head[8:9] == b"{" and 0 < header < path.stat().st_size:
        return "it is a safetensors file: name it .safetensors (safetensors.torch.load_file reads it)"
    what = f", but text beginning {text!r}" if text is not None else ""
    return (
        "it is not a file torch.save wrote: neither a zip archive (its format) nor a pickle (its format "
        f"before PyTorch 1.6){what}; {_SAVE_HINT}"
    )


def _pickle_protocol(path: Path) -> int | None:
    """The pickle protocol of the weights file ``path`` (its ``<name>/data.pkl``, in a zip
    archive), or ``None`` when that cannot be read."""
    try:
        with path.open("rb") as handle:
            head = handle.read(2)
        if head.startswith(_ZIP_MAGIC[:2]):
            with zipfile.ZipFile(path) as archive:
                name = _data_pkl(archive.namelist())
                if name is None:
                    return None
                with archive.open(name) as handle:
                    head = handle.read(2)
    except Exception:  # noqa: BLE001 - damaged: no protocol to tell
        return None
    return head[1] if _is_pickle(head) else None


def _torch_load_problem(err: Exception, path: Path) -> str:
    """What ``torch.load(weights_only=True)`` failing with ``err`` says about the weights
    file ``path``, which looks like one (:func:`_weights_file_problem`), in words that never
    suggest ``weights_only=False`` (that would run whatever code the file's pickle holds)."""
    text = str(err)
    refused = _REFUSED_GLOBAL.search(text)
    # weights_only refused a pickled object, not damaged bytes (a file cut inside a name
    # gives a name cut short, "torch._u.")
    if refused and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", refused.group(1)):
        return _pickled_objects([refused.group(1)])
    protocol = _pickle_protocol(path)
    if protocol is not None and protocol > 2:
        return (f"it was saved with pickle protocol {protocol}, which torch.load(weights_only=True) "
                "cannot read; save it again with torch.save's default protocol")
    if isinstance(err, EOFError) or "unexpected EOF" in text:
        return "it is cut short; save or download it again"
    # weights_only's own words are after "WeightsUnpickler error:", below torch's advice
    inner = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    detail = inner.group(1) if inner else _first_line(err).removeprefix("Weights only load failed. ")
    detail = f"{type(err).__name__}: {detail[:200]}" if detail else type(err).__name__
    with contextlib.suppress(OSError), path.open("rb") as handle:
        if handle.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC:  # one with <name>/data.pkl
            return f"it is a torch.save archive, damaged (torch.load: {detail}); save or download it again"
    return f"it is damaged, or a pickle torch.save did not write (torch.load: {detail}); {_SAVE_HINT}"


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    """The state_dict in the weights file ``path`` (which :func:`_classify_weights` checked
    with :func:`_weights_file_problem`), unwrapped from ``{"state_dict": ...}`` and the
    like, its keys without the ``module.`` of nn.DataParallel.

    Raises:
        ValueError: naming the file and what is wrong with it (damaged, pickled objects,
            not a state_dict).
    """
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"reading {str(path)!r} needs safetensors: pip install safetensors") from err
        try:
            return load_file(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - SafetensorError
            raise _not_a_state_dict(path, f"safetensors could not read it: {err}") from err
    try:
        # (torch's warning on a pickle protocol other than its own is let through: filtering
        # it would change the process's filters outside the probe lock)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - damaged or foreign bytes make the unpickler raise anything
        raise _not_a_state_dict(path, _torch_load_problem(err, path)) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(
            f"weights file {str(path)!r} does not hold a state_dict, but a {type(state).__name__}; {_SAVE_HINT}"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_error(err: RuntimeError) -> str:
    """The first problem load_state_dict reports (its message starts with a header line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{lines[1]} ..." if len(lines) > 1 else str(err)


def _weights_error(name: str, err: BaseException, *, timm: bool = False) -> RuntimeError:
    # timm fetches through the Hugging Face Hub, which retries for about 45 s when offline
    told = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    hub = " (offline, HF_HUB_OFFLINE=1 makes timm fail at once instead of retrying)" if timm and not told else ""
    return RuntimeError(
        f"could not obtain pretrained ImageNet weights for {name!r} ({type(err).__name__}: {err}). "
        "Alternatives: weights='/path/to/state_dict.pth' (a local file, e.g. downloaded elsewhere), "
        f"or weights=None for random initialisation{hub}."
    )


def _weights_enum_member(weights: object) -> bool:
    """Whether ``weights`` is a member of a torchvision weights enum (``ResNet18_Weights.DEFAULT``)."""
    if not isinstance(weights, enum.Enum):
        return False
    try:
        from torchvision.models import WeightsEnum
    except ImportError:
        return False
    return isinstance(weights, WeightsEnum)


def _checked_weights_file(path: Path) -> Path:
    """``path``, unless :func:`_weights_file_problem` finds it is no weights file (ValueError)."""
    problem = _weights_file_problem(path)
    if problem is not None:
        raise _not_a_state_dict(path, problem)
    return path


def _classify_weights(weights: WeightsArg) -> tuple[str, Any]:
    """('none'|'imagenet'|'file'|'enum'|'weights_enum', value); 'enum' is a torchvision
    weights name or a timm tag, 'weights_enum' a torchvision weights enum member.

    A path, or a string with a path separator or a weights file's suffix (``.pth``,
    ``.safetensors``, ...), is a file, which must exist and look like a weights file
    (:func:`_weights_file_problem`: not empty, cut short or text), else ValueError.
    """
    if weights is None:
        return "none", None
    if _weights_enum_member(weights):
        return "weights_enum", weights
    if isinstance(weights, os.PathLike) or (
        isinstance(weights, str) and (os.path.sep in weights or weights.lower().endswith(_WEIGHTS_SUFFIXES))
    ):
        path = Path(weights)
        if path.is_dir():
            raise IsADirectoryError(
                f"weights must be a file, but {str(path)!r} is a folder; name the weights file in it "
                "(e.g. .pth or .safetensors)"
            )
        if not path.is_file():
            raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
        return "file", _checked_weights_file(path)
    if isinstance(weights, str):
        if weights.lower() in _IMAGENET:
            return "imagenet", None
        if Path(weights).is_file():
            return "file", _checked_weights_file(Path(weights))
        return "enum", weights
    if isinstance(weights, enum.EnumMeta) and weights.__members__:  # the enum, not one of its members
        member = next(iter(weights.__members__))
        raise TypeError(
            f"weights={weights.__name__} is a whole weights enum; pass one of its members, e.g. "
            f"weights={weights.__name__}.{'DEFAULT' if 'DEFAULT' in weights.__members__ else member}"
        )
    raise TypeError(
        "weights must be None, 'imagenet', a torchvision weights name, a torchvision weights enum member "
        "(e.g. ResNet18_Weights.DEFAULT), a timm pretrained tag or a path, "
        f"but got {type(weights).__name__}"
    )


#: Key prefixes of the library's classifiers' state_dicts: the backbones' FeatureExtractors.
_CLASSIFIER_KEYS = ("backbone.body.", "backbone_b.body.")


def _saved_by_this_library(state: Mapping[str, Tensor], own: Mapping[str, Tensor], path: Path) -> str | None:
    """What a state_dict saved from one of the library's models (a classifier or a
    :class:`FeatureExtractor`) holds and how to load it; ``None`` for other state_dicts
    (e.g. a torchvision or timm model's, which ``weights=`` takes)."""
    safetensors = path.suffix.lower() == ".safetensors"
    load = "safetensors.torch.load_file(path)" if safetensors else "torch.load(path)"
    ours = [k for k in state if k.startswith(_CLASSIFIER_KEYS)]
    if ours and not any(k.startswith(_CLASSIFIER_KEYS) for k in own):
        heads = [k for k in state if not k.startswith(_CLASSIFIER_KEYS)]
        examples = ", ".join(repr(k) for k in [*ours[:2], *heads[-1:]])
        return (
            f"the file holds a whole classifier's weights (keys such as {examples}), as saved from a "
            "FastBCNN, BCNN or GAPClassifier, not a backbone's; build the classifier as it was (with "
            f"weights=None) and load them with model.load_state_dict({load}). To start a new classifier "
            f"(e.g. for other classes) from its backbone only: state = {load}; "
            "new.backbone.load_state_dict({k.removeprefix('backbone.'): v for k, v in state.items() "
            "if k.startswith('backbone.')})"
        )
    if state and all(k.startswith("body.") for k in state) and not any(k.startswith("body.") for k in own):
        examples = ", ".join(repr(k) for k in list(state)[:2])
        return (
            f"the file holds a FeatureExtractor's weights (keys such as {examples}), as saved from "
            "build_backbone(...), not the model's; build the extractor as it was (with weights=None) and "
            f"load them with extractor.load_state_dict({load})"
        )
    return None


def _load_checked(model: nn.Module, path: Path, head: tuple[str, ...], misfit: str) -> None:
    """Load the state_dict in ``path`` into ``model``, strictly except for its classifier.

    Keys under ``head`` (the classifier, which the extractor cuts off) may be missing or
    of other shapes (a checkpoint fine-tuned on other classes): those are not loaded.
    Every other key must be there and fit, else ValueError.
    """
    own = model.state_dict()
    loaded = _load_state_dict(path)
    saved_whole = _saved_by_this_library(loaded, own, path)
    if saved_whole is not None:
        raise ValueError(f"{misfit}: {saved_whole}")
    state = {
        k: v
        for k, v in loaded.items()
        if not (head and k.startswith(head) and (k not in own or own[k].shape != v.shape))
    }
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{misfit}: {_load_error(err)}") from err
    missing = [k for k in result.missing_keys if not (head and k.startswith(head))]
    if missing or result.unexpected_keys:
        raise ValueError(f"{misfit}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")


def _check_weights_enum(name: str, weights: Any) -> None:
    """ValueError unless the torchvision weights enum member ``weights`` belongs to model ``name``."""
    import torchvision

    expected = torchvision.models.get_model_weights(name)
    if isinstance(weights, expected):
        return
    owners = []
    for other in _torchvision_names():
        try:
            if torchvision.models.get_model_weights(other) is type(weights):
                owners.append(other)
        except (ValueError, KeyError):  # a builder without a weights enum
            continue
    kind = type(weights).__name__
    whose = f"the weights of torchvision {' / '.join(map(repr, owners))}" if owners else f"a {kind}"
    members = ", ".join(f"{expected.__name__}.{key}" for key in expected.__members__)
    raise ValueError(
        f"weights={weights!r} are {whose}, not of {name!r}: pass one of {expected.__name__}'s members "
        f"({members}), 'imagenet', or build the model the weights belong to"
    )


def _weights_names(name: str) -> str:
    """The weights names of torchvision model ``name`` (``"IMAGENET1K_V1, DEFAULT"``), for error messages."""
    import torchvision

    try:
        return ", ".join(torchvision.models.get_model_weights(name).__members__)
    except (ValueError, KeyError):
        return ""


def _unknown_torchvision_weights(name: str, value: str) -> ValueError:
    known = _weights_names(name)
    return ValueError(
        f"unknown weights {value!r} for {name!r}: use None, 'imagenet', a torchvision "
        f"weights name ({f'its names: {known}' if known else 'such as IMAGENET1K_V1'}), "
        "or a path to a local state_dict file"
    )


def _check_torchvision_weights(name: str, weights: WeightsArg) -> tuple[str, Any]:
    """``weights`` classified (:func:`_classify_weights`) for torchvision model ``name``,
    with what building would refuse found without building or downloading: a missing
    file, a weights enum of another model, a weights name the model does not have."""
    import torchvision

    kind, value = _classify_weights(weights)
    if kind == "weights_enum":
        _check_weights_enum(name, value)
    elif kind == "enum":
        try:
            enum = torchvision.models.get_model_weights(name)
        except (ValueError, KeyError):  # a builder without weights
            raise _unknown_torchvision_weights(name, value) from None
        # as torchvision's WeightsEnum.verify reads a name: "IMAGENET1K_V1" or "ResNet50_Weights.IMAGENET1K_V1"
        if value.replace(f"{enum.__name__}.", "") not in enum.__members__:
            raise _unknown_torchvision_weights(name, value)
    return kind, value


def _build_torchvision(
    name: str, weights: WeightsArg, node: str | None, sample_shape: tuple[int, ...] = (3, 128, 128)
) -> tuple[nn.Module, str]:
    import torchvision

    kind, value = _check_torchvision_weights(name, weights)  # refused before any download
    kwargs: dict[str, Any] = {}
    if name in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = kind == "none"  # skip the slow truncated-normal init when loading
        # torchvision's builders set it for every pretrained weight (ImageNet normalisation
        # -> the original networks' (x - 0.5) / 0.5); here for every build, so that the
        # preprocessing is part of the architecture: a local copy of the weights, and a
        # model rebuilt with weights=None to load a checkpoint into, preprocess as the
        # pretrained model did (transform_input is not in the state_dict).
        kwargs["transform_input"] = True
    if kind in ("imagenet", "enum", "weights_enum"):
        try:
            model = torchvision.models.get_model(name, weights="DEFAULT" if kind == "imagenet" else value)
        except (OSError, RuntimeError, ValueError, KeyError) as err:  # URLError is an OSError
            raise _weights_error(name, err) from err
    else:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        if kind == "file":
            misfit = f"weights file {str(value)!r} does not fit torchvision {name!r}"
            _load_checked(model, value, _TORCHVISION_HEADS, misfit)
    node = node or _torchvision_node(name, model)
    if node is None:
        raise _no_node_error(model, repr(name), _size_hint(model, sample_shape))
    return model, node


# SEBlock checks its input's shape, which fx cannot trace: keep it a leaf.
_TRACER_KWARGS = {"leaf_modules": [SEBlock]}


def _node_error(model: nn.Module, node: str, nodes: list[str] | None = None) -> ValueError:
    from torchvision.models.feature_extraction import get_graph_node_names

    if nodes is None:
        with _modes_kept(model):
            nodes, _ = get_graph_node_names(model, tracer_kwargs=_TRACER_KWARGS)
    return ValueError(f"node {node!r} is not in {type(model).__name__}; its last nodes are {nodes[-8:]}")


def _check_node(model: nn.Module, node: str) -> None:
    """ValueError unless ``node`` names a graph node of ``model`` (or a module holding
    some, as ``create_feature_extractor`` takes it), before the model is modified."""
    from torchvision.models.feature_extraction import get_graph_node_names

    try:
        model.get_submodule(node)
        return  # a submodule: no trace needed
    except AttributeError:
        pass
    with _modes_kept(model):
        train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=_TRACER_KWARGS)
    if not any(n == node or n.startswith(f"{node}.") for n in (*train_nodes, *eval_nodes)):
        raise _node_error(model, node, train_nodes)


def _extract(model: nn.Module, node: str) -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor

    with _modes_kept(model) as modes:
        try:
            body = create_feature_extractor(
                model, return_nodes={node: "features"}, tracer_kwargs=_TRACER_KWARGS, suppress_diff_warning=True
            )
        except ValueError as err:
            raise _node_error(model, node) from err
    # The graph module holds the model's layers under their names (in new containers),
    # and was put in one mode throughout: each gets the model's mode for its name.
    _set_training_modes(body, modes)
    return body


def _checked_timm_state(timm: Any, name: str, path: Path) -> dict[str, Tensor]:
    """The state_dict in ``path``, as loaded into the full timm model ``name``; ValueError
    unless it fits that model.

    timm loads weights into a ``features_only`` model leniently (the classifier is
    dropped later, so every key may be missing); this checks the file strictly against
    the full model first, allowing only its classifier (``pretrained_cfg["classifier"]``)
    to be missing or of another size. What it returns is what timm then loads, so the
    file is read once, by the library's rules: timm's own reading of the file would not
    unwrap ``{"model_state_dict": ...}`` (and load nothing) and would prefer a
    ``state_dict_ema`` to the ``state_dict`` checked here.
    """
    misfit = f"weights file {str(path)!r} does not fit timm {name!r}"
    full = timm.create_model(name, pretrained=False)
    classifiers = full.pretrained_cfg.get("classifier") or ()
    head = tuple(f"{c}." for c in ((classifiers,) if isinstance(classifiers, str) else classifiers))
    _load_checked(full, path, head, misfit)
    return dict(full.state_dict())


def _timm_in_channels(body: nn.Module) -> int:
    """Channels of the images a timm model takes: its configuration's input size (3 if unsaid)."""
    cfg = getattr(body, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    return int(size[0]) if isinstance(size, (tuple, list)) and size else 3


def _timm_output_fmt(body: nn.Module) -> str:
    """Layout of the maps of a timm model or ``features_only`` model, from its
    ``output_fmt`` (Swin and others report NHWC): NHWC or NCHW (tokens need neither)."""
    return "NHWC" if _said_output_fmt(body) == "NHWC" else "NCHW"


def _said_output_fmt(module: nn.Module) -> str | None:
    """The ``output_fmt`` a module carries (timm's models and feature nets: a str or a
    ``Format``), as ``"NCHW"`` or ``"NHWC"``; ``None`` when it carries none of them."""
    fmt = getattr(module, "output_fmt", None)
    value = str(getattr(fmt, "value", fmt)).upper() if fmt is not None else None
    return value if value in ("NCHW", "NHWC") else None


def _module_output_fmt(model: nn.Module, node: str | None) -> str:
    """Layout of a module's feature maps, where the module says: torchvision's Swin
    transformers (the model cut at its stages or final norm, or its ``features`` passed
    alone) and timm models or feature nets that carry ``output_fmt``; else NCHW."""
    if node is not None and _torchvision_output_fmt(model, node) == "NHWC":
        return "NHWC"
    if node is None and _torchvision_swin_stages(model):
        return "NHWC"
    return _timm_output_fmt(model)


def _reported_output_fmt(module: nn.Module) -> str | None:
    """The layout of the maps a whole module gives, where it says so: the stages of a
    torchvision Swin transformer (NHWC), a timm model or feature net (its ``output_fmt``);
    ``None`` for a module that does not say."""
    return "NHWC" if _torchvision_swin_stages(module) else _said_output_fmt(module)


def _torchvision_swin_stages(module: nn.Module) -> bool:
    """Whether ``module`` is (a part of) the NHWC ``features`` of a torchvision Swin transformer."""
    try:
        from torchvision.models import SwinTransformer
        from torchvision.models.swin_transformer import PatchMerging, SwinTransformerBlock
    except ImportError:
        return False
    if isinstance(module, SwinTransformer):
        return False  # the whole model gives logits; cut it with node=
    return any(isinstance(m, (PatchMerging, SwinTransformerBlock)) for m in module.modules())


def _torchvision_output_fmt(model: nn.Module, node: str) -> str:
    """NHWC for the stages of torchvision's Swin transformers (v1 and v2), else NCHW."""
    from torchvision.models import SwinTransformer

    nhwc = isinstance(model, SwinTransformer) and node.split(".")[0] in ("features", "norm")
    return "NHWC" if nhwc else "NCHW"


def _timm_tagged(timm: Any, name: str, tag: str) -> str:
    """``"<name>.<tag>"`` for weights=tag, if timm has such pretrained weights, else ValueError."""
    bare, _, own_tag = name.partition(".")
    if own_tag and own_tag != tag:
        raise ValueError(
            f"timm model {name!r} already names the pretrained tag {own_tag!r}, but weights={tag!r}; "
            "give the tag once, in the name or as weights="
        )
    known = timm.list_pretrained(f"{bare}.*")
    if f"{bare}.{tag}" not in known:
        tags = [k.partition(".")[2] for k in known]
        raise ValueError(
            f"unknown weights {tag!r} for timm {bare!r}: use None, 'imagenet', one of its pretrained "
            f"tags {tags}, or a path to a local state_dict file"
        )
    return f"{bare}.{tag}"


def _timm_module(name: str) -> Any:
    """timm, checked to know model ``name`` (bare, or with a pretrained tag): an
    ImportError naming the extra when timm is missing, a ValueError with close names when
    it does not know the name."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            f"backbone {name!r} comes from timm, which is not installed: {_install('timm')}"
        ) from err
    if name not in timm.list_models() and not timm.is_model(name):
        close = _close_names(name.partition(".")[0], timm.list_models())
        meant = f" ({_did_you_mean(close)})" if close else ""
        raise ValueError(f"unknown timm model {name!r}{meant}; see timm.list_models()")
    bare, _, tag = name.partition(".")
    # timm.is_model reads the bare name only: a tag it has no configuration for would
    # pass here and fail in create_model with a bare RuntimeError (every configuration
    # counts, those without weights such as ".untrained" too)
    tagged = timm.list_models(f"{bare}.*", include_tags=True)
    if tag and name not in tagged:
        tags = [k.partition(".")[2] for k in tagged]
        listed = f"one of its tags {tags}" if tags else f"no tag ({bare!r} has none)"
        raise ValueError(
            f"unknown pretrained tag {tag!r} for timm model {bare!r}: use {listed}, or the bare name "
            "with weights=None or 'imagenet'; see timm.list_models(pattern, include_tags=True)"
        )
    return timm


def _check_timm_weights(timm: Any, name: str, weights: WeightsArg) -> tuple[str, Any, str]:
    """``weights`` classified (:func:`_classify_weights`) for timm model ``name``, with
    what building would refuse found without building or downloading: a missing file, a
    torchvision weights enum, a pretrained tag the model does not have; and the name timm
    creates (``"<name>.<tag>"`` for a tag)."""
    kind, value = _classify_weights(weights)
    if kind == "weights_enum":
        raise ValueError(
            f"weights={value!r} is a torchvision weights enum, but {name!r} is a timm model: use None, "
            "'imagenet', one of its pretrained tags (timm.list_pretrained), or a path to a local "
            "state_dict file"
        )
    return kind, value, (_timm_tagged(timm, name, value) if kind == "enum" else name)


def _build_timm(name: str, weights: WeightsArg) -> nn.Module:
    timm = _timm_module(name)
    kind, value, name = _check_timm_weights(timm, name, weights)
    kwargs: dict[str, Any] = {"features_only": True, "out_indices": (-1,)}
    if kind == "file":
        # timm (from 0.9) loads a state_dict given in the configuration as it loads its files
        state = _checked_timm_state(timm, name, value)
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": state})
    elif kind == "imagenet":
        kwargs["pretrained"] = True
    elif kind == "enum":  # a pretrained tag: timm fetches what "<name>.<tag>" (name) names
        kwargs["pretrained"] = True
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError) as err:
        if kind == "file":
            raise ValueError(f"weights file {str(value)!r} does not fit timm {name!r}: {err}") from err
        if kind == "none":
            raise
        raise _weights_error(name, err, timm=True) from err


def build_backbone(
    backbone: str | nn.Module,
    *,
    weights: WeightsArg = None,
    node: str | None = None,
    se_reduction: int | None = None,
    sample_shape: tuple[int, ...] | None = None,
    output_fmt: str | None = None,
) -> FeatureExtractor:
    """Resolve ``backbone`` into a :class:`FeatureExtractor` returning its last feature map.

    Args:
        backbone: a model name (``"resnet50"``, ``"inception_v3"``,
            ``"inception_resnet_v2"``, any torchvision classification model, any timm
            model, with or without a pretrained tag such as ``"resnet18.a1_in1k"``, or
            ``"timm:<name>"``), a model to cut at ``node``, or any module that returns a
            feature map. A :class:`FeatureExtractor` is returned as it is (and takes no
            further options). A tag in the name picks timm's configuration of the model
            and the weights that ``weights="imagenet"`` loads; with ``weights=None`` the
            model is initialised at random, tag or not.
        weights: ``None`` (random initialisation), ``"imagenet"`` (the library's default
            pretrained weights, downloaded when not cached; offline this raises a
            :class:`RuntimeError` that names the alternatives), a torchvision weights name
            such as ``"IMAGENET1K_V1"`` or a member of the model's torchvision weights enum
            such as ``torchvision.models.ResNet18_Weights.DEFAULT`` (a member of another
            model's enum raises a ValueError that names the model's members; timm models
            take no torchvision enum), a timm pretrained tag such as ``"tv_in1k"`` for a
            timm model (for ``"timm:resnet18"``: the weights of ``"resnet18.tv_in1k"``; a
            name torchvision has, such as ``"resnet18"``, is torchvision's and takes its
            weights names; an unknown tag raises a ValueError listing the model's tags), or a path to a local ``state_dict`` file of
            the full model (a ``Path``, or a string with a path separator or a suffix
            ``.pth``, ``.pt``, ``.bin``, ``.safetensors``, ``.ckpt``; FileNotFoundError if
            it does not exist, ValueError naming what is wrong if it is no state_dict file
            torch.save or safetensors wrote: empty, cut short, damaged, text, or holding
            pickled objects such as a whole model). The file's classifier may be missing or
            of another size (fine-tuned on other classes): it is not loaded, the extractor
            cuts it off; every other key must fit. A file saved from one of the library's classifiers (keys
            ``backbone.body.*``, ``classifier.*``) or extractors (``body.*``) raises a ValueError
            that says to build that model and call its ``load_state_dict``. Only for names.
        node: for a model or a torchvision name, the graph node whose output is the
            feature map (default: the family's last feature stage, e.g. ``"layer4"``).
        se_reduction: insert squeeze-and-excitation blocks with this ratio inside the
            backbone's blocks (:func:`~bilinearpool.insert_se_blocks`), after loading weights.
        sample_shape: ``(C, H, W)`` of the zero image used to read the channel count
            (default ``(3, 128, 128)``); e.g. ``(1, 64, 64)`` for a one-channel backbone,
            ``(3, 224, 224)`` for a ViT, which takes one size only (where a model says so, as
            torchvision's and timm's ViTs do, the errors name that size; a torchvision ViT
            passed without ``node=`` is refused with one error that names both). Given for a
            module, it declares the images the module takes: the extractor's ``in_channels``
            is set, and its forward checks its input (see :class:`FeatureExtractor`). Not
            for a timm name (a ValueError: timm knows its model's ``in_chans``).
        output_fmt: layout of the backbone's 4-D feature map, ``"NCHW"`` or ``"NHWC"``
            (then permuted to ``(B, C, H, W)``). Default: what the backbone reports (the
            ``output_fmt`` of timm models and feature nets, names and modules alike; the
            stages of torchvision's Swin transformers, cut with ``node=`` or passed as
            its ``features``, are NHWC), otherwise NCHW. A channel count that changes
            with the input size (an NHWC map read as NCHW) raises a ValueError that says
            to pass the other layout; so does an ``output_fmt`` given for a backbone
            that returns tokens (it would do nothing).

    Returns:
        The feature extractor; ``out_channels`` holds :math:`C`, ``in_channels`` the
        channels of the images it takes where they are known (names, torchvision and timm
        models, a given ``sample_shape``: then its forward refuses other shapes and dtypes
        with a clear error), else ``None``.

    Raises:
        ValueError: for an unknown name (suggesting close names: ``"resnet-50"`` -> did you
            mean ``'resnet50'``?), and for the problems described above.

    Shape:
        - Input: :math:`(B, C_{in}, H_{in}, W_{in})`, :math:`C_{in} = 3` for named backbones.
        - Output: :math:`(B, C, H, W)`, e.g. ``(B, 2048, 7, 7)`` for ResNet50 at 224.

    Examples:
        >>> fx = build_backbone("resnet18")
        >>> fx.out_channels, fx(torch.randn(1, 3, 64, 64)).shape
        (512, torch.Size([1, 512, 2, 2]))
        >>> gray = build_backbone(nn.Conv2d(1, 8, 3, stride=2), sample_shape=(1, 32, 32))
        >>> gray.out_channels, gray.reduction
        (8, 2)
    """
    if isinstance(backbone, FeatureExtractor):
        given = {"weights": weights, "node": node, "se_reduction": se_reduction, "sample_shape": sample_shape,
                 "output_fmt": output_fmt}
        ignored = sorted(k for k, v in given.items() if v is not None)
        if ignored:
            raise ValueError(
                f"backbone is already a FeatureExtractor, so {', '.join(ignored)} cannot apply to it; "
                "give these options to build_backbone when building it, or pass the model or name instead"
            )
        return backbone
    check_choice("output_fmt", output_fmt, _FORMATS, optional=True)
    if node is not None and not isinstance(node, str):
        raise TypeError(
            f"node must be None or a str naming a graph node (e.g. 'layer4'), but got {type(node).__name__}"
        )
    if node is not None and not node.strip():
        raise ValueError(
            f"node must name a graph node (e.g. 'layer4') or be None for the default, but got {node!r}"
        )
    se_reduction = check_optional_positive_int("se_reduction", se_reduction)
    given_shape = sample_shape is not None
    sample_shape = _check_sample_shape(sample_shape)
    if isinstance(backbone, str):
        name = backbone
        if _is_timm_name(name):
            if node is not None:
                raise ValueError(f"node= applies to torchvision models, not to timm model {name!r}")
            if given_shape:
                # a timm model's input channels are its in_chans, known without a probe
                raise ValueError(
                    f"sample_shape= applies to torchvision models and your own modules, not to timm model "
                    f"{name!r}, whose input channels timm knows (in_chans); for other input channels pass "
                    "timm.create_model(..., in_chans=C) as the backbone, with sample_shape=(C, H, W)"
                )
            body: nn.Module = _build_timm(name.removeprefix("timm:"), weights)
            _check_known_fmt(output_fmt, _timm_output_fmt(body), f"timm model {name!r}, which reports")
            if se_reduction is not None:
                insert_se_blocks(body, reduction=se_reduction)
            info = body.feature_info  # type: ignore[attr-defined]
            return FeatureExtractor(
                body,
                out_channels=info.channels()[-1],
                reduction=info.reduction()[-1],
                name=name,
                output_fmt=_timm_output_fmt(body),
                in_channels=_timm_in_channels(body),
                image_size=_fixed_image_size(body),
            )
        if name in _torchvision_names():
            given_node = node
            model, node = _build_torchvision(name, weights, node, sample_shape)
            if se_reduction is not None:
                insert_se_blocks(model, reduction=se_reduction)
            fmt = output_fmt or _torchvision_output_fmt(model, node)
            size = _size_hint(model, sample_shape)
            needs = [size] if size else []
            body = _extract(model, node)
            # the layouts of the default nodes are known; a node of the user's is checked
            channels, stride = _probe(
                body, sample_shape, fmt, check_layout=given_node is not None, needs=needs
            )
            _check_fmt_applies(output_fmt, stride)
            if given_node is None:
                _check_known_fmt(output_fmt, _torchvision_output_fmt(model, node), f"{name} cut at {node!r}, which gives")
            return FeatureExtractor(
                body, out_channels=channels, reduction=stride, name=f"{name}:{node}", output_fmt=fmt,
                tokens=stride is None, in_channels=sample_shape[0], image_size=_fixed_image_size(model),
            )
        raise _unknown_backbone(name)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a name or an nn.Module, but got {type(backbone).__name__}")
    if weights is not None:
        raise ValueError("weights= applies to named backbones; load weights into your module before passing it")
    default_node = None if node is not None else _torchvision_model_node(backbone)
    node = node or default_node
    size = _size_hint(backbone, sample_shape)
    if node is None and _is_torchvision_classifier(backbone):
        raise _no_node_error(backbone, type(backbone).__name__, size)
    needs = [size] if size else []
    if node is None and _is_timm_classifier(backbone):  # its logits would be refused after the size
        needs.append(_node_hint(backbone))
    fmt = output_fmt or _module_output_fmt(backbone, node)
    if default_node is not None:  # (before SE blocks go into the user's model, in place)
        known = _module_output_fmt(backbone, node)
        _check_known_fmt(output_fmt, known, f"{type(backbone).__name__} cut at {node!r}, which gives")
    elif node is None and (reported := _reported_output_fmt(backbone)) is not None:
        _check_known_fmt(output_fmt, reported, f"{type(backbone).__name__}, which reports")
    if se_reduction is not None:
        if node is not None:
            _check_node(backbone, node)  # before SE blocks go into the user's model, in place
        insert_se_blocks(backbone, reduction=se_reduction)
    body = _extract(backbone, node) if node is not None else backbone
    # as for names, the layouts of the default nodes are known: no second probe
    flat_hint = _timm_flat_hint(backbone) if node is None and _is_timm_model(backbone) else None
    channels, stride = _probe(body, sample_shape, fmt, check_layout=default_node is None, needs=needs,
                              flat_hint=flat_hint)
    _check_fmt_applies(output_fmt, stride)
    # what the network takes is known for torchvision and timm models, and declared by a sample_shape
    known = given_shape or _is_torchvision_classifier(backbone) or _is_timm_model(backbone)
    return FeatureExtractor(
        body, out_channels=channels, reduction=stride, name=type(backbone).__name__, output_fmt=fmt,
        tokens=stride is None, in_channels=sample_shape[0] if known else None,
        image_size=_fixed_image_size(backbone) if known else None,
    )


def _check_known_fmt(output_fmt: str | None, known: str, what: str) -> None:
    """Refuse a given ``output_fmt`` other than ``known``, the layout ``what`` is known to
    give (a default node of torchvision's models, a timm model's own ``output_fmt``):
    read in the other layout, the maps' width would be taken for their channels (a wrong
    model at some input sizes, an error at others)."""
    if output_fmt is not None and output_fmt != known:
        raise ValueError(
            f"output_fmt={output_fmt!r} contradicts the layout of {what} {known} maps; drop "
            f"output_fmt (that layout is known), or pass output_fmt={known!r}"
        )


def _check_fmt_applies(output_fmt: str | None, stride: int | None) -> None:
    """Refuse a given ``output_fmt`` for a backbone that returns tokens (stride ``None``):
    it is the layout of 4-D maps and would do nothing."""
    if output_fmt is not None and stride is None:
        raise does_nothing([f"output_fmt={output_fmt!r}"], "4-D feature maps",
                           "the backbone returns tokens (B, N, C)", drop="output_fmt")


def _is_timm_name(name: str) -> bool:
    """Whether :func:`build_backbone` resolves ``name`` as a timm model: ``timm:`` names, and
    names timm lists that torchvision does not (with or without a pretrained tag,
    ``"resnet18.a1_in1k"``: timm lists bare names)."""
    return name.startswith("timm:") or (name not in _torchvision_names() and bool(_timm_names(name.partition(".")[0])))


def _unknown_backbone(name: str) -> Exception:
    """The error for a name neither provider knows, with close names; an ImportError when a
    provider is missing (the name may well be one of its models), else a ValueError."""
    no_tv, no_timm = _missing("torchvision", "vision"), _missing("timm", "timm")
    close = _close_names(name, [*_torchvision_names(), *_timm_names()])
    message = (
        f"unknown backbone {name!r}{f' ({_did_you_mean(close)})' if close else ''}: "
        "expected a torchvision classification model name "
        f"(e.g. {', '.join(list(PAPER_BACKBONES)[:2])}{'; ' + no_tv if no_tv else ''}), "
        f"a timm model name{f' ({no_timm})' if no_timm else ''}, or an nn.Module"
    )
    return (ImportError if no_tv or no_timm else ValueError)(message)


def check_backbone_name(name: str, *, weights: WeightsArg = None) -> None:
    """Raise what :func:`build_backbone` raises for a name it cannot resolve, or for
    ``weights`` it would refuse, without building or downloading anything: for checking a
    configuration before long work (reading a data set, a benchmark run).

    A name that passes may still fail to build for other reasons (pretrained weights that
    cannot be downloaded, a weights file whose tensors do not fit or that is damaged within,
    options that do not apply); that is found when the backbone is built.

    Args:
        name: a torchvision classification model name, a timm model name (optionally with
            ``timm:`` and a pretrained tag), as :func:`build_backbone` takes.
        weights: the ``weights`` to check with it, as :func:`build_backbone` takes them: a
            file must exist and look like a weights file (read from its first bytes, its zip
            directory and pickle or its safetensors header, not its tensors), a torchvision
            weights name or enum must be the model's, a timm pretrained tag must be one the
            model has. ``None`` and ``"imagenet"`` pass.

    Raises:
        TypeError: for anything but a string.
        ValueError: for a name neither torchvision nor timm knows, with close names,
            weights that are not the model's, or a weights file that is not one (empty, cut
            short, text, a whole pickled model), naming the file and what is wrong.
        FileNotFoundError: for a weights file that does not exist
            (:class:`IsADirectoryError` for a folder).
        ImportError: when the package that may provide it is missing, naming the extra.

    Examples:
        >>> check_backbone_name("resnet50")
        >>> check_backbone_name("resnet-50")
        Traceback (most recent call last):
        ...
        ValueError: unknown backbone 'resnet-50' (did you mean 'resnet50'?): expected a torchvision classification model name (e.g. resnet50, inception_v3), a timm model name, or an nn.Module
    """
    if not isinstance(name, str):
        raise TypeError(f"a backbone name must be a string, but got {type(name).__name__}")
    if _is_timm_name(name):
        bare = name.removeprefix("timm:")
        timm = _timm_module(bare)
        if weights is not None:
            _check_timm_weights(timm, bare, weights)
    elif name not in _torchvision_names():
        raise _unknown_backbone(name)
    elif weights is not None:
        _check_torchvision_weights(name, weights)


def _close_names(name: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``names`` close to ``name``, ignoring case, ``-`` and ``_``: the names
    equal to it that way if there are any, else :func:`difflib.get_close_matches`'s."""

    def key(text: str) -> str:
        return text.lower().replace("-", "").replace("_", "")

    by_key: dict[str, list[str]] = {}
    for known in names:
        by_key.setdefault(key(known), []).append(known)
    wanted = key(name)
    keys = [wanted] if wanted in by_key else difflib.get_close_matches(wanted, list(by_key), n=n, cutoff=0.6)
    return list(dict.fromkeys(known for k in keys for known in by_key[k]))[:n]


def _did_you_mean(names: Sequence[str]) -> str:
    """``"did you mean 'a', 'b' or 'c'?"``"""
    quoted = [repr(n) for n in names]
    listed = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
    return f"did you mean {listed}?"


def _check_sample_shape(sample_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if sample_shape is None:
        return (3, 128, 128)
    if not isinstance(sample_shape, (tuple, list, torch.Size)):
        raise TypeError(
            f"sample_shape must be (C, H, W) of positive ints (a tuple or list), but got {sample_shape!r} "
            f"({type(sample_shape).__name__})"
        )
    # integers of any kind (NumPy's, 0-d integer tensors), as the layers' sizes
    values = [as_int(n) for n in sample_shape]
    wrong = [n for n, v in zip(sample_shape, values) if v is None]
    if wrong:
        raise TypeError(
            f"sample_shape must be (C, H, W) of positive ints, but got {sample_shape!r}: "
            f"{wrong[0]!r} is a {type(wrong[0]).__name__}"
        )
    if len(values) != 3 or not all(v > 0 for v in values):  # type: ignore[operator]
        raise ValueError(f"sample_shape must be (C, H, W) of positive ints, but got {sample_shape!r}")
    return tuple(values)  # type: ignore[arg-type]
