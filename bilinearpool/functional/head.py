"""The Fast BCNN head in one step: pooling, signed square root, L2 norm and a linear layer.

A classifier on bilinear features computes ``logits = W z + b`` with
``z = l2(ssqrt(A A^T / N))``: millions of features per sample (``C^2 = 4,194,304`` for a
ResNet-50) that are written to memory only to be read once by ``W``. For inference
:func:`fast_bilinear_linear` never forms ``z``. Since the L2 norm is one number per
sample, ``W z = (W y) / |y|`` with ``y = ssqrt(G)``: the matrix is built a few rows at a
time for all samples, its signed square root taken while those rows are in cache, and
both the product with the matching (contiguous) rows of ``W`` and the squared norm added
up panel by panel.

On the development CPU (one thread, 8 classes) it took 0.75x-0.95x the time of the
pooling and the classifier apart at C = 256-2048, 5x5 and 7x7 maps, batches 1-32 (e.g.
24 against 30 ms for a batch of 2 at C = 2048, 5x5, an Inception-v3 map at 224 px;
``benchmarks/bench_head.py``, results in ``benchmarks/results/cpu-2core-fastbcnn/head``).
For the full output it builds every row of ``G`` (``A A^T`` is symmetric, but a panel's
mirror rows sit in ``W`` as columns, read with a stride of ``C``: that read made the step
3-4x slower than the composition), so it does twice the pooling's matrix product; with
many locations that product dominates and the step loses (8 x 2048 x 14 x 14: 240-320
against 195 ms). The packed triangle (``triu``) needs the upper half only. On CPU the
step is used for at most :data:`FUSED_MAX_LOCATIONS` locations.

On CUDA (with Triton) ``G`` is built whole by one batched product, as the pooling builds
it, and one kernel reads it once: signed square root, squared norm and the products with
the classifier's rows, added up elementwise per program and reduced once (the
composition reads and writes ``G`` in the normalisation's two kernels, then reads it
again in the classifier's). The upper triangle alone is read for ``triu``.

Both run without autograd only; everything else is
:func:`~bilinearpool.functional.fast_bilinear_pool` followed by
:func:`~bilinearpool.functional.wide_linear`, which is also its definition.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _elementwise
from ._checks import AUTOCAST_CASTS, as_channel_matrix, check_flags, check_floating, plain_ops
from ._elementwise import signed_sqrt_
from .bilinear import (
    L2_EPS,
    SIGNED_SQRT_EPS,
    _check_reduction,
    _pack_panel,
    _resolve_eps,
    _rowdot,
    _scaled_bmm,
    _triu_offset,
    fast_bilinear_pool,
    triu_size,
)
from .linear import _DTYPES, _WARPS, WIDE_MAX_OUTPUTS, _tiling, wide_linear

__all__ = ["fast_bilinear_linear"]

_HALF = (torch.float16, torch.bfloat16)

#: The fused path is taken for feature maps of at most this many locations (H x W or N).
#: Measured on one CPU thread at C = 2048: a gain at 25 and 49 locations, a loss at 196.
FUSED_MAX_LOCATIONS = 64
#: Rows of the matrix per panel: about this many entries over all samples, between 32
#: and 128 rows (C = 2048, one thread: 128 rows fastest at batches of 1-2, 64 at 4, 32 at
#: 8-32; 8 rows at batch 32 were 1.3x slower).
_PANEL_ENTRIES = 1 << 19
_PANEL_ROWS = (32, 128)
#: Samples per sweep over the weight: larger batches are cut into groups of this many,
#: each reading the weight once, so that a panel of all samples stays cache-sized
#: (batch 32, C = 2048, 7x7: 425 ms in groups of 8 against 515 ms in one sweep).
_GROUP = 8


def fast_bilinear_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    reduction: str = "mean",
    signed_sqrt: bool = True,
    l2_normalize: bool = True,
    triu: bool = False,
    eps: float | None = None,
    l2_eps: float | None = None,
    save_output: bool = False,
) -> Tensor:
    """``wide_linear(fast_bilinear_pool(x, ...), weight, bias)`` without the pooled features.

    The logits of a linear classifier on the one-stream BCNN head. For inference (no
    input needs a gradient, or grad mode is off) of float32/float64 tensors outside
    autocast and tracing: on CPU, with at most :data:`FUSED_MAX_LOCATIONS` locations, it
    builds the matrix in row panels and multiplies each with its rows of ``weight`` at
    once, so the :math:`B \\times D` features are never stored; on CUDA (Triton, at most
    64 classes) it builds the matrices whole, as the pooling does (the same memory), and
    one kernel reads them once for the signed square root, the norm and the products
    with ``weight`` (the normalised features are never written). Otherwise, and for
    gradients, it
    is :func:`~bilinearpool.functional.fast_bilinear_pool` then
    :func:`~bilinearpool.functional.wide_linear`; there, when the classifier keeps the
    features for its own backward anyway (``weight`` needs a gradient, float32/float64,
    no autocast), the pooling keeps them too (``save_output=True``: no extra memory, and
    its backward does not rebuild the matrices). Both give the same values up to the
    order of the additions, which the tests check. Features the pooling keeps in
    float32 for float16/bfloat16 ``x`` (no ``l2_normalize``) meet a ``weight`` of
    ``x``'s dtype in that dtype, as a model converted with ``.half()`` expects.

    :class:`~bilinearpool.FastBCNN` (any :class:`~bilinearpool.BilinearClassifier` with a
    :class:`~bilinearpool.FastBilinearPool` and a linear classifier) calls it in
    ``forward``.

    Args:
        x: feature map :math:`A`.
        weight: classifier weight, :math:`(K, D)` with :math:`D = C^2`, or
            :math:`C(C+1)/2` with ``triu``.
        bias: :math:`(K,)` or ``None``.
        reduction, signed_sqrt, l2_normalize, triu, eps, l2_eps, save_output: as in
            :func:`~bilinearpool.functional.fast_bilinear_pool` (``None`` eps means the
            default, and an eps given for a step that is off is a ValueError;
            ``save_output`` matters for gradients only, where the composition runs).

    Raises:
        TypeError: outside autocast (under it too where ``x`` or ``weight`` is float64,
            which autocast leaves alone), for a ``weight`` of another dtype than ``x`` (or than
            the float32 features of float16/bfloat16 ``x`` without ``l2_normalize``) or a
            ``bias`` of another than the weight's: what :func:`torch.nn.functional.linear`
            refuses, with a message that names the tensor.

    Shape:
        - x: :math:`(B, C, H, W)` or tokens :math:`(B, N, C)`.
        - Output: :math:`(B, K)`.

    Examples:
        >>> x = torch.relu(torch.randn(2, 16, 7, 7))
        >>> w, b = torch.randn(3, 256), torch.randn(3)
        >>> logits = fast_bilinear_linear(x, w, b)
        >>> torch.allclose(logits, fast_bilinear_pool(x) @ w.T + b, atol=1e-5)
        True
    """
    _check_reduction(reduction)
    check_flags(signed_sqrt=signed_sqrt, l2_normalize=l2_normalize, triu=triu, save_output=save_output)
    sqrt_eps = _resolve_eps(eps, "eps", SIGNED_SQRT_EPS, "signed_sqrt", signed_sqrt)
    norm_eps = _resolve_eps(l2_eps, "l2_eps", L2_EPS, "l2_normalize", l2_normalize)
    a = as_channel_matrix(x)
    _check_classifier(weight, bias, a.shape[1], triu)
    _check_dtypes(x, weight, bias, l2_normalize)
    path = _path(a, weight, bias)
    if path is None:
        z = fast_bilinear_pool(
            x,
            reduction=reduction,
            signed_sqrt=signed_sqrt,
            l2_normalize=l2_normalize,
            triu=triu,
            eps=eps,
            l2_eps=l2_eps,
            save_output=save_output or _classifier_keeps_features(a, weight),
        )
        return wide_linear(_features_as_weight(z, x, weight), weight, bias)
    scale = 1.0 / a.shape[2] if reduction == "mean" else 1.0
    logits = _kernel_logits if path == "triton" else _panel_logits
    with torch.no_grad():
        return logits(a, weight, bias, scale, sqrt_eps, norm_eps, triu)


def _features_as_weight(z: Tensor, x: Tensor, weight: Tensor | None) -> Tensor:
    """Pooled features ``z`` in the classifier's dtype when the pooling kept them in float32
    for a float16/bfloat16 ``x`` whose dtype the classifier's ``weight`` shares (a model
    converted with ``.half()``); otherwise ``z`` as it is (under autocast the layer casts)."""
    if weight is not None and z.dtype != weight.dtype and x.dtype == weight.dtype and x.dtype in _HALF:
        return z.to(weight.dtype)
    return z


def _classifier_keeps_features(a: Tensor, weight: Tensor) -> bool:
    """Whether the classifier will keep the pooled features themselves for its backward
    (its weight needs a gradient; same float32/float64 dtype, no autocast, so the very
    tensor the pooling returns is what it keeps): the pooling may then keep them too at
    no cost in memory, and skip rebuilding the matrices in backward."""
    return (
        torch.is_grad_enabled()
        and weight.requires_grad
        and a.dtype in _DTYPES
        and weight.dtype == a.dtype
        and not torch.is_autocast_enabled(a.device.type)
    )


def _check_classifier(weight: Tensor, bias: Tensor | None, channels: int, triu: bool) -> None:
    check_floating(weight, "weight")
    traced = torch.jit.is_tracing()  # sizes are traced values (see _checks.as_channel_matrix)
    if weight.dim() != 2 or (not traced and weight.shape[1] != _features(channels, triu)):
        features = _features(channels, triu)
        layout = f"C(C+1)/2 = {features} (triu=True)" if triu else f"C^2 = {features}"
        raise ValueError(
            f"weight must be (num_classes, {layout}) for an input of C = {channels} channels, "
            f"but got shape {tuple(weight.shape)}"
        )
    if bias is not None:
        check_floating(bias, "bias")
        if bias.dim() != 1 or (not traced and bias.shape[0] != weight.shape[0]):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), but got {tuple(bias.shape)}")


def _check_dtypes(x: Tensor, weight: Tensor, bias: Tensor | None, l2_normalize: bool) -> None:
    """Outside autocast (and under it where either is float64, which autocast leaves
    alone), ``weight`` must have ``x``'s dtype or that of the pooled features
    (float32 for float16/bfloat16 ``x`` without ``l2_normalize``), and ``bias`` the
    weight's: what F.linear takes, whose own error names neither tensor ("mat1 and mat2
    must have the same dtype")."""
    castable = x.dtype in AUTOCAST_CASTS and weight.dtype in AUTOCAST_CASTS
    if castable and torch.is_autocast_enabled(x.device.type):
        return
    features = torch.float32 if x.dtype in _HALF and not l2_normalize else x.dtype
    if weight.dtype not in (x.dtype, features):
        also = f" (or {features}, the features' dtype)" if features != x.dtype else ""
        where = " outside torch.autocast" if castable else " (torch.autocast leaves float64 alone)"
        raise TypeError(
            f"weight must have the input's dtype {x.dtype}{also}{where}, but got "
            f"{weight.dtype}: convert one of them (e.g. the classifier with .to({x.dtype}))"
            + (", or run under torch.autocast" if castable else "")
        )
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias must have the weight's dtype {weight.dtype}, but got {bias.dtype}")


