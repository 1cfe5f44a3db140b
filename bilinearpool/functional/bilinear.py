"""Bilinear pooling and its normalisations, as pure tensor functions.

Bilinear pooling (Lin, RoyChowdhury & Maji, ICCV 2015) of two feature maps
:math:`A \\in \\mathbb{R}^{C_1 \\times N}` and :math:`B \\in \\mathbb{R}^{C_2 \\times N}` over
:math:`N = H W` locations is the average outer product

.. math:: G = \\frac{1}{N} \\sum_{l=1}^{N} a_l b_l^\\top = \\frac{1}{N} A B^\\top .

The BCNN pipeline of Liu, Juhas & Zhang (2020) follows it with the signed square root and
L2 normalisation. :func:`fast_bilinear_pool` computes the whole chain in one fused
operation whose backward keeps only the input feature map(s) and recomputes the rest.
"""

from __future__ import annotations

import functools
import math
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_floating, compute_dtype, no_autocast, pair_streams

__all__ = [
    "bilinear_pool",
    "fast_bilinear_pool",
    "l2_normalize",
    "signed_sqrt",
    "signed_sqrt_grad_bound",
    "triu_pack",
    "triu_size",
    "triu_unpack",
]

_REDUCTIONS = ("mean", "sum")
#: Default ``eps`` of :func:`signed_sqrt`. The gradient is bounded by ``1 / (2 * sqrt(eps))``,
#: about 158 for this value; the forward differs from ``sign(x) * sqrt(|x|)`` by less than
#: ``sqrt(eps)`` (3.2e-3).
SIGNED_SQRT_EPS = 1e-5
#: Default ``eps`` of :func:`l2_normalize`, as in :func:`torch.nn.functional.normalize`.
L2_EPS = 1e-12


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, but got {reduction!r}")


def _check_eps(eps: float, name: str = "eps") -> None:
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{name} must be a positive finite number, but got {eps!r}")


def bilinear_pool(x_a: Tensor, x_b: Tensor | None = None, *, reduction: str = "mean") -> Tensor:
    """Bilinear pooling: the outer product of two feature maps, pooled over locations.

    From Lin, RoyChowdhury & Maji, "Bilinear CNN Models for Fine-grained Visual
    Recognition" (ICCV 2015), as used by Liu, Juhas & Zhang (2020).

    Products are accumulated in float32 for float16/bfloat16 inputs (and under autocast),
    and the result stays float32: its entries are squares of features and overflow
    float16 for feature magnitudes above about 255.

    Args:
        x_a: first feature map :math:`A`.
        x_b: second feature map :math:`B`; ``None`` pools ``x_a`` with itself
            (:math:`G = A A^\\top / N`, symmetric).
        reduction: ``"mean"`` divides by the number of locations :math:`N` (the paper's
            choice), ``"sum"`` does not.

    Shape:
        - x_a: :math:`(B, C_1, H, W)` or tokens :math:`(B, N, C_1)`.
        - x_b: :math:`(B, C_2, H, W)` or :math:`(B, N, C_2)`, same layout and locations.
        - Output: :math:`(B, C_1, C_2)`.

    Examples:
        >>> x = torch.randn(2, 8, 7, 7)
        >>> bilinear_pool(x).shape
        torch.Size([2, 8, 8])
        >>> bilinear_pool(x, torch.randn(2, 3, 7, 7)).shape
        torch.Size([2, 8, 3])
    """
    _check_reduction(reduction)
    a, b = pair_streams(x_a, x_b)
    dtype = compute_dtype(a)
    n = a.shape[2]
    with no_autocast(a.device.type):
        a = a.to(dtype)
        b = a if b is None else b.to(dtype)
        out = torch.bmm(a, b.transpose(1, 2))
        if reduction == "mean":
            out = out / n
    return out


