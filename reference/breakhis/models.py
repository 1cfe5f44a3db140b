"""Build the paper's classifiers through the public API of ``bilinearpool``.

Heads: ``plain`` (global average pooling, the baseline), ``bcnn`` (two-stream bilinear
CNN), ``fast-bcnn`` (one stream, the paper's best); each with an SE block inside the
backbone when ``se_reduction`` is set (the paper uses 8). Backbones are anything
``bilinearpool.build_backbone`` resolves (``resnet50``, ``inception_v3``,
``inception_resnet_v2``, timm names), plus ``tiny``: a two-convolution network of this
package for tests and demos on a CPU.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["HEADS", "TinyBackbone", "build_network"]

HEADS: tuple[str, ...] = ("plain", "bcnn", "fast-bcnn")


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
        weights: ``None`` (random init), ``"imagenet"`` or a local state-dict path.
        se_reduction: SE reduction ratio inside the backbone (paper: 8), or ``None``.
        dropout: dropout before the classifier.
        **kwargs: passed on to ``bilinearpool.build_model``.

    Raises:
        ValueError: for an unknown head or ImageNet weights for ``tiny``.
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
    net: nn.Module | str = backbone
    if backbone == "tiny":
        if weights == "imagenet":
            raise ValueError("backbone 'tiny' has no ImageNet weights; use --no-pretrained")
        net = TinyBackbone()
    return build_model(
        head, net, num_classes=num_classes, weights=weights, se_reduction=se_reduction,
        dropout=dropout, **kwargs,
    )
