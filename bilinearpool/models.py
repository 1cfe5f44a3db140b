"""Classifiers that put a pooling head on any backbone: BCNN, Fast BCNN and the plain baseline.

All share one shape: backbone(s) -> optional channel reduction -> pooling ->
optional dropout -> a linear classifier (:class:`~bilinearpool.WideLinear`, an
``nn.Linear``). They expose the pieces that analysis needs:
:meth:`~BilinearClassifier.forward_features` (the feature map),
:meth:`~BilinearClassifier.forward_embedding` (pre-logits, e.g. for t-SNE),
:attr:`~BilinearClassifier.gradcam_layers` (the modules whose outputs are the streams'
last feature maps, e.g. for ``captum.attr.LayerGradCam``; one per stream),
:attr:`~BilinearClassifier.gradcam_layer` (the first of them) and ``classifier``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .backbones import (
    FeatureExtractor,
    WeightsArg,
    _first_float_param,
    _in_eval_mode,
    _is_timm_name,
    _last_map,
    _meta_pass,
    _prober,
    _to_nchw,
    build_backbone,
)
from .compact import CompactBilinearPool
from .functional._checks import (
    as_channel_matrix,
    check_dtype,
    check_flags,
    check_floating,
    check_input_dtype,
    check_optional_positive_int,
    check_positive_int,
    check_real,
    plural,
)
from .functional.bilinear import triu_fold
from .functional.head import _classifier_keeps_features, _features_as_weight, fast_bilinear_linear
from .linear import WideLinear
from .lowrank import LowRankBilinearPool
from .matrix_sqrt import MatrixSqrt
from .norm import L2Normalize, SignedSqrt
from .pooling import BilinearPool, FastBilinearPool

__all__ = [
    "BCNN",
    "BilinearClassifier",
    "ChannelReduction",
    "FastBCNN",
    "GAPClassifier",
    "GlobalAvgPool",
    "HEADS",
    "build_model",
]


class ChannelReduction(nn.Sequential):
    """1x1 convolution, batch norm and ReLU: fewer channels before second-order pooling.

    As used by iSQRT-COV (Li et al., CVPR 2018) to reduce 2048 channels to 256, which
    shrinks a :math:`C^2` bilinear feature 64-fold.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        device: device of the parameters.
        dtype: floating dtype of the parameters.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`.
        - Output: :math:`(B, C_{out}, H, W)`.

    Examples:
        >>> ChannelReduction(2048, 256)(torch.randn(2, 2048, 7, 7)).shape
        torch.Size([2, 256, 7, 7])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        in_channels = check_positive_int("in_channels", in_channels)
        out_channels = check_positive_int("out_channels", out_channels)
        factory = {"device": device, "dtype": check_dtype(dtype)}
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False, **factory),
            nn.BatchNorm2d(out_channels, **factory),
            nn.ReLU(inplace=True),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels

    def reset_parameters(self) -> None:
        """Re-initialise the convolution (as ``nn.Conv2d``) and the batch norm (unit scale,
        zero shift, fresh running statistics)."""
        self[0].reset_parameters()
        self[1].reset_parameters()

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Sequential's name: layer(input=...) works
        check_floating(input)
        # (sizes are traced values in torch.jit.trace: see functional._checks.as_channel_matrix)
        if input.dim() != 4 or (not torch.jit.is_tracing() and input.shape[1] != self.in_channels):
            raise ValueError(
                f"ChannelReduction expected feature maps (B, {self.in_channels}, H, W), but got "
                f"shape {tuple(input.shape)}" + (
                    "; token sequences (B, N, C) need a linear layer instead (a 1x1 convolution "
                    "takes maps only)" if input.dim() == 3 else ""))
        check_input_dtype(input, self[0].weight, "ChannelReduction")
        return super().forward(input)


def _in_backbone(name: str) -> bool:
    """Whether a parameter name of a classifier belongs to its backbone(s).
    (``named_parameters`` lists a module shared by both streams once.)"""
    return name.partition(".")[0] in ("backbone", "backbone_b")


class GlobalAvgPool(nn.Module):
    """Mean over locations: the first-order pooling of the plain baseline.

    Global average pooling as in Lin, Chen & Yan, "Network In Network" (ICLR 2014), and
    at the end of ResNet and Inception.

    Shape:
        - Input: :math:`(B, C, H, W)` or tokens :math:`(B, N, C)`.
        - Output: :math:`(B, C)`.

    Examples:
        >>> GlobalAvgPool()(torch.ones(2, 5, 3, 3)).shape
        torch.Size([2, 5])
    """

    def output_dim(self, in_channels: int, in_channels_b: int | None = None) -> int:
        """Length of the pooled vector: ``in_channels``.

        Raises:
            ValueError: for two streams (``in_channels_b`` given): the mean pools one.
        """
        if in_channels_b is not None:
            raise ValueError(
                f"GlobalAvgPool pools one stream, but got two ({in_channels} and "
                f"{in_channels_b} channels); give the classifier one backbone, or a "
                "two-stream pool such as BilinearPool")
        return check_positive_int("in_channels", in_channels)

    def forward(self, x: Tensor) -> Tensor:
        return as_channel_matrix(x).mean(dim=2)  # checked: no channels or no locations is an error


def _check_features(z: Tensor, x: Tensor, weight: Tensor | None) -> None:
    """TypeError unless the classifier (first floating parameter ``weight``) takes the
    pooled features ``z`` of the images ``x`` in their dtype (:func:`check_input_dtype`)."""
    if weight is not None and z.dtype != weight.dtype:
        check_input_dtype(z, weight, "the classifier", f"pooled features (of {x.dtype} images)", "the model")


def _output_dim(
    pool: nn.Module,
    c_a: int,
    c_b: int | None,
    *,
    tokens_a: bool = False,
    tokens_b: bool = False,
    source: str = "the backbone",
) -> int:
    """Features per sample that ``pool`` gives: its ``output_dim`` or dry runs (flattened).

    The dry runs feed what the backbones give: maps :math:`(2, C, H, W)`, or tokens
    :math:`(2, N, C)` for a stream whose backbone gives tokens (``tokens_a``/``tokens_b``).
    ``source`` says where the channels come from, for the error of a pool that refuses them.
    """
    if isinstance(pool, (MatrixSqrt, SignedSqrt, L2Normalize)):  # no maps in, though a
        # MatrixSqrt's output_dim would give a length for the classifier
        takes = ("the (B, C, C) matrices of a pooling; for iSQRT-COV use "
                 "CovariancePool(norm=MatrixSqrt())" if isinstance(pool, MatrixSqrt) else
                 "pooled features; FastBilinearPool has signed square root and L2 built in")
        raise ValueError(
            f"pool must take feature maps (B, C, H, W) and pool them, but got "
            f"{type(pool).__name__}, a normalisation: it takes {takes}"
        )
    if hasattr(pool, "output_dim"):
        try:
            return int(pool.output_dim(c_a) if c_b is None else pool.output_dim(c_a, c_b))
        except ValueError as err:  # e.g. a pool built for other channels
            channels = f"{c_a} channels" if c_b is None else f"{c_a} and {c_b} channels"
            raise ValueError(
                f"pool {type(pool).__name__} does not fit the feature maps it gets: {channels} "
                f"from {source}; {err}"
            ) from err
    param = next((p for p in pool.parameters() if p.is_floating_point()), None)
    factory = {"device": param.device, "dtype": param.dtype} if param is not None else {}

    def sample(channels: int, hw: tuple[int, int], tokens: bool) -> Tensor:
        shape = (2, hw[0] * hw[1], channels) if tokens else (2, channels, *hw)
        return torch.rand(*shape, **factory)

    sizes = {}
    with _in_eval_mode(pool):
        with torch.no_grad():
            for hw in ((3, 3), (5, 5)):  # two map sizes: the length must not depend on them
                x = sample(c_a, hw, tokens_a)
                y = None if c_b is None else sample(c_b, hw, tokens_b)
                try:
                    out = pool(x) if y is None else pool(x, y)
                except Exception as err:  # noqa: BLE001 - whatever the pool raises: re-raised, chained
                    # (the streams give the same kind of features: checked before)
                    inputs = f"{'tokens' if tokens_a else 'maps'} {tuple(x.shape)}"
                    inputs += "" if y is None else f" and {tuple(y.shape)}"
                    raise ValueError(
                        f"the dry run of pool {type(pool).__name__} on {inputs} failed "
                        f"({type(err).__name__}: {str(err).strip()}); it reads the length of the pooled "
                        "features for the classifier: a pool that needs other sizes should have an "
                        "output_dim(in_channels, in_channels_b=None) method that returns that length"
                    ) from err
                if not isinstance(out, Tensor) or out.dim() < 2:
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(
                        f"pool must return (B, D) or (B, ...), but {type(pool).__name__} returned {shape}"
                    )
                sizes[hw] = int(out[0].numel())
    if len(set(sizes.values())) > 1:
        small, large = ("9 tokens", "25") if tokens_a else ("3x3 maps", "5x5")
        raise ValueError(
            f"{type(pool).__name__}'s output length depends on the feature map's size "
            f"({sizes[3, 3]} features per sample on {small}, {sizes[5, 5]} on {large}), so the "
            "classifier's input size cannot be read from a dry run; give the pool an "
            "output_dim(in_channels, in_channels_b=None) method that returns it for your input size"
        )
    return sizes[3, 3]


def _backbone_options(
    weights: WeightsArg,
    se_reduction: int | None,
    node: str | None,
    sample_shape: tuple[int, ...] | None,
    output_fmt: str | None,
) -> dict[str, object]:
    """The classifiers' options for :func:`~bilinearpool.build_backbone`."""
    return {
        "weights": weights,
        "se_reduction": se_reduction,
        "node": node,
        "sample_shape": sample_shape,
        "output_fmt": output_fmt,
    }


def _names_timm(backbone: str | nn.Module) -> bool:
    """Whether ``backbone`` is a name that :func:`~bilinearpool.build_backbone` resolves as timm's."""
    return isinstance(backbone, str) and _is_timm_name(backbone)


#: Hooks that must see the pooling and the classifier run as modules: per module and global.
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _hooked(*modules: nn.Module) -> bool:
    """Whether forward or backward hooks (the modules' own or global ones) would see these modules' calls."""
    glob = torch.nn.modules.module
    if any(getattr(glob, name, None) for name in _GLOBAL_HOOKS):
        return True
    return any(getattr(m, name, None) for m in modules for name in _MODULE_HOOKS)


def _check_maps_for_reduction(stream: FeatureExtractor, reduce_dim: int) -> None:
    """ChannelReduction is a 1x1 convolution: refuse it for a backbone that gives tokens."""
    if stream.tokens:
        raise ValueError(
            f"reduce_dim={reduce_dim} adds a ChannelReduction (a 1x1 convolution), which takes feature "
            f"maps (B, C, H, W), but backbone {stream.name!r} gives tokens (B, N, {stream.out_channels}); "
            "leave out reduce_dim, or cut the backbone at a feature map"
        )


def _token_mismatch(a: FeatureExtractor, n_a: int, b: FeatureExtractor, n_b: int, where: str) -> ValueError:
    """The error for two token streams of different lengths: ``where`` says at which image size."""
    return ValueError(
        f"the two streams must give the same number of tokens N, but backbone_a ({a.name!r}) gives {n_a} "
        f"and backbone_b ({b.name!r}) {n_b} {where}; tokens are paired token by token and cannot be "
        "resized as feature maps are (BilinearPool(resize=...)): use backbones with the same patch size "
        "at the same image size, or cut them at feature maps (B, C, H, W)"
    )


def _token_count(stream: FeatureExtractor, channels: int, size: tuple[int, int]) -> int | None:
    """The number of tokens N that ``stream`` gives for images of ``channels`` and ``size``,
    from a pass on the meta device (shapes only: no computation, no memory, the weights
    untouched); ``None`` where the network does not run there (or gives no tokens)."""
    param = _first_float_param(stream)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    try:
        out = _meta_pass(stream, torch.zeros(2, channels, *size, device="meta", dtype=dtype))
    except Exception:  # noqa: BLE001 - e.g. an operation without a meta kernel: forward checks the counts
        return None
    return int(out.shape[1]) if isinstance(out, Tensor) and out.dim() == 3 else None


def _check_token_counts(a: FeatureExtractor, b: FeatureExtractor) -> None:
    """Refuse two token streams whose numbers of tokens differ, where the build can tell: the
    model takes one image size (a stream says so, as ViTs do), or neither count depends on
    the image size. Otherwise :meth:`BilinearClassifier.forward_features` checks them."""
    if a.image_size is not None and b.image_size is not None and a.image_size != b.image_size:
        raise ValueError(
            f"one image feeds both streams, but backbone_a ({a.name!r}) takes {a.image_size[0]} x "
            f"{a.image_size[1]} images only and backbone_b ({b.name!r}) {b.image_size[0]} x "
            f"{b.image_size[1]}; use backbones that take the same image size"
        )
    channels = [s.in_channels or a.in_channels or b.in_channels or 3 for s in (a, b)]
    size = a.image_size or b.image_size
    if size is not None:
        counts = [_token_count(s, c, size) for s, c in zip((a, b), channels)]
        where = f"at {size[0]} x {size[1]} images, the one size the model takes"
    else:
        sizes = ((128, 128), (64, 64))  # build_backbone's default sample size, and half of it
        probes = [[_token_count(s, c, hw) for hw in sizes] for s, c in zip((a, b), channels)]
        if any(n is None or n != row[0] for row in probes for n in row):
            return  # a count that depends on the image size, which the build does not know
        counts, where = [row[0] for row in probes], "at any image size"
    n_a, n_b = counts
    if n_a is not None and n_b is not None and n_a != n_b:
        raise _token_mismatch(a, n_a, b, n_b, where)


#: Image sides at which :func:`_check_map_sizes` compares the streams' maps: where two
#: streams of one stride but other padding meet, one of them is likely among these.
_MAP_CHECK_SIDES = (224, 299, 331, 448)


def _map_sizer(stream: FeatureExtractor) -> Callable[[int, tuple[int, int]], tuple[int, int] | None]:
    """A function giving the ``(H, W)`` of ``stream``'s map for images of given channels and
    size, from passes of its network on the meta device (shapes only, one meta copy for
    all sizes); ``None`` where the network does not run there or gives no map."""
    param = _first_float_param(stream)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    run = _prober(stream.body)

    def size(channels: int, hw: tuple[int, int]) -> tuple[int, int] | None:
        try:
            out = _to_nchw(_last_map(run(torch.zeros(2, channels, *hw, device="meta", dtype=dtype))),
                           stream.output_fmt)
        except Exception:  # noqa: BLE001 - e.g. an operation without a meta kernel: no verdict
            return None
        return (int(out.shape[2]), int(out.shape[3])) if out.dim() == 4 else None

    return size


#: The library's two-stream pools that take maps of one size (BilinearPool unless it
#: resizes); exact types: a subclass may bring the maps to one size itself.
_ONE_SIZE_POOLS = (BilinearPool, CompactBilinearPool, LowRankBilinearPool)


def _check_map_sizes(
    pool: nn.Module, a: FeatureExtractor, b: FeatureExtractor, sample_shape: tuple[int, ...] | None
) -> None:
    """Refuse two map streams that give maps of different sizes at every image size tried
    when ``pool`` is one of the library's pools that take maps of one size: such a model
    fails at its first forward at those sizes (at all sizes but tiny ones for streams of
    two strides), with an advice to resize that the classifier gives no place to follow.

    The sizes tried: the one the model takes, else ``sample_shape``'s and
    :data:`_MAP_CHECK_SIDES`; the first where both maps have one size ends the check, as
    does a size where either network does not run on the meta device.
    """
    if type(pool) not in _ONE_SIZE_POOLS or getattr(pool, "resize", None) is not None:
        return
    fixed = a.image_size or b.image_size
    channels = a.in_channels or b.in_channels or (sample_shape[0] if sample_shape else 3)
    sizes: list[tuple[int, int]] = [fixed] if fixed else []
    if not fixed:
        if sample_shape is not None and len(sample_shape) == 3:
            sizes.append((int(sample_shape[1]), int(sample_shape[2])))
        sizes += [(s, s) for s in _MAP_CHECK_SIDES if (s, s) not in sizes]
    size_a, size_b = _map_sizer(a), _map_sizer(b)
    seen = []
    for hw in sizes:
        hw_a, hw_b = size_a(channels, hw), size_b(channels, hw)
        if hw_a is None or hw_b is None or hw_a == hw_b:
            return
        seen.append(f"{hw[0]} x {hw[1]} images: {hw_a[0]} x {hw_a[1]} and {hw_b[0]} x {hw_b[1]}")
    what = ("BilinearPool without resize" if type(pool) is BilinearPool
            else f"{type(pool).__name__} (which does not resize its inputs)")
    raise ValueError(
        f"the two streams' feature maps must have one size for {what}, but backbone_a "
        f"({a.name!r}) and backbone_b ({b.name!r}) give maps of different sizes at every image "
        f"size tried ({'; '.join(seen)}); use pool=BilinearPool(resize='bilinear', normalize=True) "
        "(BCNN's default, which resizes the second map to the first), or backbones (or node= "
        "cuts) whose maps have one size"
    )


def _pairs_maps_itself(cls: type) -> bool:
    """Whether a classifier class overrides how the maps reach the pool (it may bring them
    to one size itself): then :func:`_check_map_sizes` does not judge them."""
    return any(getattr(cls, name) is not getattr(BilinearClassifier, name)
               for name in ("forward_features", "forward_embedding", "_pool"))


def _check_stream_dtypes(a: FeatureExtractor, b: FeatureExtractor | None) -> None:
    """Refuse two backbones whose floating-point parameters differ in dtype: one head in one
    dtype cannot take both streams (the model failed at its first forward)."""
    pa = _first_float_param(a)
    pb = None if b is None else _first_float_param(b)
    if pa is not None and pb is not None and pa.dtype != pb.dtype:
        raise TypeError(
            f"the two backbones must have parameters of one dtype, but {a.name!r} has {pa.dtype} and "
            f"{b.name!r} {pb.dtype}: build both in one dtype (e.g. the second with .to({pa.dtype})), "
            "and convert the whole model after building if another dtype is wanted (e.g. model.double())"
        )


def _check_pool_dtype(pool: nn.Module, streams: tuple[FeatureExtractor | None, ...]) -> None:
    """Refuse a pool whose floating-point parameters are not of the backbones' dtype (e.g. a
    float64 LowRankBilinearPool, which computes in float64, in a float32 model, whose
    classifier refuses its features at the first forward). Buffers are not compared: a
    pool's fixed tensors (CompactBilinearPool's sketches) follow the input's dtype. Nothing
    to compare for backbones without parameters."""
    reference = _reference_param(*streams)
    if reference is None:
        return
    for name, t in pool.named_parameters():
        if t.is_floating_point() and t.dtype != reference.dtype:
            raise TypeError(
                f"pool {type(pool).__name__} has a {t.dtype} parameter ({name}), but the backbone's parameters "
                f"are {reference.dtype}: build the pool in the model's dtype (dtype={reference.dtype}), or "
                "build every part in one dtype and call .to(dtype) on the whole model after building "
                "(e.g. model.double())"
            )


def _reference_param(*streams: FeatureExtractor | None) -> Tensor | None:
    """The first floating parameter of the streams (``None`` for backbones without any)."""
    params = (_first_float_param(stream) for stream in streams if stream is not None)
    return next((p for p in params if p is not None), None)


def _factory(*streams: FeatureExtractor | None) -> dict[str, object]:
    """``device`` and ``dtype`` of the streams' parameters, for the head's layers (nothing
    for backbones without parameters: the defaults)."""
    reference = _reference_param(*streams)
    return {} if reference is None else {"device": reference.device, "dtype": reference.dtype}


def _check_head_args(num_classes: object, dropout: object, reduce_dim: object) -> None:
    """Configuration errors of the classifiers, raised before any backbone is built."""
    check_positive_int("num_classes", num_classes)
    check_real("dropout", dropout, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
    check_optional_positive_int("reduce_dim", reduce_dim)


def _differing_streams(state_dict: Mapping[str, Any], prefix_a: str, prefix_b: str) -> list[str]:
    """Keys (after the prefixes) whose entries under ``prefix_a`` and ``prefix_b`` are not equal."""
    differ = []
    for key, value in state_dict.items():
        if not key.startswith(prefix_a) or prefix_b + key[len(prefix_a) :] not in state_dict:
            continue
        other = state_dict[prefix_b + key[len(prefix_a) :]]
        if not (isinstance(value, Tensor) and isinstance(other, Tensor)):
            continue
        if value.is_meta or other.is_meta:
            continue
        if value.shape != other.shape or value.dtype != other.dtype:
            differ.append(key[len(prefix_a) :])
            continue
        if value.device == other.device and value.data_ptr() == other.data_ptr() and value.stride() == other.stride():
            continue  # one tensor twice, as a shared model saves it
        other = other.to(value.device)
        # NaN equals NaN here: a shared model's own entries are equal whatever they hold
        same = (
            torch.isclose(value, other, rtol=0.0, atol=0.0, equal_nan=True).all()
            if value.is_floating_point() or value.is_complex()
            else torch.equal(value, other)
        )
        if not same:
            differ.append(key[len(prefix_a) :])
    return differ


class BilinearClassifier(nn.Module):
    """Backbone(s), optional channel reduction, a pooling, dropout and a linear classifier.

    The common base of :class:`BCNN`, :class:`FastBCNN` and :class:`GAPClassifier`; use
    it directly to put any pooling on any backbone (one stream when ``backbone_b`` is
    ``None`` and ``pool`` takes one feature map).

    Args:
        backbone_a: backbone of the first stream (name, model or module, see
            :func:`~bilinearpool.build_backbone`).
        backbone_b: backbone of the second stream, or ``None`` for one stream. The very
            module of ``backbone_a`` again shares it: one pass feeds both streams. Both
            must give the same kind of features; two token streams must give the same
            number of tokens (tokens cannot be resized as maps are): ValueError when built
            where the counts are known (a model that takes one image size, such as a ViT,
            or counts that do not depend on the image size), else at the first forward.
            Two map streams whose maps differ in size at every image size tried (the
            one the model takes, else ``sample_shape``'s and 224, 299, 331 and 448
            pixels) are refused when built (ValueError) with the library's pools that
            take maps of one size (:class:`BilinearPool` without ``resize``,
            :class:`CompactBilinearPool`, :class:`LowRankBilinearPool`; not their
            subclasses, nor in a subclass that changes how the maps reach the pool).
        pool: pooling module, ``(B, C, H, W) -> (B, D)`` (two-stream pools take two maps).
            :math:`D` comes from its ``output_dim(C_1[, C_2])`` method if it has one (which
            may raise ValueError for channels it does not take, e.g. a pool built with
            other ``in_channels``), else from dry runs on small maps (3 x 3 and 5 x 5), or
            on tokens for a backbone that gives tokens (ValueError if :math:`D` depends on
            their size, or if the pool fails on them: a pool that needs larger maps
            should have ``output_dim``). A normalisation layer (:class:`MatrixSqrt`,
            :class:`SignedSqrt`, :class:`L2Normalize`) is not a pooling: ValueError.
            Its floating-point parameters must have the dtype of the backbones'
            parameters (TypeError otherwise): build it in the model's dtype,
            or call ``.to(dtype)`` on the whole model after building.
        num_classes: number of classes.
        reduce_dim: if set, a :class:`ChannelReduction` to this many channels per stream
            (feature maps only: ValueError for a backbone that gives tokens).
        dropout: dropout probability before the classifier.
        weights, se_reduction, node, sample_shape, output_fmt: passed to
            :func:`~bilinearpool.build_backbone` for backbones given by name or as models
            (a :class:`~bilinearpool.FeatureExtractor` takes none of them: ValueError);
            ``output_fmt="NHWC"`` for a module whose maps are channels-last and that does
            not say so itself.

    The channel reduction and the classifier are built on the device and in the dtype of
    the backbones' parameters (a ``bfloat16`` backbone gets a ``bfloat16`` classifier).

    Pooled features of more than two dimensions (e.g. the :math:`(B, C_1, C_2)` of a
    :class:`~bilinearpool.BilinearPool` without ``normalize``) are flattened to
    :math:`(B, D)` before the classifier.

    For Grad-CAM, :attr:`gradcam_layers` are the modules whose outputs are the streams'
    last feature maps (one per stream); :attr:`gradcam_layer` is the first stream's only.

    The input is checked by the backbones (:class:`~bilinearpool.FeatureExtractor`): where a
    backbone's input is known (a name, a torchvision or timm model, a module given with
    ``sample_shape``), anything but images :math:`(B, C_{in}, H, W)` of the parameters'
    floating dtype (under ``torch.autocast`` float16, bfloat16 or float32, not float64, which
    autocast leaves alone) raises a ValueError (shape)
    or TypeError (dtype; for ``uint8`` images it says how to convert them) before the
    backbone runs; for other modules an input of a dtype their parameters cannot take is
    reported as a TypeError when the module fails on it.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`, :math:`C_{in} = 3` for named backbones.
        - Output: :math:`(B, \\text{num\\_classes})`.

    Examples:
        >>> a = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
        >>> b = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
        >>> model = BilinearClassifier(a, b, pool=BilinearPool(), num_classes=3)  # raw (B, 8, 4)
        >>> model(torch.randn(2, 3, 16, 16)).shape, model.embedding_dim
        (torch.Size([2, 3]), 32)
    """

    def __init__(
        self,
        backbone_a: str | nn.Module,
        backbone_b: str | nn.Module | None = None,
        *,
        pool: nn.Module,
        num_classes: int,
        reduce_dim: int | None = None,
        dropout: float = 0.0,
        weights: WeightsArg = None,
        se_reduction: int | None = None,
        node: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
        output_fmt: str | None = None,
    ) -> None:
        super().__init__()
        _check_head_args(num_classes, dropout, reduce_dim)
        num_classes, dropout = int(num_classes), float(dropout)
        reduce_dim = None if reduce_dim is None else int(reduce_dim)
        if not isinstance(pool, nn.Module):
            hint = (f": pass an instance, {pool.__name__}()"
                    if isinstance(pool, type) and issubclass(pool, nn.Module) else "")
            raise TypeError(f"pool must be an nn.Module, but got {type(pool).__name__}{hint}")
        options = _backbone_options(weights, se_reduction, node, sample_shape, output_fmt)
        self.backbone = self._resolve(backbone_a, options, backbone_b)
        if isinstance(backbone_b, nn.Module) and backbone_b is backbone_a:
            self.backbone_b = self.backbone  # one module in both streams: run once, see forward_features
        else:
            self.backbone_b = None if backbone_b is None else self._resolve(backbone_b, options, backbone_a)
        if self.backbone_b is not None and self.backbone.tokens != self.backbone_b.tokens:
            kinds = {True: "tokens (B, N, C)", False: "feature maps (B, C, H, W)"}
            raise ValueError(
                "the two streams must give the same kind of features, but "
                f"{self.backbone.name!r} gives {kinds[self.backbone.tokens]} and "
                f"{self.backbone_b.name!r} gives {kinds[self.backbone_b.tokens]}"
            )
        if self.backbone_b is not None and self.backbone_b is not self.backbone and self.backbone.tokens:
            _check_token_counts(self.backbone, self.backbone_b)
        _check_stream_dtypes(self.backbone, self.backbone_b)
        _check_pool_dtype(pool, (self.backbone, self.backbone_b))
        if (self.backbone_b is not None and self.backbone_b is not self.backbone and not self.backbone.tokens
                and not _pairs_maps_itself(type(self))):
            _check_map_sizes(pool, self.backbone, self.backbone_b, sample_shape)
        if reduce_dim:
            for stream in (self.backbone, self.backbone_b):
                if stream is not None:
                    _check_maps_for_reduction(stream, reduce_dim)
        c_a = self.backbone.out_channels
        c_b = None if self.backbone_b is None else self.backbone_b.out_channels
        # The head's layers on the backbones' device and dtype (a bfloat16 or CUDA backbone
        # gives a bfloat16 or CUDA head, as .to() on the whole model would).
        factory = _factory(self.backbone, self.backbone_b)
        self.reduce = ChannelReduction(c_a, reduce_dim, **factory) if reduce_dim else nn.Identity()
        self.reduce_b = None
        if reduce_dim:
            c_a = reduce_dim
            if c_b is not None:
                self.reduce_b = ChannelReduction(c_b, reduce_dim, **factory)
                c_b = reduce_dim
        self.pool = pool
        self._pool_channels = c_a  # channels into the pooling (for load_state_dict's errors)
        self.embedding_dim = _output_dim(
            pool,
            c_a,
            c_b,
            tokens_a=self.backbone.tokens,
            tokens_b=getattr(self.backbone_b, "tokens", False),
            source=f"reduce_dim={reduce_dim}" if reduce_dim else f"the backbone{'' if c_b is None else 's'}",
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = WideLinear(self.embedding_dim, num_classes, **factory)
        self.num_classes = num_classes

    @staticmethod
    def _resolve(
        backbone: str | nn.Module, options: dict, other: str | nn.Module | None = None
    ) -> FeatureExtractor:
        """``backbone`` as a stream, built with the classifier's ``options``; ``other``: the
        other stream's backbone, of a two-stream model."""
        # build_backbone returns a FeatureExtractor as it is, and refuses options for it.
        given = {k: v for k, v in options.items() if v is not None}
        if "sample_shape" in given and _names_timm(backbone) and other is not None and not _names_timm(other):
            # a timm model knows its input (build_backbone refuses sample_shape for it alone):
            # beside another stream, the sample shape is that stream's
            del given["sample_shape"]
        return build_backbone(backbone, **given)

    @property
    def gradcam_layer(self) -> nn.Module:
        """The module whose output is the first stream's last feature map.

        For a two-stream model it leaves out the second stream; Grad-CAM of the whole
        model uses all of :attr:`gradcam_layers` (kept for code written for one stream).
        """
        return self.backbone

    @property
    def gradcam_layers(self) -> tuple[nn.Module, ...]:
        """The modules whose outputs are the streams' last feature maps, one per stream.

        ``(backbone,)`` for one stream, ``(backbone, backbone_b)`` for two: the backbones'
        outputs, before the optional channel reduction, as for :attr:`gradcam_layer`
        (which is the first). A backbone shared by both streams (``BCNN(shared=True)``)
        is listed once: its one map feeds both streams, so its gradient already sums
        their contributions.

        Grad-CAM of a two-stream model takes the maps together: channel :math:`k` of
        stream :math:`s` is weighed by the spatial mean :math:`\\bar{g}^s_k` of
        :math:`\\partial y / \\partial A^s_k` (:math:`y` the class score), and the
        streams' weighted sums, brought to one size, are added before the ReLU:
        :math:`\\mathrm{ReLU}(\\sum_s \\sum_k \\bar{g}^s_k A^s_k)`. With captum: one
        ``LayerGradCam`` per layer, ``relu_attributions=False``, each map upsampled to
        the input size, summed, then the ReLU.

        Examples:
            >>> a = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
            >>> b = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU())
            >>> two, one = BCNN(a, b, num_classes=3), FastBCNN(a, num_classes=3)
            >>> len(two.gradcam_layers), len(one.gradcam_layers)
            (2, 1)
            >>> two.gradcam_layers == (two.backbone, two.backbone_b)
            True
        """
        if self.backbone_b is None or self.backbone_b is self.backbone:
            return (self.backbone,)
        return (self.backbone, self.backbone_b)

    def forward_features(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Feature map(s) after the optional channel reduction, before pooling.

        When both streams are the very same module (``BCNN(shared=True)``), it runs once
        and its map feeds both.
        """
        f = self.backbone(x)
        fa = self.reduce(f)
        if self.backbone_b is None:
            return fa
        fb = f if self.backbone_b is self.backbone else self.backbone_b(x)
        # token counts the build could not check (they depend on the image size); sizes are
        # traced values in torch.jit.trace (see functional._checks.as_channel_matrix)
        if f.dim() == 3 and fb.dim() == 3 and not torch.jit.is_tracing() and f.shape[1] != fb.shape[1]:
            where = "on this input"
            if isinstance(x, Tensor) and x.dim() >= 2:
                where = f"at {x.shape[-2]} x {x.shape[-1]} images"
            raise _token_mismatch(self.backbone, int(f.shape[1]), self.backbone_b, int(fb.shape[1]), where)
        return fa, (fb if self.reduce_b is None else self.reduce_b(fb))

    def forward_embedding(self, x: Tensor) -> Tensor:
        """The pooled, normalised feature vector fed to the classifier: :math:`(B, D)`."""
        return self._pool(self.forward_features(x))

    def _pool(self, features: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        out = self.pool(*features) if isinstance(features, tuple) else self.pool(features)
        return out.flatten(1) if out.dim() > 2 else out

    def forward(self, x: Tensor) -> Tensor:
        """The logits. With a :class:`~bilinearpool.FastBilinearPool` and a linear
        classifier (no forward or backward hooks on them, neither their own nor global
        module hooks; dropout inactive) the pooling and the classifier are one call of
        :func:`~bilinearpool.functional.fast_bilinear_linear`, which for inference
        does not store the pooled features on CPU and reads the matrices once on CUDA;
        same values either way.
        With a normalising :class:`~bilinearpool.BilinearPool` (BCNN) and the same
        conditions, the pooling keeps its output for backward when the classifier keeps
        it anyway (``save_output``: no extra memory, no rebuilt matrices)."""
        if self._linear_head(BilinearPool) and self.pool.normalize:
            features = self.forward_features(x)
            first = features[0] if isinstance(features, tuple) else features
            keep = self.pool.save_output or _classifier_keeps_features(first, self.classifier.weight)
            streams = features if isinstance(features, tuple) else (features,)
            pooled = self.pool(*streams, save_output=keep)
            _check_features(pooled, x, self.classifier.weight)
            return self.classifier(pooled)
        if not self._fused_head():
            return self._classify(self.forward_embedding(x), x)
        features = self.forward_features(x)
        if isinstance(features, tuple):
            return self._classify(self._pool(features), x)
        return fast_bilinear_linear(features, self.classifier.weight, self.classifier.bias, **self.pool.options())

    def _classify(self, z: Tensor, x: Tensor) -> Tensor:
        """Dropout and classifier on the pooled ``z``; poolings that keep float32 for half
        precision input ``x`` hand the classifier its own dtype (a model made ``.half()``)."""
        weight = next((p for p in self.classifier.parameters() if p.is_floating_point()), None)
        z = _features_as_weight(z, x, weight)
        _check_features(z, x, weight)
        return self.classifier(self.dropout(z))

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The parameters of the backbone(s): ``backbone`` and ``backbone_b`` (each once,
        also when both streams share one module), for an optimizer's parameter group.

        With :meth:`head_parameters` it splits :meth:`parameters` in two, without
        overlap (an optimizer refuses a parameter in two groups, as a shared
        ``backbone_b`` would give), e.g. for a smaller learning rate on a pretrained
        backbone:

        Examples:
            >>> model = BCNN(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), num_classes=3, shared=True)
            >>> opt = torch.optim.SGD([
            ...     {"params": model.backbone_parameters(), "lr": 1e-3},
            ...     {"params": model.head_parameters()},
            ... ], lr=1e-2)
            >>> len(model.backbone_parameters()) + len(model.head_parameters()) == len(list(model.parameters()))
            True
        """
        return [p for name, p in self.named_parameters() if _in_backbone(name)]

    def head_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not the backbones': channel reduction(s), pooling (if it
        has parameters) and classifier. See :meth:`backbone_parameters`."""
        return [p for name, p in self.named_parameters() if not _in_backbone(name)]

    def reset_classifier(self, num_classes: int | None = None) -> None:
        """Replace the linear classifier by a newly initialised one, for ``num_classes``
        classes (``None``: as many as the classifier has now), e.g. to fine-tune a trained
        model on another label set (the 8-class BreaKHis model on the binary task).
        Backbones, channel reduction and pooling keep their weights.

        The new :class:`~bilinearpool.WideLinear` takes :attr:`embedding_dim` features, has
        a bias when the old one had, lives on the old one's device and dtype (drawn as
        ``nn.Linear`` draws them, so ``torch.manual_seed`` makes it reproducible), is
        trainable (also when the old one was frozen) and has its training mode.
        :attr:`num_classes` follows. An optimizer built before still holds the old
        classifier's parameters: build it (or its head group) again.

        Raises:
            TypeError: if ``num_classes`` is not an int, or the classifier is not an
                ``nn.Linear`` (one replaced by hand, e.g. a small MLP: replace
                ``model.classifier`` yourself).
            ValueError: if ``num_classes`` is less than 1.

        Examples:
            >>> model = FastBCNN(nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU()), num_classes=8)
            >>> model.reset_classifier(2)
            >>> model(torch.randn(4, 3, 24, 24)).shape, model.num_classes
            (torch.Size([4, 2]), 2)
        """
        count = None if num_classes is None else check_positive_int("num_classes", num_classes)
        old = self.classifier
        if not isinstance(old, nn.Linear):
            raise TypeError(
                "reset_classifier replaces a linear classifier (nn.Linear), but this model's classifier is "
                f"{type(old).__name__}: assign a new module to model.classifier instead"
            )
        count = old.out_features if count is None else count
        weight = old.weight
        classifier = WideLinear(
            self.embedding_dim, count, bias=old.bias is not None, device=weight.device, dtype=weight.dtype
        )
        self.classifier = classifier.train(old.training)
        self.num_classes = count

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A shared backbone is in the state_dict twice (backbone.*, backbone_b.*), and both
        # load into the one module: of a checkpoint with two different backbones (a
        # two-stream BCNN) the last loaded would win and the other be dropped without a word.
        if self.backbone_b is not None and self.backbone_b is self.backbone:
            differ = _differing_streams(state_dict, prefix + "backbone.", prefix + "backbone_b.")
            if differ:
                error_msgs.append(
                    f"the checkpoint's two backbones differ ({len(differ)} "
                    f"{plural(len(differ), 'entry', 'entries')}, e.g. backbone.{differ[0]} and "
                    f"backbone_b.{differ[0]}): it is a model with two streams of their own weights, "
                    "but this model shares one backbone between its streams (shared=True, or the "
                    "same module twice); build it with a backbone per stream (BCNN(..., shared=False)) "
                    "to load it"
                )
        # A checkpoint of the other triu layout fails on the classifier's size: say why.
        weight = state_dict.get(prefix + "classifier.weight")
        own = getattr(self.classifier, "weight", None)
        if (
            isinstance(self.pool, FastBilinearPool)
            and isinstance(weight, Tensor)
            and isinstance(own, Tensor)
            and weight.dim() == 2
            and own.dim() == 2
            and weight.shape[1] != own.shape[1]
        ):
            c = int(getattr(self, "_pool_channels", 0)) or None
            if c is not None and {int(weight.shape[1]), int(own.shape[1])} == {c * c, c * (c + 1) // 2}:
                saved = "triu=True" if weight.shape[1] == c * (c + 1) // 2 else "triu=False"
                error_msgs.append(
                    f"the checkpoint's classifier takes {weight.shape[1]} features, the pooled features of a "
                    f"model built with {saved} ({c} channels), but this model has "
                    f"triu={self.pool.triu} ({own.shape[1]} features): build the model with {saved} "
                    "to load it (to_triu() turns a triu=False model into a triu=True one)"
                )

    def to_triu(self) -> "BilinearClassifier":
        """A copy of this model whose pooling returns the packed upper triangle
        (``FastBilinearPool(triu=True)``) and whose classifier is folded to match
        (:func:`~bilinearpool.functional.triu_fold`): the same logits in eval mode, with
        :math:`C(C+1)/2` instead of :math:`C^2` classifier inputs (half the classifier's
        parameters and memory, and the cheaper packed head for inference). The embedding
        becomes the packed one, an isometry of the full one (same norms and distances).
        For a trained paper-style Fast BCNN before deployment; in training, dropout acts
        on the packed features.

        Raises:
            ValueError: unless the pooling is a :class:`~bilinearpool.FastBilinearPool` with
                ``triu=False`` and the classifier a linear layer.

        Examples:
            >>> model = FastBCNN(nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU()), num_classes=3).eval()
            >>> packed = model.to_triu()
            >>> x = torch.randn(2, 3, 24, 24)
            >>> torch.allclose(packed(x), model(x), atol=1e-5), packed.embedding_dim
            (True, 36)
        """
        if not isinstance(self.pool, FastBilinearPool) or self.pool.triu:
            raise ValueError(
                "to_triu needs a FastBilinearPool with triu=False (the full C^2 output), "
                f"but this model's pool is {self.pool!r}"
            )
        if not isinstance(self.classifier, nn.Linear):
            raise ValueError(f"to_triu needs a linear classifier, but got {type(self.classifier).__name__}")
        old = self.classifier
        folded = triu_fold(old.weight.detach())
        classifier = WideLinear(
            folded.shape[1], folded.shape[0], bias=old.bias is not None, device=folded.device, dtype=folded.dtype
        )
        with torch.no_grad():
            classifier.weight.copy_(folded)
            if old.bias is not None:
                classifier.bias.copy_(old.bias)  # type: ignore[union-attr]
        classifier.weight.requires_grad_(old.weight.requires_grad)  # a frozen classifier stays frozen
        if old.bias is not None:
            classifier.bias.requires_grad_(old.bias.requires_grad)  # type: ignore[union-attr]
        classifier.train(old.training)
        pool = copy.deepcopy(self.pool)
        pool.triu = True
        # Copy the rest of the model; the memo puts the new pool and classifier in place of
        # the old ones (the large full-size classifier is never copied).
        # (FeatureExtractor's deepcopy keeps every submodule's training mode.)
        model = copy.deepcopy(self, {id(self.pool): pool, id(old): classifier})
        model.embedding_dim = classifier.in_features
        return model

    def _fused_head(self) -> bool:
        """Whether :func:`fast_bilinear_linear` computes this model's logits (see :meth:`_linear_head`)."""
        return self._linear_head(FastBilinearPool)

    def _linear_head(self, pool_type: type[nn.Module]) -> bool:
        """Whether pooling, dropout and classifier are exactly ``pool_type``, an inactive
        nn.Dropout and nn.Linear (or WideLinear), forward not overridden (on the class or
        the object), unhooked, with forward_embedding not overridden: then the pooling's
        output goes straight into the classifier, and :meth:`forward` may call them its
        own way."""
        pool, drop, classifier = self.pool, self.dropout, self.classifier
        return (
            type(self).forward_embedding is BilinearClassifier.forward_embedding
            and isinstance(pool, pool_type)
            and type(pool).forward is pool_type.forward
            and isinstance(classifier, nn.Linear)
            and type(classifier).forward in (nn.Linear.forward, WideLinear.forward)
            and isinstance(drop, nn.Dropout)
            and type(drop).forward is nn.Dropout.forward
            and (drop.p == 0.0 or not drop.training)
            and not _hooked(pool, drop, classifier)
            # a forward replaced on the object (a wrapper, accelerate's offload hooks)
            and not any("forward" in vars(m) for m in (pool, drop, classifier))
        )