def signed_sqrt(x: Tensor, *, eps: float = SIGNED_SQRT_EPS) -> Tensor:
    """Signed square root with a bounded gradient everywhere, zero included.

    Defined as

    .. math:: f(x) = \\operatorname{sign}(x)\\left(\\sqrt{|x| + \\epsilon} - \\sqrt{\\epsilon}\\right)
                   = \\frac{x}{\\sqrt{|x| + \\epsilon} + \\sqrt{\\epsilon}} ,

    and computed in the second form, which needs no ``sign`` and cancels nothing.
    :math:`f` is odd, continuous, strictly increasing, :math:`f(0) = 0`, and
    differentiable everywhere with

    .. math:: f'(x) = \\frac{1}{2\\sqrt{|x| + \\epsilon}} \\in \\left(0, \\tfrac{1}{2\\sqrt{\\epsilon}}\\right] ,

    so the gradient is finite for every input and at most
    :func:`signed_sqrt_grad_bound` (about 158 for the default ``eps=1e-5``), attained at
    exact zeros. Autograd through this definition gives exactly :math:`f'`.

    Why not the common ``sign(x) * sqrt(|x| + eps)``: it jumps by :math:`2\\sqrt{\\epsilon}`
    at 0 and autograd gives it gradient 0 there, while its closed-form gradient is
    :math:`1/(2\\sqrt{\\epsilon})`; exact zeros are frequent after ReLU (two channels with
    disjoint support), so the two disagree in practice. The shift by
    :math:`\\sqrt{\\epsilon}` removes the jump and makes both answers the same.

    Args:
        x: any floating-point tensor.
        eps: :math:`\\epsilon > 0`; bounds the gradient by :math:`1/(2\\sqrt{\\epsilon})`.

    Shape:
        - Input: any shape.
        - Output: same shape as the input.

    Examples:
        >>> signed_sqrt(torch.tensor([-4.0, 0.0, 9.0]), eps=1e-12).round(decimals=4)
        tensor([-2.,  0.,  3.])
    """
    check_floating(x)
    _check_eps(eps)
    return x / (torch.sqrt(x.abs() + eps) + math.sqrt(eps))


def signed_sqrt_grad_bound(eps: float = SIGNED_SQRT_EPS) -> float:
    """The largest gradient :func:`signed_sqrt` can have: ``1 / (2 * sqrt(eps))``.

    Examples:
        >>> round(signed_sqrt_grad_bound(1e-5), 1)
        158.1
    """
    _check_eps(eps)
    return 0.5 / math.sqrt(eps)


def l2_normalize(x: Tensor, *, eps: float = L2_EPS) -> Tensor:
    """Scale each sample to unit L2 norm over all its non-batch dimensions.

    ``x / max(||x||, eps)``, as :func:`torch.nn.functional.normalize` (for a matrix
    per sample the norm is the Frobenius norm).

    Args:
        x: batch of samples.
        eps: lower bound of the divisor, avoids division by zero.

    Shape:
        - Input: :math:`(B, *)` with at least one dimension after the batch.
        - Output: same shape as the input.

    Examples:
        >>> l2_normalize(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """
    check_floating(x)
    _check_eps(eps)
    if x.dim() < 2:
        raise ValueError(
            f"input must be a batch (B, *) with at least 2 dimensions, but got shape {tuple(x.shape)}"
        )
    return F.normalize(x.flatten(1), dim=1, eps=eps).view_as(x)


def triu_size(channels: int) -> int:
    """Length of the packed upper triangle of a ``channels x channels`` matrix.

    Examples:
        >>> triu_size(2048)
        2098176
    """
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, but got {channels!r}")
    return channels * (channels + 1) // 2


