"""Squeeze-and-excitation (Hu, Shen & Sun, CVPR 2018) and its insertion into backbones."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .functional._checks import (
    check_dtype,
    check_floating,
    check_input_dtype,
    check_positive_int,
    make_layer,
)

__all__ = ["SEBlock", "insert_se_blocks"]


class SEBlock(nn.Module):
    """Squeeze-and-excitation: reweight channels by a gate computed from their means.

    ``x * gate(fc2(act(fc1(mean(x)))))`` with a bottleneck of ``channels // reduction``
    units (Hu, Shen & Sun, "Squeeze-and-Excitation Networks", CVPR 2018). Liu, Juhas &
    Zhang (2020) use ``reduction=8`` inside the backbone's blocks
    (see :func:`insert_se_blocks`).

    Args:
        channels: number of input channels :math:`C`.
        reduction: ratio :math:`r`; the bottleneck has ``max(1, C // r)`` units.
        act_layer: factory of the bottleneck activation.
        gate_layer: factory of the gate (sigmoid in the paper).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - Input: :math:`(B, C, H, W)` or tokens :math:`(B, N, C)`.
        - Output: same shape as the input.

    Examples:
        >>> import torch
        >>> se = SEBlock(64, reduction=8)
        >>> se(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 7, 7])
        >>> se.hidden
        8
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 8,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        gate_layer: Callable[[], nn.Module] = nn.Sigmoid,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        channels = check_positive_int("channels", channels)
        reduction = check_positive_int("reduction", reduction)
        self.channels = channels
        self.reduction = reduction
        self.hidden = max(1, channels // reduction)
        factory = {"device": device, "dtype": check_dtype(dtype)}
        self.fc1 = nn.Linear(channels, self.hidden, **factory)  # type: ignore[arg-type]
        self.act = make_layer(act_layer, "act_layer", "nn.ReLU")
        self.fc2 = nn.Linear(self.hidden, channels, **factory)  # type: ignore[arg-type]
        self.gate = make_layer(gate_layer, "gate_layer", "nn.Sigmoid")

    def reset_parameters(self) -> None:
        """Re-initialise both linear layers as ``nn.Linear`` does."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        check_floating(x)
        if x.dim() == 4:
            channel_dim, squeeze_dims = 1, (2, 3)
        elif x.dim() == 3:
            channel_dim, squeeze_dims = 2, (1,)
        else:
            raise ValueError(
                "SEBlock expects a feature map (B, C, H, W) or tokens (B, N, C), "
                f"but got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
            )
        if not torch.jit.is_tracing() and x.shape[channel_dim] != self.channels:
            raise ValueError(
                f"SEBlock was built for {self.channels} channels, but the input has "
                f"{x.shape[channel_dim]} (shape {tuple(x.shape)})"
            )
        check_input_dtype(x, self.fc1.weight, "SEBlock", convert="the block")
        weights = self.gate(self.fc2(self.act(self.fc1(x.mean(dim=squeeze_dims)))))
        if x.dim() == 4:
            return x * weights[:, :, None, None]
        return x * weights[:, None, :]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, hidden={self.hidden}"


def _conv_out(branch: nn.Module) -> int:
    """Output channels of a torchvision ``BasicConv2d`` (or of a plain convolution)."""
    conv = getattr(branch, "conv", branch)
    return int(conv.out_channels)


def _conv_in(branch: nn.Module) -> int:
    conv = getattr(branch, "conv", branch)
    return int(conv.in_channels)


# Output channels of torchvision's Inception-v3 modules: the concatenation of their branches
# (reduction modules B and D pass their input through a max-pool branch).
_INCEPTION_OUT: dict[str, Callable[[nn.Module], int]] = {
    "InceptionA": lambda m: sum(
        _conv_out(getattr(m, n)) for n in ("branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool")
    ),
    "InceptionB": lambda m: _conv_out(m.branch3x3) + _conv_out(m.branch3x3dbl_3) + _conv_in(m.branch3x3),
    "InceptionC": lambda m: sum(
        _conv_out(getattr(m, n)) for n in ("branch1x1", "branch7x7_3", "branch7x7dbl_5", "branch_pool")
    ),
    "InceptionD": lambda m: _conv_out(m.branch3x3_2) + _conv_out(m.branch7x7x3_4) + _conv_in(m.branch3x3_1),
    "InceptionE": lambda m: sum(
        _conv_out(getattr(m, n))
        for n in ("branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")
    ),
}


#: Where the Inception-v3 modules of _INCEPTION_OUT come from (same branch layout).
_INCEPTION_V3_MODULES = ("torchvision", "timm.models.inception_v3")

#: Attributes of timm's ResNet blocks that hold their own attention (SE-ResNet, ECA, ...).
_ATTENTION_ATTRS = ("se", "attn")


def _se_site(module: nn.Module) -> tuple[str, int] | None:
    """Where SE goes inside ``module``: (child to follow with SE, its channels), or None.

    ResNet blocks (torchvision and timm) and Inception-ResNet blocks get SE on the
    residual branch before the addition, as SE-ResNet does; whole Inception modules are
    handled by the caller (SE on the module's output, as SE-Inception does).
    """
    kind = type(module).__name__
    # The norm after the branch's last convolution may be any layer (BatchNorm2d,
    # torchvision's FrozenBatchNorm2d, GroupNorm): the convolution gives the channels.
    for block, norm, conv in (("Bottleneck", "bn3", "conv3"), ("BasicBlock", "bn2", "conv2")):
        if (
            kind == block
            and isinstance(getattr(module, norm, None), nn.Module)
            and isinstance(getattr(module, conv, None), nn.Conv2d)
        ):
            return norm, getattr(module, conv).out_channels
    if kind in ("Block35", "Block17", "Block8") and isinstance(getattr(module, "conv2d", None), nn.Conv2d):
        return "conv2d", module.conv2d.out_channels
    return None


def _factory(module: nn.Module) -> dict[str, object]:
    """Device and floating dtype of ``module``'s first floating parameter (a new block matches it)."""
    for param in module.parameters():
        if param.is_floating_point():
            return {"device": param.device, "dtype": param.dtype}
    return {}


def _followed_by(inner: nn.Module, se: SEBlock) -> nn.Sequential:
    """``inner`` then ``se``, all in ``inner``'s training mode (other modes inside it untouched)."""
    se.train(inner.training)
    wrapper = nn.Sequential(inner, se)
    wrapper.training = inner.training
    return wrapper


def insert_se_blocks(model: nn.Module, *, reduction: int = 8) -> int:
    """Insert :class:`SEBlock` s inside a backbone's blocks, in place, as the paper does.

    Supported blocks: ResNet ``Bottleneck`` / ``BasicBlock`` (torchvision, timm; any norm
    layer) and Inception-ResNet ``Block35`` / ``Block17`` / ``Block8`` (timm), which get
    SE on the residual branch before the addition (SE-ResNet); Inception-v3 modules
    ``InceptionA``-``InceptionE`` (torchvision, timm), which get SE on their output
    (SE-Inception). ResNet blocks that hold attention of their own (timm's
    ``seresnet50``, ``ecaresnet50d``: an ``se`` module) are refused rather than gated
    twice.

    Insert SE *after* loading pretrained weights: wrapping a layer renames its
    parameters (``bn3.weight`` becomes ``bn3.0.weight``). The new blocks start with the
    default initialisation, on the device, in the floating dtype and in the training
    mode of the block they go into. Insert once: a model that
    already holds :class:`SEBlock` s (e.g. passed to a classifier with ``se_reduction``
    before, which modified it in place) is refused.

    Args:
        model: the backbone, modified in place.
        reduction: SE reduction ratio (8 in the paper).

    Returns:
        The number of SE blocks inserted.

    Raises:
        TypeError: when ``model`` is not an ``nn.Module`` (a name says how to build one).
        ValueError: when the model has none of the supported blocks, already has
            SEBlocks, or its blocks have attention of their own.

    Examples:
        >>> import torch
        >>> import torchvision
        >>> net = torchvision.models.resnet18()
        >>> insert_se_blocks(net, reduction=8)
        8
        >>> net(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    expected = "model must be an nn.Module (modified in place)"
    if isinstance(model, str):
        raise TypeError(
            f"{expected}, but got str {model!r}; build the model first (e.g. "
            f"torchvision.models.get_model({model!r}) or timm.create_model({model!r})), or let "
            f"build_backbone({model!r}, se_reduction={reduction!r}) build the backbone with SE blocks"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"{expected}, but got {type(model).__name__}")
    present = sum(isinstance(m, SEBlock) for m in model.modules())
    if present:
        raise ValueError(
            f"{type(model).__name__} already contains {present} SEBlocks: insert_se_blocks (or a classifier "
            "or build_backbone with se_reduction=) has modified it in place before. Pass a fresh model, "
            "or leave out se_reduction to use it as it is"
        )
    own = [
        f"{name}.{attr} ({type(getattr(module, attr)).__name__})"
        for name, module in model.named_modules()
        if _se_site(module) is not None
        for attr in _ATTENTION_ATTRS
        if isinstance(getattr(module, attr, None), nn.Module) and not isinstance(getattr(module, attr), nn.Identity)
    ]
    if own:
        raise ValueError(
            f"{type(model).__name__}'s blocks have channel attention of their own (e.g. {', '.join(own[:2])}; "
            f"{len(own)} blocks): SE would be a second gate on the same branch. Use the model as it "
            "is (leave out se_reduction), or its variant without attention (e.g. resnet50 for seresnet50)"
        )
    count = 0
    for name, module in list(model.named_modules()):
        site = _se_site(module)
        if site is not None:
            child, channels = site
            inner = getattr(module, child)
            se = SEBlock(channels, reduction=reduction, **(_factory(inner) or _factory(module)))
            setattr(module, child, _followed_by(inner, se))
            count += 1
    for name, module in list(model.named_modules()):
        out = _INCEPTION_OUT.get(type(module).__name__)
        if out is None or not name or not type(module).__module__.startswith(_INCEPTION_V3_MODULES):
            continue  # (timm's Inception-v4 has modules of the same names, other branches)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        se = SEBlock(out(module), reduction=reduction, **_factory(module))
        setattr(parent, child, _followed_by(module, se))
        count += 1
    if count == 0:
        kinds = sorted({type(m).__name__ for m in model.modules()})[:12]
        # a torch.fx feature extractor of a model whose blocks SE goes into (its class name
        # kept): its blocks are plain Modules now, and the SE blocks had to go in before
        traced = any(isinstance(m, torch.fx.GraphModule) for m in model.modules()) and bool(
            {type(m).__name__ for m in model.modules()} & {"ResNet", "Inception3", "InceptionResnetV2"}
        )
        raise ValueError(
            "insert_se_blocks found no supported block (ResNet Bottleneck/BasicBlock, Inception-v3 "
            f"modules, Inception-ResNet Block35/17/8) in {type(model).__name__}; it contains {kinds}"
            + (
                "; it is a feature extractor (torch.fx), whose blocks are plain Modules now: insert "
                "the SE blocks into the model before it is cut (build_backbone(..., se_reduction=r) "
                "or the classifiers' se_reduction= do so)" if traced else ""
            )
        )
    return count
