"""Build the paper's classifiers through the public API of ``bilinearpool``.

Heads: ``plain`` (global average pooling, the baseline), ``bcnn`` (two-stream bilinear
CNN), ``fast-bcnn`` (one stream, the paper's best); each with an SE block inside the
backbone when ``se_reduction`` is set (the paper uses 8). Backbones are anything
``bilinearpool.build_backbone`` resolves (``resnet50``, ``inception_v3``,
``inception_resnet_v2``, timm names), plus ``tiny``: a two-convolution network of this
package for tests and demos on a CPU.

:func:`input_normalization` gives the mean and standard deviation a built network's
backbone expects of its inputs (the pretrained config a timm backbone carries, e.g. 0.5
and 0.5 for ``inception_resnet_v2``; ImageNet statistics otherwise).
:func:`check_backbone` refuses a backbone name that ``bilinearpool`` does not resolve,
:func:`check_weights` pretrained weights for ``tiny``, and :func:`check_input_size` an
input size below a backbone's known minimum: without building anything, so that a
:class:`breakhis.train.TrainConfig` refuses them before a run indexes its data.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._files import SettingError
from .dataset import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "HEADS",
    "MIN_INPUT_SIZES",
    "TinyBackbone",
    "build_network",
    "check_backbone",
    "check_input_size",
    "check_se_applies",
    "check_weights",
    "check_weights_available",
    "input_normalization",
]

HEADS: tuple[str, ...] = ("plain", "bcnn", "fast-bcnn")
#: Smallest square input (pixels) of backbones whose last stages shrink the feature map
#: below their kernels: smaller inputs fail at the first batch inside torch.
MIN_INPUT_SIZES: dict[str, int] = {"inception_v3": 75, "inception_resnet_v2": 75}
#: The backbones of this package, not ``bilinearpool``'s: :func:`check_backbone` suggests
#: them, as ``bilinearpool`` suggests its own close names.
_OWN_BACKBONES: tuple[str, ...] = ("tiny",)


def check_input_size(backbone: str, input_size: int) -> None:
    """Refuse an input size below the backbone's minimum (:data:`MIN_INPUT_SIZES`).

    Backbones without a known minimum pass; training still tries one forward pass at
    the requested size before it starts (see :func:`breakhis.train.fit`).

    Raises:
        breakhis._files.SettingError: naming the backbone, the size asked and the minimum
            (setting ``input_size``).

    Examples:
        >>> check_input_size("inception_v3", 75)
        >>> check_input_size("inception_v3", 32)  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        breakhis._files.SettingError: input_size must be >= 75 for backbone 'inception_v3',
        but got 32
    """
    # the architecture of "timm:inception_resnet_v2.tf_in1k" is inception_resnet_v2
    minimum = MIN_INPUT_SIZES.get(backbone.removeprefix("timm:").partition(".")[0])
    if minimum is not None and input_size < minimum:
        raise SettingError("input_size", f"must be >= {minimum} for backbone {backbone!r}, "
                                         f"but got {input_size}")


def check_backbone(backbone: str) -> None:
    """Refuse a backbone name that :func:`build_network` cannot build, without building it.

    ``tiny`` passes; other names go to ``bilinearpool.check_backbone_name``, which resolves
    them as ``bilinearpool.build_backbone`` does. A name it knows may still fail to build
    (weights that cannot be obtained); that is found when the model is built.

    Raises:
        breakhis._files.SettingError: for a name ``bilinearpool`` does not resolve (setting
            ``backbone``), with the closest names it knows, if any.

    Examples:
        >>> check_backbone("resnet50")
        >>> check_backbone("xyzzy")  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        breakhis._files.SettingError: backbone must be 'tiny' or a name
        bilinearpool.build_backbone resolves, but got 'xyzzy': unknown backbone 'xyzzy':
        expected a torchvision classification model name (e.g. resnet50, inception_v3), a
        timm model name, or an nn.Module
        >>> try:
        ...     check_backbone("resnet5O")
        ... except ValueError as err:
        ...     print("did you mean 'resnet50'" in str(err))
        True
        >>> try:  # this package's own backbones are suggested too, first
        ...     check_backbone("tinny")
        ... except ValueError as err:
        ...     print("but got 'tinny' (did you mean 'tiny'?): unknown backbone" in str(err))
        True
    """
    if not isinstance(backbone, str):
        raise SettingError("backbone", f"must be a name, but got {backbone!r}")
    if backbone == "tiny":
        return
    try:
        from bilinearpool import check_backbone_name
    except ImportError:
        return  # build_network says so, when the model is built
    try:
        check_backbone_name(backbone)
    except (ValueError, ImportError) as err:
        # bilinearpool's message suggests its close names, which cannot include ours
        close = _close_own_backbones(backbone)
        meant = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise SettingError(
            "backbone", f"must be 'tiny' or a name bilinearpool.build_backbone resolves, but got "
                        f"{backbone!r}{meant}: {err}"
        ) from err


def _close_own_backbones(name: str) -> list[str]:
    """The backbones of this package (:data:`_OWN_BACKBONES`) close to ``name``, ignoring
    case, ``-`` and ``_`` as ``bilinearpool`` does for its names.

    Examples:
        >>> _close_own_backbones("tinny"), _close_own_backbones("tini"), _close_own_backbones("resnet5O")
        (['tiny'], ['tiny'], [])
        >>> _close_own_backbones("swin_tiny"), _close_own_backbones("tinynet"), _close_own_backbones("vit_tiny")
        ([], [], [])
    """

    def key(text: str) -> str:
        return text.lower().replace("-", "").replace("_", "")

    # 0.75: a letter off ("tinny", "tin", "tini"), not a name that holds "tiny" ("swin_tiny" 0.67,
    # "tinynet" and "vit_tiny" 0.73)
    return [own for own in _OWN_BACKBONES if difflib.get_close_matches(key(name), [key(own)], cutoff=0.75)]


def check_weights(backbone: str, weights: str | None) -> None:
    """Refuse pretrained weights for ``tiny``, which has none (only ``None`` builds it).

    Raises:
        breakhis._files.SettingError: for ``tiny`` with ``weights`` other than ``None``
            (setting ``weights``).

    Examples:
        >>> check_weights("tiny", None)
        >>> check_weights("tiny", "imagenet")  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        breakhis._files.SettingError: weights must be None for backbone 'tiny', which has no
        pretrained weights (random initialisation: --no-pretrained), but got 'imagenet'
    """
    if backbone == "tiny" and weights is not None:
        raise SettingError("weights", "must be None for backbone 'tiny', which has no "
                           "pretrained weights (random initialisation: --no-pretrained), but "
                           f"got {weights!r}")


def check_weights_available(backbone: str, weights: str | None) -> None:
    """Refuse ``weights`` that ``backbone`` cannot be built with, found without building
    or downloading (``bilinearpool.check_backbone_name``): a file that does not exist (or
    is a folder, or is no weights file: empty, cut short, text, a whole pickled model), a
    torchvision weights name or timm pretrained tag the model does not have. For a run
    that starts from them, before its data are indexed (minutes); a checkpoint's saved
    settings are not checked so, since its weights are in it. ``tiny``, ``None`` and
    ``"imagenet"`` pass (whether those can be downloaded is found when the model is built).

    Raises:
        breakhis._files.SettingError: naming the setting ``weights``, with the reason.

    Examples:
        >>> check_weights_available("resnet50", "IMAGENET1K_V2")
        >>> check_weights_available("resnet50", "weights/resnet50.pth")  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        breakhis._files.SettingError: weights must be weights backbone 'resnet50' can be
        built with, but got 'weights/resnet50.pth': weights file 'weights/resnet50.pth'
        does not exist
    """
    if backbone == "tiny" or weights is None:
        return
    try:
        from bilinearpool import check_backbone_name
    except ImportError:
        return  # build_network says so, when the model is built
    try:
        check_backbone_name(backbone, weights=weights)
    except (ValueError, OSError) as err:  # OSError: FileNotFoundError, IsADirectoryError
        raise SettingError(
            "weights", f"must be weights backbone {backbone!r} can be built with, but got {weights!r}: {err}"
        ) from err


def check_se_applies(backbone: str, se_reduction: int | None) -> None:
    """Refuse SE blocks (``se_reduction``) for a backbone they cannot go into (one
    without ResNet, Inception-v3 or Inception-ResNet blocks, ``tiny``, or one with
    channel attention of its own), found by building the backbone on the meta device
    (no memory, no weights, under a second): for a run, before its data are indexed.

    Raises:
        breakhis._files.SettingError: naming the setting ``se_reduction``, with the reason.

    Examples:
        >>> check_se_applies("resnet50", 8)
        >>> check_se_applies("vgg11", 8)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        breakhis._files.SettingError: se_reduction must be None for backbone 'vgg11' ...
    """
    if se_reduction is None:
        return
    if backbone == "tiny":
        raise SettingError("se_reduction", "must be None for backbone 'tiny', whose "
                           "convolutions are no blocks SE goes into (ResNet, Inception-v3, "
                           f"Inception-ResNet), but got {se_reduction}")
    try:
        from bilinearpool import build_backbone
    except ImportError:
        return  # build_network says so, when the model is built
    with torch.device("meta"):
        try:
            build_backbone(backbone, se_reduction=se_reduction)
        except ValueError as err:
            try:  # the cause is the SE blocks when the backbone builds without them
                build_backbone(backbone)
            except Exception:  # noqa: BLE001 - another problem, said when the model is built
                return
            raise SettingError(
                "se_reduction", f"must be None for backbone {backbone!r} (no SE blocks), but "
                f"got {se_reduction}: {err}") from err
        except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device
            return  # (torchvision's RegNets copy tensor data in __init__): checked when built


def input_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation (per RGB channel, of inputs in ``[0, 1]``) for ``model``.

    A timm backbone carries the pretrained config its weights were resolved with
    (``pretrained_cfg``, on the feature extractor's ``body``; both streams of a
    two-stream BCNN carry the same): its mean and std are returned, e.g. 0.5 and 0.5
    for ``inception_resnet_v2``, whose weights expect inputs in ``[-1, 1]`` as the
    paper's Keras preprocessing gives. Torchvision backbones and ``tiny`` get the
    ImageNet statistics (torchvision's ``inception_v3`` converts them to its own inside
    the model: ``transform_input``), as does a timm model without them in its config.

    Args:
        model: a network from :func:`build_network`.

    Returns:
        ``(mean, std)``, three floats each.

    Examples:
        >>> input_normalization(build_network("plain", "tiny", num_classes=2))
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        >>> input_normalization(build_network("plain", "inception_resnet_v2", num_classes=2))
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    """
    for module in model.modules():
        cfg = getattr(module, "pretrained_cfg", None)
        if not isinstance(cfg, Mapping):
            continue
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is not None and std is not None and len(mean) == 3 and len(std) == 3:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return IMAGENET_MEAN, IMAGENET_STD