class FastBCNN(BilinearClassifier):
    """One-stream bilinear CNN, the "Fast BCNN" of Liu, Juhas & Zhang (2020).

    ``backbone -> FastBilinearPool (pool + signed sqrt + L2, fused) -> WideLinear``: one
    network pooled with itself, about half the cost of the two-stream :class:`BCNN`.

    Args:
        backbone: name, model or module (see :func:`~bilinearpool.build_backbone`).
        num_classes: number of classes.
        pool: replaces the default ``FastBilinearPool(triu=triu)``; any one-stream pooling
            returning ``(B, D)`` works (e.g. compact or covariance pooling).
        triu: use the packed upper triangle, :math:`C(C+1)/2` features (halves the classifier).
        reduce_dim, dropout, weights, se_reduction, node, sample_shape, output_fmt: see
            :class:`BilinearClassifier`.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`, :math:`C_{in} = 3` for named backbones.
        - Output: :math:`(B, \\text{num\\_classes})`.

    Examples:
        >>> import torchvision
        >>> model = FastBCNN(torchvision.models.resnet18(), node="layer4", num_classes=8)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 8])
        >>> model.embedding_dim  # 512 * 512
        262144
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        *,
        num_classes: int,
        pool: nn.Module | None = None,
        triu: bool = False,
        reduce_dim: int | None = None,
        dropout: float = 0.0,
        weights: WeightsArg = None,
        se_reduction: int | None = None,
        node: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
        output_fmt: str | None = None,
    ) -> None:
        if pool is not None and triu:
            raise ValueError("triu=True configures the default pool; set it on your own pool instead")
        super().__init__(
            backbone,
            pool=pool if pool is not None else FastBilinearPool(triu=triu),
            num_classes=num_classes,
            reduce_dim=reduce_dim,
            dropout=dropout,
            weights=weights,
            se_reduction=se_reduction,
            node=node,
            sample_shape=sample_shape,
            output_fmt=output_fmt,
        )


class BCNN(BilinearClassifier):
    """Two-stream bilinear CNN (Lin et al. 2015; the "BCNN" of Liu, Juhas & Zhang, 2020).

    Two backbones see the same image; their last feature maps are combined by bilinear
    pooling, signed square root and L2 normalisation (fused, see
    :class:`~bilinearpool.BilinearPool` with ``normalize=True``) and classified.

    Args:
        backbone_a: first stream (name, model or module).
        backbone_b: second stream. ``None`` gives a second copy of ``backbone_a`` with its
            own weights (the paper's setting: same architecture, separate weights; a copy,
            so both streams start from the same weights, random ones too, and part in
            training), or
            the very same module when ``shared=True``. The very module of ``backbone_a``
            again is shared as with ``shared=True`` (one extractor, run once).
        num_classes: number of classes.
        shared: with ``backbone_b=None``, let both streams share one backbone.
        pool: replaces the default ``BilinearPool(resize="bilinear", normalize=True)``,
            which resizes the second map to the first when their sizes differ.
        reduce_dim, dropout, weights, se_reduction, node, sample_shape, output_fmt: see
            :class:`BilinearClassifier`.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`, :math:`C_{in} = 3` for named backbones.
        - Output: :math:`(B, \\text{num\\_classes})`.

    Examples:
        >>> a = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
        >>> b = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU())
        >>> model = BCNN(a, b, num_classes=3)
        >>> model(torch.randn(2, 3, 32, 32)).shape, model.embedding_dim
        (torch.Size([2, 3]), 32)
    """

    def __init__(
        self,
        backbone_a: str | nn.Module,
        backbone_b: str | nn.Module | None = None,
        *,
        num_classes: int,
        shared: bool = False,
        pool: nn.Module | None = None,
        reduce_dim: int | None = None,
        dropout: float = 0.0,
        weights: WeightsArg = None,
        se_reduction: int | None = None,
        node: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
        output_fmt: str | None = None,
    ) -> None:
        check_flags(shared=shared)
        if shared and backbone_b is not None:
            raise ValueError("shared=True shares backbone_a between the streams; do not pass backbone_b")
        _check_head_args(num_classes, dropout, reduce_dim)
        # Both streams are built here (the second may be a copy of the first) and handed
        # to the base class as FeatureExtractors, without the options already applied.
        options = _backbone_options(weights, se_reduction, node, sample_shape, output_fmt)
        stream_a = self._resolve(backbone_a, options, backbone_b)
        if backbone_b is None:
            stream_b = stream_a if shared else copy.deepcopy(stream_a)
        elif isinstance(backbone_b, nn.Module) and backbone_b is backbone_a:
            stream_b = stream_a  # the very same module: one extractor, run once (as shared=True)
        else:
            stream_b = self._resolve(backbone_b, options, backbone_a)
        super().__init__(
            stream_a,
            stream_b,
            pool=pool if pool is not None else BilinearPool(resize="bilinear", normalize=True),
            num_classes=num_classes,
            reduce_dim=reduce_dim,
            dropout=dropout,
        )

    @property
    def shared(self) -> bool:
        """Whether both streams are one backbone (``shared=True``, or the same module twice)."""
        return self.backbone_b is self.backbone


class GAPClassifier(BilinearClassifier):
    """The plain baseline: global average pooling and a linear classifier.

    With ``se_reduction=8`` it is the paper's "+SE" model.

    Args:
        backbone: name, model or module (see :func:`~bilinearpool.build_backbone`).
        num_classes: number of classes.
        reduce_dim, dropout, weights, se_reduction, node, sample_shape, output_fmt: see
            :class:`BilinearClassifier`.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`, :math:`C_{in} = 3` for named backbones.
        - Output: :math:`(B, \\text{num\\_classes})`.

    Examples:
        >>> model = GAPClassifier(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), num_classes=2)
        >>> model(torch.randn(4, 3, 16, 16)).shape
        torch.Size([4, 2])
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        *,
        num_classes: int,
        reduce_dim: int | None = None,
        dropout: float = 0.0,
        weights: WeightsArg = None,
        se_reduction: int | None = None,
        node: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
        output_fmt: str | None = None,
    ) -> None:
        super().__init__(
            backbone,
            pool=GlobalAvgPool(),
            num_classes=num_classes,
            reduce_dim=reduce_dim,
            dropout=dropout,
            weights=weights,
            se_reduction=se_reduction,
            node=node,
            sample_shape=sample_shape,
            output_fmt=output_fmt,
        )


#: Heads :func:`build_model` knows, as in the paper's tables.
HEADS = {"plain": GAPClassifier, "bcnn": BCNN, "fast-bcnn": FastBCNN}


def build_model(head: str, backbone: str | nn.Module, *, num_classes: int, **kwargs: object) -> BilinearClassifier:
    """Build one of the paper's classifiers by head name.

    Args:
        head: ``"plain"`` (global average pooling), ``"bcnn"`` (two streams) or
            ``"fast-bcnn"`` (one stream). The paper's "+SE" variants are any of these
            with ``se_reduction=8``.
        backbone: name, model or module (see :func:`~bilinearpool.build_backbone`).
        num_classes: number of classes.
        **kwargs: passed to the head's class (``weights``, ``se_reduction``, ``triu``,
            ``sample_shape``, ...).

    Examples:
        >>> body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        >>> type(build_model("fast-bcnn", body, num_classes=8)).__name__
        'FastBCNN'
    """
    if not isinstance(head, str):
        raise TypeError(f"head must be a str, one of {sorted(HEADS)}, but got {type(head).__name__}")
    key = head.lower().replace("_", "-")
    if key not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, but got {head!r}")
    return HEADS[key](backbone, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