@functools.lru_cache(maxsize=64)
def _triu_numpy(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = np.triu_indices(rows, m=cols)
    return r * cols + c, np.where(r == c, 1.0, math.sqrt(2.0))


def _triu_block(r0: int, r1: int, c: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Packed upper-triangle entries of rows r0:r1 of a c x c matrix.

    Returns where they lie in the row-major ``(r1 - r0) x (c - r0)`` block that starts at
    column r0, and their isometry weights (1 on the diagonal, sqrt(2) off it). Built with
    numpy, so that traced and exported (ONNX) graphs hold them as constants.
    """
    index, weights = _triu_numpy(int(r1 - r0), int(c - r0))  # ints: traced shapes may be tensors
    return torch.from_numpy(index).to(device), torch.from_numpy(weights).to(device=device, dtype=dtype)


def triu_pack(m: Tensor) -> Tensor:
    """Pack symmetric matrices into their upper triangles, off-diagonals times sqrt(2).

    The scaling makes the packing an isometry on symmetric matrices:
    ``||triu_pack(M)||_2 == ||M||_F``, so L2 normalisation after packing equals L2
    normalisation of the full matrix, and a linear classifier on the packed vector is as
    expressive as one on the flattened matrix with about half the weights.

    Args:
        m: batch of symmetric square matrices (only the upper triangle is read).

    Shape:
        - Input: :math:`(B, C, C)`.
        - Output: :math:`(B, C(C+1)/2)`, row-major order.

    Examples:
        >>> m = torch.tensor([[[1.0, 2.0], [2.0, 3.0]]])
        >>> triu_pack(m)
        tensor([[1.0000, 2.8284, 3.0000]])
    """
    check_floating(m)
    if m.dim() != 3 or m.shape[1] != m.shape[2]:
        raise ValueError(f"input must be square matrices (B, C, C), but got shape {tuple(m.shape)}")
    c = m.shape[1]
    index, scale = _triu_block(0, c, c, m.device, m.dtype)
    return m.reshape(m.shape[0], c * c)[:, index] * scale


def triu_unpack(v: Tensor) -> Tensor:
    """Inverse of :func:`triu_pack`: rebuild the full symmetric matrices.

    Shape:
        - Input: :math:`(B, C(C+1)/2)`.
        - Output: :math:`(B, C, C)`.

    Examples:
        >>> m = torch.tensor([[[1.0, 2.0], [2.0, 3.0]]])
        >>> torch.equal(triu_unpack(triu_pack(m)), m)
        True
    """
    check_floating(v)
    if v.dim() != 2:
        raise ValueError(f"input must be packed triangles (B, C(C+1)/2), but got shape {tuple(v.shape)}")
    c = (math.isqrt(8 * v.shape[1] + 1) - 1) // 2
    if c < 1 or triu_size(c) != v.shape[1]:
        raise ValueError(f"input length {v.shape[1]} is not C(C+1)/2 for any channel count C")
    index, scale = _triu_block(0, c, c, v.device, v.dtype)
    full = v.new_zeros(v.shape[0], c * c).index_copy(1, index, v / scale).view(-1, c, c)
    return full + full.transpose(1, 2).tril(-1)


#: Above this many locations (N = H*W) the backward keeps the blocks it builds in its first
#: sweep instead of rebuilding them in the second.
_KEEP_BLOCKS_ABOVE_LOCATIONS = 64


def _block_elements(device: torch.device) -> int:
    """Matrix entries processed per block by the fused op.

    On CPU the elementwise steps are memory-bound, so the (C1 x C2) matrices are built a
    few rows at a time and every step runs while the block is still in cache (about
    1 MiB for float32). GPUs have the bandwidth to take large blocks in few launches.
    """
    return 1 << 18 if device.type == "cpu" else 1 << 26


def _blocks(batch: int, rows: int, cols: int, target: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, r0, r1) blocks of about ``target`` entries: whole samples when they fit."""
    if rows * cols <= target:
        step = max(1, target // (rows * cols))
        return [(b0, min(b0 + step, batch), 0, rows) for b0 in range(0, batch, step)]
    step = max(8, (target // cols) // 8 * 8)
    return [(b, b + 1, r0, min(r0 + step, rows)) for b in range(batch) for r0 in range(0, rows, step)]


def _triu_offset(row: int, c: int) -> int:
    """Position of entry (row, row) in the row-major packed upper triangle."""
    return row * c - row * (row - 1) // 2


class _FusedBilinear(torch.autograd.Function):
    """``l2(pack(ssqrt(s A B^T)))`` built block by block, recomputed in backward.

    Only the inputs are saved: at B=8, C=2048, 7x7 that is 3.1 MiB, against the
    515 MiB that autograd keeps for the same chain written op by op. The backward needs
    two per-sample scalars (the norm and the inner product with the incoming gradient)
    before it can form dG, so it rebuilds each block twice rather than storing a
    (B, C1, C2) buffer: the extra matrix products cost less than the memory traffic.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        a: Tensor,
        b: Tensor | None,
        scale: float,
        eps: float | None,
        l2_eps: float | None,
        triu: bool,
    ) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.config = (scale, eps, l2_eps, triu)
        dtype = compute_dtype(a)
        a_ = a.to(dtype)
        b_ = a_ if b is None else b.to(dtype)
        a_s = a_ * scale
        batch, c1, c2 = a.shape[0], a.shape[1], b_.shape[1]
        dim = triu_size(c1) if triu else c1 * c2
        out = a_.new_empty(batch, dim)
        sq = a_.new_zeros(batch) if l2_eps is not None else None
        for b0, b1, r0, r1 in _blocks(batch, c1, c2, _block_elements(a.device)):
            y = _block(a_s, b_, b0, b1, r0, r1, eps, triu, out)
            if sq is not None:
                sq[b0:b1] += _rowdot(y, y)
        if sq is not None:
            out.div_(sq.sqrt_().clamp_min_(l2_eps).unsqueeze(1))
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        scale, eps, l2_eps, triu = ctx.config
        dtype = compute_dtype(a)
        with torch.no_grad(), no_autocast(a.device.type):
            a_ = a.to(dtype)
            b_ = a_ if b is None else b.to(dtype)
            a_s = a_ * scale
            dz = grad.to(dtype)
            batch, c1, c2 = a.shape[0], a.shape[1], b_.shape[1]
            blocks = _blocks(batch, c1, c2, _block_elements(a.device))
            # Rebuilding a block costs 2N flops per entry, keeping it a write and a read: with
            # many locations N, sweep 1 keeps the blocks for sweep 2 (transient, freed on return).
            store = l2_eps is not None and a.shape[2] > _KEEP_BLOCKS_ABOVE_LOCATIONS
            kept = a_.new_empty(dz.shape) if store else None
            # Per-sample factors of dv = (dz - v <v, dz> / |v|^2) / |v| (the L2 step).
            c = a_.new_zeros(batch)
            k = a_.new_ones(batch)
            if l2_eps is not None:
                sq = a_.new_zeros(batch)
                dot = a_.new_zeros(batch)
                for b0, b1, r0, r1 in blocks:
                    y = _block(a_s, b_, b0, b1, r0, r1, eps, triu, kept)
                    sq[b0:b1] += _rowdot(y, y)
                    dot[b0:b1] += _rowdot(y, _segment(dz, b0, b1, r0, r1, c1, c2, triu))
                norm = sq.sqrt_()
                clamped = norm <= l2_eps
                c = torch.where(clamped, 0.0, dot / norm.square().clamp_min(l2_eps**2))
                k = 1.0 / norm.clamp_min(l2_eps)
            # dG = dv * f'(G) with f'(G) = 1 / (2 (|y| + sqrt(eps))); the per-sample factors
            # k, 1/2 and the pooling scale are folded into the (small) other operand.
            coef = (k * (scale * (0.5 if eps is not None else 1.0))).view(-1, 1, 1)
            a_c = a_ * coef
            b_c = a_c if b is None else b_ * coef
            need_a = ctx.needs_input_grad[0]
            need_b = b is not None and ctx.needs_input_grad[1]
            g_a = torch.zeros_like(a_) if need_a else None
            g_b = torch.zeros_like(b_) if need_b else None
            # One stream, full matrix: G = s A A^T and f'(G) are symmetric, so
            # dA = s (dG + dG^T) A needs only the symmetric part of dz, and one product per block.
            symmetric = b is None and not triu
            dz_square = dz.reshape(batch, c1, c1) if symmetric else None
            for b0, b1, r0, r1 in blocks:
                if kept is None:
                    y = _block(a_s, b_, b0, b1, r0, r1, eps, triu)
                else:
                    y = _segment(kept, b0, b1, r0, r1, c1, c2, triu)
                    y = y if triu else y.view(b1 - b0, r1 - r0, c2)
                dzb = _segment(dz, b0, b1, r0, r1, c1, c2, triu).view_as(y)
                cb = c[b0:b1].view(-1, *[1] * (y.dim() - 1))
                if symmetric:
                    dzb = dzb + dz_square[b0:b1, :, r0:r1].transpose(1, 2)  # type: ignore[index]
                    cb = cb * 2.0
                if triu:
                    # Packed entries are w * f(g): undo w for f'(g), apply it for the chain rule.
                    index, w = _triu_block(r0, r1, c1, y.device, dtype)
                denom = None
                if eps is not None:
                    denom = (y.abs().div_(w) if triu else y.abs()).add_(math.sqrt(eps))
                dg = y.mul_(-cb).add_(dzb)
                if denom is not None:
                    dg.div_(denom)
                if triu:
                    full = dg.new_zeros(b1 - b0, (r1 - r0) * (c1 - r0))
                    dg = full.index_copy_(1, index, dg.mul_(w)).view(b1 - b0, r1 - r0, c1 - r0)
                    # Upper blocks only (columns r0:): both factors of each entry get gradient.
                    g_a[b0:b1, r0:r1].baddbmm_(dg, a_c[b0:b1, r0:])  # type: ignore[index]
                    g_a[b0:b1, r0:].baddbmm_(dg.transpose(1, 2), a_c[b0:b1, r0:r1])  # type: ignore[index]
                elif symmetric:
                    g_a[b0:b1, r0:r1].baddbmm_(dg.view(b1 - b0, r1 - r0, c2), a_c[b0:b1])  # type: ignore[index]
                else:
                    dg = dg.view(b1 - b0, r1 - r0, c2)
                    if need_a:
                        g_a[b0:b1, r0:r1].baddbmm_(dg, b_c[b0:b1])  # type: ignore[index]
                    if need_b:
                        g_b[b0:b1].baddbmm_(dg.transpose(1, 2), a_c[b0:b1, r0:r1])  # type: ignore[index]
        return (
            None if g_a is None else g_a.to(a.dtype),
            None if g_b is None else g_b.to(b.dtype),  # type: ignore[union-attr]
            None,
            None,
            None,
            None,
        )


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample inner products of two ``(b, ...)`` tensors as one BLAS call, no temporary."""
    b = x.shape[0]
    return torch.bmm(x.reshape(b, 1, -1), y.reshape(b, -1, 1)).view(b)


def _segment(v: Tensor, b0: int, b1: int, r0: int, r1: int, c1: int, c2: int, triu: bool) -> Tensor:
    """The entries of the flat output ``v`` that block rows r0:r1 of samples b0:b1 produce."""
    if triu:
        return v[b0:b1, _triu_offset(r0, c1) : _triu_offset(r1, c1)]
    return v[b0:b1, r0 * c2 : r1 * c2]


def _block(
    a_s: Tensor,
    b_: Tensor,
    b0: int,
    b1: int,
    r0: int,
    r1: int,
    eps: float | None,
    triu: bool,
    out: Tensor | None = None,
) -> Tensor:
    """Signed-square-rooted block of G = a_s b^T for samples b0:b1 and rows r0:r1.

    With ``triu`` only columns from r0 on are computed (the rest is below the diagonal)
    and the packed upper-triangle entries are returned, scaled by the isometry weights.
    With ``out`` the result is written into its segment of the flat output.
    """
    c1 = a_s.shape[1]
    cols = r0 if triu else 0
    rhs = b_[b0:b1, cols:].transpose(1, 2)
    lhs = a_s[b0:b1, r0:r1]
    if out is not None and not triu:
        g = torch.bmm(lhs, rhs, out=_segment(out, b0, b1, r0, r1, c1, b_.shape[1], False).view(b1 - b0, r1 - r0, -1))
    else:
        g = torch.bmm(lhs, rhs)
    if eps is not None:
        # f(g) = g / (sqrt(|g| + eps) + sqrt(eps)): signed_sqrt without sign or cancellation.
        g.div_(g.abs().add_(eps).sqrt_().add_(math.sqrt(eps)))
    if not triu:
        return g
    index, w = _triu_block(r0, r1, c1, g.device, g.dtype)
    packed = g.view(b1 - b0, -1)[:, index].mul_(w)
    if out is not None:
        _segment(out, b0, b1, r0, r1, c1, c1, True).copy_(packed)
    return packed


def fast_bilinear_pool(
    x_a: Tensor,
    x_b: Tensor | None = None,
    *,
    reduction: str = "mean",
    signed_sqrt: bool = True,
    l2_normalize: bool = True,
    triu: bool = False,
    eps: float = SIGNED_SQRT_EPS,
    l2_eps: float = L2_EPS,
) -> Tensor:
    """Bilinear pooling, signed square root and L2 normalisation in one fused step.

    Computes ``l2_normalize(signed_sqrt(bilinear_pool(x_a, x_b).flatten(1)))``, the BCNN
    head of Liu, Juhas & Zhang (2020) ("Fast BCNN" when ``x_b`` is ``None``), with a
    custom backward that saves only the input feature map(s) and recomputes the
    :math:`C_1 \\times C_2` matrices when gradients are needed. Values and gradients
    equal the op-by-op definition (:func:`bilinear_pool`, :func:`signed_sqrt`,
    :func:`l2_normalize`, :func:`triu_pack`), which the tests check.

    Statistics are accumulated in float32 for float16/bfloat16 inputs and under
    autocast; the output, bounded by 1 after normalisation, is returned in the input's
    dtype (float32 if only ``signed_sqrt`` is applied without ``l2_normalize``, or
    with neither).

    Args:
        x_a: feature map :math:`A`.
        x_b: second feature map (two-stream BCNN); ``None`` pools ``x_a`` with itself.
        reduction: ``"mean"`` (divide by :math:`N = HW`) or ``"sum"``.
        signed_sqrt: apply :func:`signed_sqrt` elementwise.
        l2_normalize: scale each sample to unit L2 norm.
        triu: keep the upper triangle only (:func:`triu_pack`); single stream only,
            since :math:`A A^\\top` is symmetric.
        eps: :math:`\\epsilon` of :func:`signed_sqrt` (gradient bound ``1/(2 sqrt(eps))``).
        l2_eps: lower bound of the L2 norm.

    Shape:
        - x_a: :math:`(B, C_1, H, W)` or tokens :math:`(B, N, C_1)`.
        - x_b: :math:`(B, C_2, H, W)` or :math:`(B, N, C_2)`.
        - Output: :math:`(B, C_1 C_2)`, or :math:`(B, C_1 (C_1 + 1) / 2)` with ``triu``.

    Examples:
        >>> x = torch.relu(torch.randn(2, 16, 7, 7))
        >>> z = fast_bilinear_pool(x)
        >>> z.shape, torch.allclose(z.norm(dim=1), torch.ones(2))
        (torch.Size([2, 256]), True)
        >>> fast_bilinear_pool(x, triu=True).shape
        torch.Size([2, 136])
    """
    _check_reduction(reduction)
    _check_eps(eps)
    _check_eps(l2_eps, "l2_eps")
    a, b = pair_streams(x_a, x_b)
    if triu and b is not None:
        raise ValueError(
            "triu=True needs a symmetric matrix, i.e. one stream (x_b=None); "
            f"got two streams of shapes {tuple(x_a.shape)} and {tuple(x_b.shape)}"  # type: ignore[union-attr]
        )
    scale = 1.0 / a.shape[2] if reduction == "mean" else 1.0
    with no_autocast(a.device.type):
        out = _FusedBilinear.apply(
            a, b, scale, eps if signed_sqrt else None, l2_eps if l2_normalize else None, triu
        )
    return out.to(x_a.dtype) if l2_normalize else out