class TinyBackbone(nn.Module):
    """Two strided convolutions with ReLU: a feature extractor that trains in seconds.

    Not from the paper: it stands in for ResNet50/InceptionV3 in tests and demos.

    Args:
        in_channels: input channels.
        out_channels: channels of the returned feature map.

    Shape:
        - Input: ``(B, in_channels, H, W)``
        - Output: ``(B, out_channels, H / 4, W / 4)`` (rounded up)

    Examples:
        >>> import torch
        >>> TinyBackbone(out_channels=8)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 8, 8, 8])
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 16) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = nn.Conv2d(in_channels, 8, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, out_channels, kernel_size=3, stride=2, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))))

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}"


def build_network(
    head: str,
    backbone: str,
    *,
    num_classes: int,
    weights: str | None = None,
    se_reduction: int | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier with ``bilinearpool.build_model``.

    Args:
        head: ``plain``, ``bcnn`` or ``fast-bcnn``.
        backbone: a backbone name ``bilinearpool`` resolves, or ``tiny``.
        num_classes: number of classes.
        weights: ``None`` (random init), ``"imagenet"``, a torchvision weights name, a
            timm pretrained tag, or a local state-dict path (see
            :func:`bilinearpool.build_backbone`).
        se_reduction: SE reduction ratio inside the backbone (paper: 8), or ``None``.
        dropout: dropout before the classifier.
        **kwargs: passed on to ``bilinearpool.build_model``.

    Raises:
        ValueError: for an unknown head.
        breakhis._files.SettingError: for weights other than ``None`` for ``tiny``
            (:func:`check_weights`).
        RuntimeError: when ``bilinearpool`` is not importable, or (from
            ``bilinearpool``) when ImageNet weights cannot be obtained offline.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, but got {head!r}")
    try:
        from bilinearpool import build_model
    except ImportError as exc:
        raise RuntimeError(
            "breakhis needs bilinearpool.build_model (pip install bilinearpool); "
            f"import failed: {exc}"
        ) from exc
    check_weights(backbone, weights)
    net: nn.Module | str = TinyBackbone() if backbone == "tiny" else backbone
    return build_model(
        head, net, num_classes=num_classes, weights=weights, se_reduction=se_reduction,
        dropout=dropout, **kwargs,
    )