def _features(channels: int, triu: bool) -> int:
    """Features per sample of the pooled output: :math:`C^2`, or :math:`C(C+1)/2` packed."""
    return triu_size(channels) if triu else channels * channels


def _path(a: Tensor, weight: Tensor, bias: Tensor | None) -> str | None:
    """The one-step path :func:`fast_bilinear_linear` takes for these tensors: ``"panel"``
    (CPU), ``"triton"`` (CUDA) or ``None`` (the composition)."""
    tensors = (a, weight) if bias is None else (a, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if a.device.type not in ("cpu", "cuda") or any(t.device != a.device or t.dtype != a.dtype for t in tensors):
        return None
    if a.dtype not in _DTYPES or torch.is_autocast_enabled(a.device.type) or _elementwise.tracing():
        return None
    if plain_ops(*tensors):  # torch.func transforms, forward AD: the composition has rules
        return None
    if a.device.type == "cuda":
        return "triton" if _elementwise.backend(a.device) == "triton" and weight.shape[0] <= WIDE_MAX_OUTPUTS else None
    return "panel" if a.shape[2] <= FUSED_MAX_LOCATIONS else None


def _kernel_logits(
    a: Tensor, weight: Tensor, bias: Tensor | None, scale: float, eps: float | None, l2_eps: float | None, triu: bool
) -> Tensor:
    """The logits with the Triton kernel: ``G`` by one batched product (as the pooling
    builds it), then one pass over ``G`` that takes the signed square root and adds up
    both the products with the classifier's rows and the squared norm (the composition
    passes over ``G`` three times: the normalisation's two kernels and the classifier's).
    With ``triu`` only the upper triangle is read. The partial sums are added up in a
    fixed order (deterministic)."""
    batch, c, _ = a.shape
    out = weight.shape[0]
    if batch == 0:
        return a.new_zeros(0, out)
    g = _scaled_bmm(a, a.transpose(1, 2), scale)  # (B, C, C), contiguous
    weight = weight.contiguous()
    f64 = a.dtype == torch.float64
    bb, bk, steps = _tiling(batch, out, f64)
    splits = _elementwise._cdiv(c, bk * steps)
    programs = c * splits
    parts = torch.empty(programs, batch, out, dtype=a.dtype, device=a.device)
    sq = torch.empty(programs, batch, dtype=a.dtype, device=a.device)
    _elementwise.launch(
        _elementwise._kernels().sqrt_linear_kernel, (programs, _elementwise._cdiv(batch, bb)), a.device,
        g, weight, parts, sq, batch, c, splits, g.stride(0), weight.stride(0), _elementwise._consts(a.device, a.dtype, eps),
        OUT=out, OUT_P2=_elementwise.next_pow2(out), BB=bb, BK=bk, STEPS=steps,
        SQRT=eps is not None, TRIU=triu, F64=f64, num_warps=_WARPS,
    )
    return _normalized(parts.sum(0), sq.sum(0) if l2_eps is not None else None, l2_eps, bias)


def _panel_logits(
    a: Tensor, weight: Tensor, bias: Tensor | None, scale: float, eps: float | None, l2_eps: float | None, triu: bool
) -> Tensor:
    """The logits from row panels of the matrix, for groups of up to :data:`_GROUP` samples
    at once (each row of ``weight`` is read once per group)."""
    batch, c, _ = a.shape
    if batch == 0:
        return a.new_zeros(0, weight.shape[0])
    if batch > _GROUP:
        return torch.cat(
            [_panel_logits(a[i : i + _GROUP], weight, bias, scale, eps, l2_eps, triu) for i in range(0, batch, _GROUP)]
        )
    rows = min(c, _PANEL_ROWS[1], max(_PANEL_ROWS[0], _PANEL_ENTRIES // (batch * c) // 8 * 8))
    logits = a.new_zeros(batch, weight.shape[0])
    sq = a.new_zeros(batch) if l2_eps is not None else None
    buffer = a.new_empty(batch * rows * c)
    scratch = a.new_empty(batch * rows * c) if eps is not None else None
    for r0 in range(0, c, rows):
        r1 = min(r0 + rows, c)
        c0 = r0 if triu else 0  # the packed triangle needs columns r0: only
        panel = buffer[: batch * (r1 - r0) * (c - c0)].view(batch, r1 - r0, c - c0)
        y = signed_sqrt_(_scaled_bmm(a[:, r0:r1], a[:, c0:].transpose(1, 2), scale, out=panel), eps, scratch)
        if triu:
            z, w = _pack_panel(y, r0, r1, c), weight[:, _triu_offset(r0, c) : _triu_offset(r1, c)]
        else:
            z, w = y.view(batch, -1), weight[:, r0 * c : r1 * c]
        if sq is not None:
            sq += _rowdot(z, z)
        logits.addmm_(z, w.t())
    return _normalized(logits, sq, l2_eps, bias)


def _normalized(logits: Tensor, sq: Tensor | None, l2_eps: float | None, bias: Tensor | None) -> Tensor:
    """The end of both paths, in place: the products with the classifier's rows ``logits``
    divided by the features' norm (``sq``, each sample's squared norm, given with
    ``l2_eps``: ``W y / max(|y|, l2_eps)``), then ``bias`` added.

    Shape:
        - logits: :math:`(B, K)`; sq: :math:`(B,)`; output: ``logits``.
    """
    if sq is not None and l2_eps is not None:
        logits.div_(sq.sqrt_().clamp_min_(l2_eps).unsqueeze(1))
    if bias is not None:
        logits += bias
    return logits
