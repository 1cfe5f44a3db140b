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
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _elementwise
from ._elementwise import grad_from_y_, signed_sqrt_
from ._memory import new_output
from ._checks import (
    check_choice,
    check_flags,
    check_floating,
    check_positive_int,
    check_real,
    compute_dtype,
    does_nothing,
    no_autocast,
    pair_streams,
    plain_ops,
)

__all__ = [
    "bilinear_pool",
    "fast_bilinear_pool",
    "l2_normalize",
    "signed_sqrt",
    "signed_sqrt_grad_bound",
    "triu_fold",
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
    check_choice("reduction", reduction, _REDUCTIONS)


#: The smallest ``eps`` taken: float32's smallest normal number. Below it ``eps`` (or its
#: square root) is 0 or subnormal in the float32 the ops compute in, and an exact zero of
#: the matrix gives 0 / 0 = NaN for the whole sample.
_EPS_FLOOR = torch.finfo(torch.float32).tiny
_EPS_KIND = f"a finite number >= {_EPS_FLOOR:.4g} (float32's smallest normal number)"


def _check_eps(eps: float, name: str = "eps") -> None:
    # eps < inf, not math.isfinite: a module's eps is a symbolic float under torch.compile(dynamic=True)
    check_real(name, eps, _EPS_KIND, lambda v: _EPS_FLOOR <= v < math.inf)


def _resolve_eps(eps: float | None, name: str, default: float, flag: str, on: bool) -> float | None:
    """``eps`` checked (its default when ``None``) where the step it belongs to runs
    (``on``); ``None`` where it does not, and a ValueError if one was given there, since
    it would do nothing (``flag`` names the setting that turns the step on)."""
    if not on:
        if eps is not None:
            raise does_nothing([name], f"{flag}=True only", f"{flag}=False", fix=f"set {flag}=True")
        return None
    if eps is None:
        return default
    _check_eps(eps, name)
    return eps


def _in_float32(x: Tensor) -> Tensor:
    """float16/bfloat16 ``x`` as float32 (a small ``eps`` and a norm of many squares need
    its precision and range); other dtypes as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


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
    dtype = compute_dtype(a, b)
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

    and computed in the second form, which needs no ``sign`` and cancels nothing
    (in float32 for float16/bfloat16 input, where a small :math:`\\epsilon` would round
    away, and returned in the input's dtype).
    :math:`f` is odd, continuous, strictly increasing, :math:`f(0) = 0`, and
    differentiable everywhere with

    .. math:: f'(x) = \\frac{1}{2\\sqrt{|x| + \\epsilon}} \\in \\left(0, \\tfrac{1}{2\\sqrt{\\epsilon}}\\right] ,

    so the gradient is finite for every finite input and at most
    :func:`signed_sqrt_grad_bound` (about 158 for the default ``eps=1e-5``), attained at
    exact zeros. Autograd through this definition gives exactly :math:`f'`.

    Why not the common ``sign(x) * sqrt(|x| + eps)``: it jumps by :math:`2\\sqrt{\\epsilon}`
    at 0 and autograd gives it gradient 0 there, while its closed-form gradient is
    :math:`1/(2\\sqrt{\\epsilon})`; exact zeros are frequent after ReLU (two channels with
    disjoint support), so the two disagree in practice. The shift by
    :math:`\\sqrt{\\epsilon}` removes the jump and makes both answers the same.

    Infinite entries give NaN (the quotient is inf / inf), as in the fused poolings, which
    compute :math:`f` the same way on every device; an L2 normalisation after it would
    give NaN for them anyway.

    Args:
        x: any floating-point tensor.
        eps: :math:`\\epsilon`, at least 1.175e-38 (float32's smallest normal number); bounds
            the gradient by :math:`1/(2\\sqrt{\\epsilon})`.

    Shape:
        - Input: any shape.
        - Output: same shape as the input.

    Examples:
        >>> signed_sqrt(torch.tensor([-4.0, 0.0, 9.0]), eps=1e-12).round(decimals=4)
        tensor([-2.,  0.,  3.])
    """
    check_floating(x)
    _check_eps(eps)
    y = _in_float32(x)
    return (y / (torch.sqrt(y.abs() + eps) + math.sqrt(eps))).to(x.dtype)


def signed_sqrt_grad_bound(eps: float = SIGNED_SQRT_EPS) -> float:
    """The largest gradient :func:`signed_sqrt` can have: ``1 / (2 * sqrt(eps))``.

    Args:
        eps: the ``eps`` given to :func:`signed_sqrt`.

    Returns:
        The bound on :math:`|d\\,\\mathrm{signed\\_sqrt}(x) / dx|`, as a float.

    Raises:
        TypeError: if ``eps`` is not a real number.
        ValueError: if ``eps`` is not finite and at least 1.175e-38 (float32's smallest
            normal number).

    Examples:
        >>> round(signed_sqrt_grad_bound(1e-5), 1)
        158.1
    """
    _check_eps(eps)
    return 0.5 / math.sqrt(eps)


def l2_normalize(x: Tensor, *, eps: float = L2_EPS) -> Tensor:
    """Scale each sample to unit L2 norm over all its non-batch dimensions.

    ``x / max(||x||, eps)``, as :func:`torch.nn.functional.normalize` (for a matrix
    per sample the norm is the Frobenius norm). float16/bfloat16 input is normalised in
    float32 (float16's norm of many entries overflows to inf, which gave zeros) and
    returned in its dtype.

    Args:
        x: batch of samples.
        eps: lower bound of the divisor, avoids division by zero.

    Shape:
        - Input: :math:`(B, *)` with at least one dimension after the batch.
        - Output: same shape as the input.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor or ``eps`` not a real number.
        ValueError: if ``eps`` is not finite and at least 1.175e-38 or ``x`` has fewer than 2
            dimensions.

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
    return F.normalize(_in_float32(x).flatten(1), dim=1, eps=eps).view_as(x).to(x.dtype)


def triu_size(channels: int) -> int:
    """Length of the packed upper triangle of a ``channels x channels`` matrix.

    Args:
        channels: the matrix side :math:`C`.

    Returns:
        :math:`C(C+1)/2`, the length of :func:`triu_pack`'s output.

    Raises:
        TypeError: if ``channels`` is not an integer.
        ValueError: if ``channels`` is less than 1.

    Examples:
        >>> triu_size(2048)
        2098176
    """
    channels = check_positive_int("channels", channels)
    return channels * (channels + 1) // 2


@functools.lru_cache(maxsize=64)
def _triu_numpy(rows: int, cols: int) -> np.ndarray:
    r, c = np.triu_indices(rows, m=cols)
    return r * cols + c


def _triu_block(r0: int, r1: int, c: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Packed upper-triangle entries of rows r0:r1 of a c x c matrix.

    Returns where they lie in the row-major ``(r1 - r0) x (c - r0)`` block that starts at
    column r0, and their isometry weights (1 on the diagonal, sqrt(2) off it). The index
    is built with numpy, so that traced and exported (ONNX) graphs hold it as a constant;
    the weights are filled in ``dtype``.
    """
    # ints: traced shapes may be tensors. The cache is skipped while torch.compile traces
    # (dynamo would trace through it anyway, and warns about it).
    build = _triu_numpy.__wrapped__ if torch.compiler.is_compiling() else _triu_numpy

    def tensors() -> tuple[Tensor, Tensor]:
        cols = int(c - r0)
        index = torch.from_numpy(build(int(r1 - r0), cols)).to(device)
        # sqrt(2) filled in the target dtype (torch.compile traced numpy's float64 in
        # float32); entry (i, i) of the block lies at i * (cols + 1)
        weights = torch.full(index.shape, math.sqrt(2.0), dtype=dtype, device=device)
        return index, weights.masked_fill_(index % (cols + 1) == 0, 1.0)

    if not torch.jit.is_tracing():
        return tensors()
    # torch.jit.trace holds them as constants of the traced channel count, as it holds the
    # model's weights: its warnings about that say nothing the user must act on
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return tensors()


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

    Raises:
        TypeError: if ``m`` is not a floating-point tensor.
        ValueError: if ``m`` is not a batch of square matrices.

    Examples:
        >>> m = torch.tensor([[[1.0, 2.0], [2.0, 3.0]]])
        >>> triu_pack(m)
        tensor([[1.0000, 2.8284, 3.0000]])
    """
    check_floating(m)
    if m.dim() != 3 or (not torch.jit.is_tracing() and m.shape[1] != m.shape[2]):
        raise ValueError(f"input must be square matrices (B, C, C), but got shape {tuple(m.shape)}")
    c = m.shape[1]
    index, scale = _triu_block(0, c, c, m.device, m.dtype)
    return m.reshape(m.shape[0], c * c).index_select(1, index) * scale


def triu_unpack(v: Tensor) -> Tensor:
    """Inverse of :func:`triu_pack`: rebuild the full symmetric matrices.

    Args:
        v: batch of packed upper triangles, as :func:`triu_pack` gives them (off-diagonal
            entries scaled by sqrt(2)).

    Shape:
        - Input: :math:`(B, C(C+1)/2)`.
        - Output: :math:`(B, C, C)`.

    Raises:
        TypeError: if ``v`` is not a floating-point tensor.
        ValueError: if ``v`` is not 2-D or its length is not :math:`C(C+1)/2` for any
            :math:`C`.

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



def triu_fold(weight: Tensor) -> Tensor:
    """A linear layer's weight on flattened symmetric matrices, folded onto their packed triangles.

    For symmetric ``S``, ``W vec(S) = sum_i W_ii S_ii + sum_{i<j} (W_ij + W_ji) S_ij``, so
    the weight ``W_t = triu_pack((W + W^T) / 2)`` (per output row, ``W`` seen as ``C x C``)
    gives the same outputs on :func:`triu_pack`'s vectors:
    ``W_t triu_pack(S) == W vec(S)``, with :math:`C(C+1)/2` instead of :math:`C^2` columns.
    This turns a trained full-output Fast BCNN classifier into the ``triu=True`` one
    (:meth:`~bilinearpool.BilinearClassifier.to_triu`). Rows are folded one at a time
    (no temporary larger than one row).

    Args:
        weight: ``(K, C^2)``.

    Shape:
        - Input: :math:`(K, C^2)`.
        - Output: :math:`(K, C(C+1)/2)`.

    Examples:
        >>> w = torch.randn(3, 16)
        >>> s = torch.randn(2, 4, 4)
        >>> s = s + s.transpose(1, 2)  # symmetric
        >>> torch.allclose(triu_pack(s) @ triu_fold(w).T, s.flatten(1) @ w.T, atol=1e-5)
        True
    """
    check_floating(weight, "weight")
    c = math.isqrt(weight.shape[1]) if weight.dim() == 2 else 0
    if weight.dim() != 2 or c < 1 or c * c != weight.shape[1]:
        raise ValueError(f"weight must be (K, C^2) for some channel count C, but got shape {tuple(weight.shape)}")
    index, scale = _triu_block(0, c, c, weight.device, weight.dtype)
    out = weight.new_empty(weight.shape[0], index.numel())
    for k in range(weight.shape[0]):
        w = weight[k].view(c, c)
        out[k] = (w + w.t()).view(-1).index_select(0, index).mul_(scale * 0.5)
    return out


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


def _panel_rows(channels: int, target: int) -> int:
    """Rows per panel of the one-stream op: about C/8, at least 128, at most ``target / C``.

    A panel holds rows r0:r1 of the symmetric matrix from column r0 on, so k equal panels
    compute (k + 1) / (2k) of the full product (0.56 for k = 8). Thin panels make slow
    matrix products and more small elementwise steps: on a 2-core CPU at one thread,
    panels of 128 rows were fastest or within noise of it at C = 256, 512 and 2048 (and
    32 rows up to 1.2x slower).
    """
    rows = max(128, -(-channels // 64) * 8)
    rows = min(rows, max(4, target // channels // 4 * 4))
    return min(rows, channels)


def _panels(batch: int, channels: int, target: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, r0, r1) panels of the upper triangle, several samples per panel when they fit."""
    rows = _panel_rows(channels, target)
    step = max(1, target // (rows * channels))
    return [
        (b0, min(b0 + step, batch), r0, min(r0 + rows, channels))
        for r0 in range(0, channels, rows)
        for b0 in range(0, batch, step)
    ]


#: The one-stream op's CPU forward and backward take whole samples in groups up to this
#: many entries per sample's matrix (C <= 256), panels of the upper triangle above it.
_GROUPS_UP_TO = 1 << 16


def _sample_groups(batch: int, channels: int, target: int) -> list[tuple[int, int]] | None:
    """(b0, b1) groups of whole samples, about ``target`` entries each, for the one-stream
    op on CPU (full or packed output); ``None`` where it builds panels of the upper triangle instead
    (:func:`_panels`): when one sample's ``C x C`` matrix exceeds ``target`` or
    :data:`_GROUPS_UP_TO` entries.

    A group is one batched product into its place in the output, one elementwise pass,
    and in backward one product ``S A``: full products, where panels compute 0.75 of them
    at two panels, but without the panels' mirrored copies, zero-filled gradient, strided
    per-sample products and per-panel Python work. Measured side by side on the 2-core
    development CPU (``benchmarks/bench_gram_paths.py``, committed in
    ``benchmarks/results/cpu-2core-gram-paths/``), groups were faster at C = 128 and 256
    and panels at C = 512, where the products dominate.
    """
    if channels * channels > min(target, _GROUPS_UP_TO):
        return None
    step = max(1, target // (channels * channels))
    return [(b0, min(b0 + step, batch)) for b0 in range(0, batch, step)]


def _gram_groups_forward(
    a_: Tensor,
    groups: list[tuple[int, int]],
    scale: float,
    eps: float | None,
    l2_eps: float | None,
    triu: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:class:`_FusedGram`'s CPU forward with whole samples (:func:`_sample_groups`): each
    group's matrices built in their place in the full output (packed output: in a
    group-sized scratch, then their upper triangles gathered, times the isometry weights)
    and normalised while in cache (the groups hold whole samples, so their norms are
    complete); returns the output and the norms (unclamped)."""
    batch, c = a_.shape[0], a_.shape[1]
    out = new_output(a_, batch, triu_size(c) if triu else c * c)
    size = _largest(groups)
    square = a_.new_empty(size, c, c) if triu else out.view(batch, c, c)
    norms = a_.new_empty(batch) if l2_eps is not None else None
    scratch = a_.new_empty(size, c, c) if eps is not None else None
    if triu:
        index, weight = _triu_block(0, c, c, a_.device, a_.dtype)
    for b0, b1 in groups:
        n = b1 - b0
        y = square[:n] if triu else square[b0:b1]
        signed_sqrt_(_scaled_bmm(a_[b0:b1], a_[b0:b1].transpose(1, 2), scale, out=y), eps, scratch)
        if norms is not None:
            norm = norms[b0:b1]
            torch.sqrt(_rowdot(y, y), out=norm)  # |y| of the matrix = that of its packed form
        if triu:
            y = torch.index_select(y.view(n, c * c), 1, index, out=out[b0:b1]).mul_(weight)
        if norms is not None:
            y.div_(norms[b0:b1].clamp_min(l2_eps).view(-1, *[1] * (y.dim() - 1)))
    return out, norms


def _largest(groups: list[tuple[int, int]]) -> int:
    """Samples in the largest of ``(b0, b1)`` groups (0 for none)."""
    return max((b1 - b0 for b0, b1 in groups), default=0)


def _gram_groups_backward(
    a_: Tensor,
    dz: Tensor,
    groups: list[tuple[int, int]],
    scale: float,
    eps: float | None,
    l2_eps: float | None,
    saved: list[Tensor],
    triu: bool = False,
) -> Tensor:
    """The gradient of :func:`_gram_groups_forward` for A, group by group in one sweep (a
    group's samples are whole, so its factors ``c, k`` of the L2 normalisation need no
    other group): the group's ``y = f(G)`` and ``t = sqrt(|G| + eps)`` rebuilt from A (or
    read from the saved output and norms: ``t = |y| + sqrt(eps)``), then ``dA = S A`` with
    one product, where ``S = dG + dG^T = s k (D - 2 c y) / (2 t)`` (``y`` and ``t`` are
    symmetric). Full output: ``D = dz + dz^T``. Packed output (``triu``): ``D`` is the
    incoming gradient times ``sqrt(2)`` off the diagonal and 2 on it, unpacked to both
    triangles, and ``c = <p, dz> / |p|^2 = <y, D> / (2 |y|^2)`` for the packed ``p``.
    Three group-sized scratch matrices serve every group: on CPU fresh temporaries cost
    as much as the passes over them.
    """
    batch, c = a_.shape[0], a_.shape[1]
    root = math.sqrt(eps) if eps is not None else 0.0
    if triu:
        index, weight = _triu_block(0, c, c, a_.device, a_.dtype)
        source = torch.from_numpy(_triu_source(c)).to(a_.device)
        # sqrt(2) off the diagonal, 2 on it (where weight is 1)
        doubled = torch.where(weight == 1.0, 2.0, weight)
    else:
        dz = dz.reshape(batch, c, c)
    if saved:
        out, norms = saved
        div = _divisors(out, norms, l2_eps)
        out_square = None if triu else out.view(batch, c, c)
    size = _largest(groups)
    y_buf, t_buf, s_buf = (a_.new_empty(size, c, c) for _ in range(3))
    half = scale * (0.5 if eps is not None else 1.0)
    g = torch.empty_like(a_)
    for b0, b1 in groups:
        n = b1 - b0
        y, t, s, d = y_buf[:n], t_buf[:n], s_buf[:n], dz[b0:b1]
        if saved and triu:
            _unpack_into(y, out[b0:b1] * (div[b0:b1, None] / weight), source)
        elif saved:
            torch.mul(out_square[b0:b1], div[b0:b1, None, None], out=y)  # type: ignore[index]
        else:
            _scaled_bmm(a_[b0:b1], a_[b0:b1].transpose(1, 2), scale, out=y)
            if eps is not None:
                # s holds t + sqrt(eps) until D goes there.
                torch.abs(y, out=t).add_(eps).sqrt_()
                y.div_(torch.add(t, root, out=s))
        if saved and eps is not None:
            torch.abs(y, out=t).add_(root)
        if triu:
            _unpack_into(s, d * doubled, source)
            dot = 0.5 * _rowdot(y, s) if l2_eps is not None else None
        else:
            dot = _rowdot(y, d) if l2_eps is not None else None
            for i in range(n):
                s[i].copy_(d[i].t())  # torch's blocked transpose: no strided pass over d
            s.add_(d)
        if l2_eps is not None:
            c_, k = _elementwise.l2_grad_factors(_rowdot(y, y), dot, l2_eps)  # type: ignore[arg-type]
            s.addcmul_(y, c_.mul_(-2.0).view(-1, 1, 1))
            k = k.mul_(half).view(-1, 1, 1)
            if eps is not None:
                s.div_(t.div_(k))
            else:
                s.mul_(k)
        elif eps is not None:
            s.div_(t).mul_(half)
        else:
            s.mul_(half)
        torch.bmm(s, a_[b0:b1], out=g[b0:b1])
    return g


def _unpack_into(square: Tensor, packed: Tensor, source: Tensor) -> Tensor:
    """Write ``packed`` (``(n, C(C+1)/2)``, upper triangles) into both triangles of
    ``square`` (``(n, C, C)``, contiguous) with one gather (``source``:
    :func:`_triu_source`): every entry is written, none needs zeroing (two scatters, as
    ``index_copy_`` does them, took 2-4x as long on CPU)."""
    n = square.shape[0]
    torch.gather(packed, 1, source.expand(n, -1), out=square.view(n, -1))
    return square


@functools.lru_cache(maxsize=16)
def _triu_source(c: int) -> np.ndarray:
    """For each entry (i, j) of a row-major ``C x C`` matrix, the position of entry
    (min(i, j), max(i, j)) in its packed upper triangle."""
    source = np.empty(c * c, dtype=np.int64)
    index = _triu_numpy(c, c)
    order = np.arange(index.size, dtype=np.int64)
    source[index] = order
    source[(index % c) * c + index // c] = order
    return source


def _triu_offset(row: int, c: int) -> int:
    """Position of entry (row, row) in the row-major packed upper triangle."""
    return row * c - row * (row - 1) // 2


#: From this many entries per sample on, :func:`_rowdot` calls one BLAS dot per sample.
_DOT_PER_SAMPLE_FROM = 1 << 14


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample inner products of two ``(b, ...)`` tensors of one shape.

    On CPU a batched product of (1 x n) by (n x 1) matrices runs about 7x slower than a
    dot product here (1.15 against 0.15-0.2 ns per entry, 1 thread, b = 8, n = 32768): long
    rows take one BLAS dot each (no temporary), short ones one vectorised multiply-and-sum.
    """
    b = x.shape[0]
    if x.dim() > 2 and not (x.is_contiguous() and y.is_contiguous()):
        # Strided blocks (e.g. panels of the output): row by row, no copy of the block.
        return torch.linalg.vecdot(x, y).flatten(1).sum(dim=1)
    x, y = x.flatten(1), y.flatten(1)
    if x.shape[1] >= _DOT_PER_SAMPLE_FROM:
        return torch.stack([torch.dot(x[i], y[i]) for i in range(b)]) if b else x.new_zeros(0)
    return torch.linalg.vecdot(x, y)


def _whole_matrices(device: torch.device) -> bool:
    """Whether the fused op builds whole ``(B, C1, C2)`` matrices (off CPU) rather than panels.

    A GPU gains nothing from cache-sized panels, and each panel costs several kernel
    launches and strided (transposed) copies; measured on an H100, the panel version was
    2-4x slower than the op-by-op chain. Off the CPU the op runs one batched product and
    one fused elementwise pass per step (:mod:`._elementwise`) instead.

    Also on CPU while the op is traced (``torch.compile``, ``torch.jit.trace``; ONNX
    export records :func:`_export_forward` instead): the graph then holds one product and
    a few elementwise steps, which a compiler fuses, instead of the panel loop unrolled
    into thousands of operations (at ``8x2048x7x7`` torch.compile with Inductor took more
    than 6 minutes on that).
    """
    return device.type != "cpu" or _elementwise.tracing()


def _triu_index(c: int, device: torch.device) -> Tensor:
    """Flat indices of the upper triangle of a c x c matrix, on ``device``, made once per
    (c, device) (16 MiB at c = 2048; the four most recent are kept; made afresh while
    traced, where the graph holds the op that makes them).

    The whole-matrix path's counterpart of :func:`_triu_block`: made on the device by
    ``torch.triu_indices`` rather than in numpy and copied from the host, which on a GPU
    cost a host-to-device copy of C(C+1)/2 indices per call; the isometry weights are
    applied by the elementwise steps (``diag``).
    """
    return _make_triu_index(c, device) if _elementwise.tracing() else _cached_triu_index(c, device)


def _make_triu_index(c: int, device: torch.device) -> Tensor:
    r, col = torch.triu_indices(c, c, device=device)
    return r * c + col


_cached_triu_index = functools.lru_cache(maxsize=4)(_make_triu_index)


def _whole_forward(
    a_: Tensor,
    b_: Tensor,
    scale: float,
    eps: float | None,
    l2_eps: float | None,
    triu: bool,
    norms: Tensor | None = None,
) -> Tensor:
    """``l2(ssqrt(s a b^T))``: one product, then one pass for the norms and one that writes
    (:func:`._elementwise.normalize_`); with ``triu``, the weighted triangle gathered.
    ``norms``, when given, receives the per-sample norms before normalisation."""
    batch, c1, c2 = a_.shape[0], a_.shape[1], b_.shape[1]
    out = a_.new_empty(batch, c1 * c2)
    g = _scaled_bmm(a_, b_.transpose(1, 2), scale, out=out.view(batch, c1, c2)).view(batch, c1 * c2)
    # The isometry weights make the packed triangle's norm the full matrix's.
    _elementwise.normalize_(g, eps, l2_eps, diag=c1 + 1 if triu else None, norms=norms)
    return g.index_select(1, _triu_index(c1, g.device)) if triu else out


def _export_forward(
    a: Tensor, b: Tensor, scale: float, eps: float | None, l2_eps: float | None, triu: bool
) -> Tensor:
    """The op's forward as out-of-place torch operations, for ONNX export: the same values
    as :func:`_whole_forward` (``f(g) = g / (sqrt(|g| + eps) + sqrt(eps))``), written so
    that the exporter, which does not follow in-place writes through views, records it."""
    dtype = compute_dtype(a, b)
    a_, b_ = a.to(dtype), b.to(dtype)
    y = (torch.bmm(a_, b_.transpose(1, 2)) * scale).flatten(1)
    if eps is not None:
        y = y / (torch.sqrt(y.abs() + eps) + math.sqrt(eps))
    if triu:
        index, weight = _triu_block(0, a_.shape[1], a_.shape[1], y.device, dtype)  # constants
        y = y.index_select(1, index) * weight
    return y if l2_eps is None else l2_normalize(y, eps=l2_eps)


def _definition_grads(
    inputs: tuple[Tensor, ...],
    grad: Tensor,
    scale: float,
    eps: float | None,
    l2_eps: float | None,
    triu: bool,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """The fused ops' input gradients by autograd through their definition
    (:func:`_export_forward`), as differentiable functions of the inputs and ``grad``.

    For a backward that records a graph (``create_graph=True``: gradient penalties,
    Hessian-vector products): the fused backward writes its result in place under
    ``no_grad`` and would silently give a gradient without history. This one costs the
    op-by-op chain's time and memory, only when asked for.
    """
    a, b = inputs[0], inputs[-1]
    with torch.enable_grad(), no_autocast(a.device.type):
        y = _export_forward(a, b, scale, eps, l2_eps, triu)
        wanted = [t for t, need in zip(inputs, needs) if need]
        grads = iter(torch.autograd.grad(y, wanted, grad.to(y.dtype), create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _whole_backward(
    a_: Tensor,
    b_: Tensor | None,
    dz: Tensor,
    scale: float,
    eps: float | None,
    l2_eps: float | None,
    needs: tuple[bool, bool],
    triu: bool = False,
    g: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of :func:`_whole_forward` for A (and B): one product to rebuild G (or
    ``g``, the ``(B, C1 C2)`` matrices G given, which are overwritten), one elementwise
    step (:func:`._elementwise.normalize_grad_`, which also applies the scale ``s``), and
    the products with dG (``dG A + dG^T A`` for one stream)."""
    one = b_ is None
    b_ = a_ if b_ is None else b_
    batch, c1, c2 = a_.shape[0], a_.shape[1], b_.shape[1]
    if g is None:
        g = _scaled_bmm(a_, b_.transpose(1, 2), scale).view(batch, c1 * c2)
    if triu:
        # The packed output is P(W Y) with P a selection, W the weights; the full-matrix
        # formulas apply to W P^T dz (W applied by the elementwise step).
        dz = g.new_zeros(batch, c1 * c2).index_copy_(1, _triu_index(c1, g.device), dz)
    else:
        dz = dz.reshape(batch, c1 * c2).contiguous()
    dg = _elementwise.normalize_grad_(g, dz, eps, l2_eps, scale, diag=c1 + 1 if triu else None).view(batch, c1, c2)
    if one:
        return torch.bmm(dg, a_).baddbmm_(dg.transpose(1, 2), a_), None
    g_a = torch.bmm(dg, b_) if needs[0] else None
    g_b = torch.bmm(dg.transpose(1, 2), a_) if needs[1] else None
    return g_a, g_b


def _g_from_output(out: Tensor, div: Tensor | None, eps: float | None, triu: bool, c1: int) -> Tensor:
    """The matrices ``G`` (``(B, C1 C2)``, new) from the op's saved output, for
    :func:`_whole_backward`: a packed output unweighted and mirrored to the full matrix,
    times the divisors of the normalisation ``div``, then the inverse of ``f``:
    ``g = y (|y| + 2 sqrt(eps))``."""
    batch = out.shape[0]
    if triu:
        full = out.new_zeros(batch, c1 * c1).index_copy_(1, _triu_index(c1, out.device), out)
        square = full.view(batch, c1, c1)
        diagonal = square.diagonal(dim1=1, dim2=2).clone()
        square.mul_(math.sqrt(0.5)).diagonal(dim1=1, dim2=2).copy_(diagonal)
        y = square.add_(square.transpose(1, 2).tril(-1)).view(batch, c1 * c1)
    else:
        y = out.clone()
    if div is not None:
        y.mul_(div.unsqueeze(1))
    if eps is not None:
        y.mul_(y.abs().add_(2.0 * math.sqrt(eps)))
    return y


def _divisors(out: Tensor, norms: Tensor | None, l2_eps: float | None) -> Tensor:
    """The per-sample factors ``d`` that undo the saved output's normalisation
    (``max(norm, l2_eps)``; ones without L2 normalisation)."""
    if norms is None or l2_eps is None:
        return out.new_ones(out.shape[0])
    return norms.clamp_min(l2_eps)


def _saved_l2_grad_factors(
    out: Tensor, norms: Tensor, div: Tensor, dz: Tensor, l2_eps: float
) -> tuple[Tensor, Tensor]:
    """:func:`._elementwise.l2_grad_factors` from the saved output ``y / d`` (``div`` = d)
    and norms: ``|y|^2 = norm^2`` and ``<y, dz> = d <out, dz>``, one pass over the output."""
    return _elementwise.l2_grad_factors(norms.square(), div * _rowdot(out, dz.reshape(out.shape)), l2_eps)


def _l2_sweep(
    like: Tensor,
    blocks: Sequence[tuple[int, ...]],
    build: Callable[..., Any],
    sums: Callable[[tuple[int, ...], Any], tuple[Tensor, Tensor]],
    l2_eps: float | None,
    saved: tuple[Tensor, Tensor, Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, list[Any] | None]:
    """The per-sample factors ``c, k`` of the L2 normalisation's gradient (``0, 1`` without
    it) for the fused backwards on CPU, and the entries their first sweep kept.

    From the saved output when there is one (``saved``: the output, its norms, the
    divisors and the incoming gradient; :func:`_saved_l2_grad_factors`). Else a first
    sweep builds every block (``build(*block)``, ``block = (b0, b1, ...)``), adds the sums
    of squares and of products with the incoming gradient that ``sums(block, entry)``
    gives to its samples', and keeps the entries for the second sweep up to
    :data:`_KEEP_BYTES` (transient: :func:`_take` frees each once used; the rest are
    rebuilt).
    """
    batch = like.shape[0]
    if l2_eps is None:
        return like.new_zeros(batch), like.new_ones(batch), None
    if saved is not None:
        return *_saved_l2_grad_factors(*saved, l2_eps), None
    kept: list[Any] = []
    room = _KEEP_BYTES
    sq, dot = like.new_zeros(batch), like.new_zeros(batch)
    for block in blocks:
        entry = build(*block)
        block_sq, block_dot = sums(block, entry)
        sq[block[0] : block[1]] += block_sq
        dot[block[0] : block[1]] += block_dot
        room = _keep(kept, entry, room)
    return *_elementwise.l2_grad_factors(sq, dot, l2_eps), kept


def _blocked_backward(
    a_: Tensor,
    b_: Tensor,
    dz: Tensor,
    scale: float,
    eps: float | None,
    l2_eps: float | None,
    needs: tuple[bool, bool],
    saved: tuple[Tensor, Tensor | None] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of the two-stream op on CPU, block by block (see :class:`_FusedBilinear`);
    with ``saved`` (the output and the norms, ``save_output=True``) the blocks are read
    from the output instead of rebuilt."""
    batch, c1, c2 = a_.shape[0], a_.shape[1], b_.shape[1]
    dz = dz.view(batch, c1, c2)
    blocks = _blocks(batch, c1, c2, _block_elements(a_.device))
    if saved is not None:
        out, norms = saved
        div = _divisors(out, norms, l2_eps)
        out = out.view(batch, c1, c2)

    def build(b0: int, b1: int, r0: int, r1: int) -> Tensor:
        if saved is not None:
            return out[b0:b1, r0:r1] * div[b0:b1].view(-1, 1, 1)
        return signed_sqrt_(_scaled_bmm(a_[b0:b1, r0:r1], b_[b0:b1].transpose(1, 2), scale), eps)

    c, k, kept = _l2_sweep(
        a_,
        blocks,
        build,
        lambda block, y: (_rowdot(y, y), _rowdot(y, dz[block[0] : block[1], block[2] : block[3]])),
        l2_eps,
        (saved[0], saved[1], div, dz) if saved is not None and saved[1] is not None else None,
    )
    # dG = s k (dz - c y) f'(G), f' = 1 / (2 (|y| + sqrt(eps))); the per-sample factor
    # s k / 2 goes into the block's elementwise step (no scaled copies of A and B).
    coef = k * (scale * (0.5 if eps is not None else 1.0))
    need_a, need_b = needs
    g_a = torch.zeros_like(a_) if need_a else None
    g_b = torch.zeros_like(b_) if need_b else None
    for i, (b0, b1, r0, r1) in enumerate(blocks):
        y = _take(kept, i)
        y = build(b0, b1, r0, r1) if y is None else y
        dg = grad_from_y_(y, dz[b0:b1, r0:r1], c[b0:b1], eps, coef[b0:b1])
        if g_a is not None:
            g_a[b0:b1, r0:r1].baddbmm_(dg, b_[b0:b1])
        if g_b is not None:
            g_b[b0:b1].baddbmm_(dg.transpose(1, 2), a_[b0:b1, r0:r1])
    return g_a, g_b


def _save(ctx: Any, inputs: tuple[Tensor, ...], out: Tensor, norms: Tensor | None, save_output: bool) -> None:
    """Save the inputs, and with ``save_output`` the output and its norms, for backward."""
    ctx.save_for_backward(*inputs, *((out, norms) if save_output else ()))


def _normalize_panels_(out: Tensor, sq: Tensor | None, l2_eps: float | None) -> Tensor | None:
    """Divide the panel-built output by its norms (from the squared norms ``sq``); return
    the norms (unclamped), or ``None`` without L2 normalisation."""
    if sq is None:
        return None
    norms = sq.sqrt_()
    out.div_(norms.clamp_min(l2_eps).unsqueeze(1))
    return norms


class _FusedBilinear(torch.autograd.Function):
    """Two streams: ``l2(ssqrt(s A B^T))`` built block by block, recomputed in backward.

    Only the inputs are saved. The backward needs two per-sample scalars (the norm and
    the inner product with the incoming gradient) before it can form dG, so it builds
    each block twice (or keeps the blocks of its first sweep when N is large) rather
    than storing a (B, C1, C2) buffer. With ``save_output`` the output and its norms are
    saved as well and the backward reads the blocks from them (no product to rebuild
    them). Off the CPU: whole matrices (:func:`_whole_matrices`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        a: Tensor,
        b: Tensor,
        scale: float,
        eps: float | None,
        l2_eps: float | None,
        save_output: bool,
    ) -> Tensor:
        ctx.config = (scale, eps, l2_eps)
        dtype = compute_dtype(a, b)
        a_, b_ = a.to(dtype), b.to(dtype)
        batch, c1, c2 = a.shape[0], a.shape[1], b.shape[1]
        norms = a_.new_empty(batch) if save_output and l2_eps is not None else None
        if _whole_matrices(a.device):
            out = _whole_forward(a_, b_, scale, eps, l2_eps, False, norms)
        else:
            out = new_output(a_, batch, c1 * c2)
            sq = a_.new_zeros(batch) if l2_eps is not None else None
            for b0, b1, r0, r1 in _blocks(batch, c1, c2, _block_elements(a.device)):
                seg = out[b0:b1, r0 * c2 : r1 * c2].view(b1 - b0, r1 - r0, c2)
                y = signed_sqrt_(_scaled_bmm(a_[b0:b1, r0:r1], b_[b0:b1].transpose(1, 2), scale, out=seg), eps)
                if sq is not None:
                    sq[b0:b1] += _rowdot(y, y)
            norms = _normalize_panels_(out, sq, l2_eps)
        _save(ctx, (a, b), out, norms, save_output)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        a, b, *saved = ctx.saved_tensors
        scale, eps, l2_eps = ctx.config
        if torch.is_grad_enabled():
            g_a, g_b = _definition_grads((a, b), grad, scale, eps, l2_eps, False, ctx.needs_input_grad[:2])
            return g_a, g_b, None, None, None, None
        dtype = compute_dtype(a, b)
        with torch.no_grad(), no_autocast(a.device.type):
            a_, b_, dz = a.to(dtype), b.to(dtype), grad.to(dtype)
            needs = ctx.needs_input_grad[:2]
            if not _whole_matrices(a.device):
                g_a, g_b = _blocked_backward(a_, b_, dz, scale, eps, l2_eps, needs, tuple(saved) if saved else None)
            else:
                g = _whole_g(saved, l2_eps, eps, False, a.shape[1])
                g_a, g_b = _whole_backward(a_, b_, dz, scale, eps, l2_eps, needs, g=g)
        return (
            None if g_a is None else g_a.to(a.dtype),
            None if g_b is None else g_b.to(b.dtype),
            None,
            None,
            None,
            None,
        )


def _whole_g(saved: list[Tensor], l2_eps: float | None, eps: float | None, triu: bool, c1: int) -> Tensor | None:
    """For :func:`_whole_backward`: G from the saved output (``None``, to rebuild it, when
    only the inputs were saved)."""
    if not saved:
        return None
    out, norms = saved
    return _g_from_output(out, _divisors(out, norms, l2_eps), eps, triu, c1)


class _FusedGram(torch.autograd.Function):
    """One stream: ``l2(ssqrt(s A A^T))``, full or packed, from the upper triangle only.

    ``G = s A A^T`` is symmetric, so the matrix is built in row panels, rows r0:r1 from
    column r0 on: about half the products and half the elementwise work of the full
    matrix. The full output gets each panel and its mirror image; the packed output
    (``triu``) the panel's upper-triangle entries times the isometry weights. Only the
    input is saved; the backward rebuilds the panels (keeping them from its first sweep
    for the second, transiently) and forms ``dA = S A`` with ``S = dG + dG^T`` symmetric,
    one product for the panel's rows and one for the rows below it. With ``save_output``
    the output and its norms are saved too, and the backward reads its panels from them
    (half a product and the first sweep's elementwise work less). That is the CPU
    algorithm for large matrices; matrices of at most :data:`_GROUPS_UP_TO` entries
    (full or packed output) are built in groups of whole samples instead
    (:func:`_sample_groups`). Off the CPU the op works on whole matrices
    (:func:`_whole_matrices`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        a: Tensor,
        scale: float,
        eps: float | None,
        l2_eps: float | None,
        triu: bool,
        save_output: bool,
    ) -> Tensor:
        ctx.config = (scale, eps, l2_eps, triu)
        out, norms = _FusedGram._forward(a, scale, eps, l2_eps, triu, save_output)
        _save(ctx, (a,), out, norms, save_output)
        return out

    @staticmethod
    def _forward(
        a: Tensor, scale: float, eps: float | None, l2_eps: float | None, triu: bool, save_output: bool
    ) -> tuple[Tensor, Tensor | None]:
        dtype = compute_dtype(a)
        a_ = a.to(dtype)
        if _whole_matrices(a.device):
            norms = a_.new_empty(a.shape[0]) if save_output and l2_eps is not None else None
            return _whole_forward(a_, a_, scale, eps, l2_eps, triu, norms), norms
        batch, c = a.shape[0], a.shape[1]
        groups = _sample_groups(batch, c, _block_elements(a.device))
        if groups is not None:
            return _gram_groups_forward(a_, groups, scale, eps, l2_eps, triu)
        out = new_output(a_, batch, triu_size(c) if triu else c * c)
        square = None if triu else out.view(batch, c, c)
        sq = a_.new_zeros(batch) if l2_eps is not None else None
        for b0, b1, r0, r1 in _panels(batch, c, _block_elements(a.device)):
            if triu:
                y = _pack_panel(_gram_panel(a_, b0, b1, r0, r1, scale, eps), r0, r1, c)
                out[b0:b1, _triu_offset(r0, c) : _triu_offset(r1, c)] = y
                if sq is not None:
                    sq[b0:b1] += _rowdot(y, y)
                continue
            # The panel is built in its place in the output; its part right of the diagonal
            # block is also written, transposed, as its mirror image below the diagonal.
            panel = square[b0:b1, r0:r1, r0:]  # type: ignore[index]
            lhs, rhs = a_[b0:b1, r0:r1], a_[b0:b1, r0:].transpose(1, 2)
            y = signed_sqrt_(_scaled_bmm(lhs, rhs, scale, out=panel), eps)
            w = r1 - r0
            square[b0:b1, r1:, r0:r1] = _transposed(y[:, :, w:])  # type: ignore[index]
            if sq is not None:
                # Off-diagonal entries appear twice in the full matrix.
                sq[b0:b1] += 2.0 * _rowdot(y, y) - _rowdot(y[:, :, :w], y[:, :, :w])
        return out, _normalize_panels_(out, sq, l2_eps)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        a, *saved = ctx.saved_tensors
        scale, eps, l2_eps, triu = ctx.config
        nothing = (None,) * 5
        if not ctx.needs_input_grad[0]:
            return None, *nothing
        if torch.is_grad_enabled():
            return *_definition_grads((a,), grad, scale, eps, l2_eps, triu, (True,)), *nothing
        dtype = compute_dtype(a)
        with torch.no_grad(), no_autocast(a.device.type):
            a_ = a.to(dtype)
            if _whole_matrices(a.device):
                g = _whole_g(saved, l2_eps, eps, triu, a.shape[1])
                g_a, _ = _whole_backward(a_, None, grad.to(dtype), scale, eps, l2_eps, (True, False), triu, g=g)
                return g_a.to(a.dtype), *nothing  # type: ignore[union-attr]
            batch, c = a.shape[0], a.shape[1]
            dz = grad.to(dtype)
            groups = _sample_groups(batch, c, _block_elements(a.device))
            if groups is not None:
                g = _gram_groups_backward(a_, dz, groups, scale, eps, l2_eps, saved, triu)
                return g.to(a.dtype), *nothing
            square = dz.view(batch, c, c) if not triu else None
            panels = _panels(batch, c, _block_elements(a.device))
            if saved:
                out, norms = saved
                div = _divisors(out, norms, l2_eps)
                out_square = out.view(batch, c, c) if not triu else None

            def build(b0: int, b1: int, r0: int, r1: int) -> tuple[Tensor, Tensor]:
                """The panel's values y and the incoming gradient dz on the same entries.

                Full output: dz + dz^T on the panel, the gradient of the symmetric G.
                Rebuilt from A, or read from the saved output (times the norms).
                """
                if triu:
                    seg = slice(_triu_offset(r0, c), _triu_offset(r1, c))
                    if saved:
                        y = out[b0:b1, seg] * div[b0:b1, None]
                    else:
                        y = _pack_panel(_gram_panel(a_, b0, b1, r0, r1, scale, eps), r0, r1, c)
                    return y, dz[b0:b1, seg]
                if saved:
                    y = out_square[b0:b1, r0:r1, r0:] * div[b0:b1, None, None]  # type: ignore[index]
                else:
                    y = _gram_panel(a_, b0, b1, r0, r1, scale, eps)
                return y, square[b0:b1, r0:r1, r0:] + _transposed(square[b0:b1, r0:, r0:r1])  # type: ignore[index]

            def sums(panel: tuple[int, ...], entry: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
                y, dzs = entry
                if triu:
                    return _rowdot(y, y), _rowdot(y, dzs)
                # <Y, DZ> over the full matrix: off-diagonal entries pair with dz + dz^T,
                # the square block counts it twice.
                w = panel[3] - panel[2]
                return (
                    2.0 * _rowdot(y, y) - y[:, :, :w].square().sum(dim=(1, 2)),
                    _rowdot(y, dzs) - 0.5 * (y[:, :, :w] * dzs[:, :, :w]).sum(dim=(1, 2)),
                )

            c_, k, kept = _l2_sweep(a_, panels, build, sums, l2_eps, (out, norms, div, dz) if saved else None)
            # Full output: S = dG + dG^T = s k (dz + dz^T - 2 c y) f'(G). Packed: each entry
            # w f(g) gets s k w (dz - c p) f'(g), and both of its factors get gradient.
            # f' = 1 / (2 (|y| + sqrt(eps))); the per-sample factor s k / 2 goes into the
            # panel's elementwise step (no scaled copy of A).
            coef = k * (scale * (0.5 if eps is not None else 1.0))
            g = torch.zeros_like(a_)
            for i, (b0, b1, r0, r1) in enumerate(panels):
                entry = _take(kept, i)
                y, dzs = build(b0, b1, r0, r1) if entry is None else entry
                shape = (-1, *[1] * (y.dim() - 1))
                cb = c_[b0:b1].view(shape) * (1.0 if triu else 2.0)
                kb = coef[b0:b1].view(shape)
                w = r1 - r0
                if triu:
                    index, weight = _triu_block(r0, r1, c, y.device, dtype)
                denom = None
                if eps is not None:
                    denom = (y.abs().div_(weight) if triu else y.abs()).add_(math.sqrt(eps)).div_(kb)
                dg = y.mul_(-cb).add_(dzs)
                dg = dg.div_(denom) if denom is not None else dg.mul_(kb)
                if triu:
                    full = dg.new_zeros(b1 - b0, w * (c - r0))
                    dg = full.index_copy_(1, index, dg.mul_(weight)).view(b1 - b0, w, c - r0)
                    # Upper-triangle entries D (diagonal block) and O (right of it): each
                    # gives gradient to both factors, so rows r0:r1 get (D + D^T) A[r0:r1]
                    # + O A[r1:] (the diagonal twice) and the rows below O^T A[r0:r1].
                    block = dg[:, :, :w]
                    block.copy_(block + _transposed(block))
                    g[b0:b1, r0:r1].baddbmm_(dg, a_[b0:b1, r0:])
                    g[b0:b1, r1:].baddbmm_(dg[:, :, w:].transpose(1, 2), a_[b0:b1, r0:r1])
                else:
                    # S is symmetric: rows r0:r1 get the panel times A, the rows below
                    # the mirror of its off-diagonal part.
                    g[b0:b1, r0:r1].baddbmm_(dg, a_[b0:b1, r0:])
                    g[b0:b1, r1:].baddbmm_(dg[:, :, w:].transpose(1, 2), a_[b0:b1, r0:r1])
        return g.to(a.dtype), *nothing


#: Bytes of blocks the CPU backward keeps from its first sweep for its second; blocks
#: beyond it are rebuilt. Keeping was faster at every N measured (3x3 to 28x28: the
#: elementwise steps of a rebuild cost more than its product with K = N), so this only
#: bounds the transient memory (the blocks kept at B=8, C=2048 take about 143 MB with one
#: stream and the full output, 67 MB packed, 134 MB with two streams).
_KEEP_BYTES = 1 << 28


def _keep(kept: list[Any], entry: Tensor | tuple[Tensor, ...], room: int) -> int:
    """Append ``entry`` (or ``None`` when its own memory exceeds ``room`` bytes) to ``kept``;
    return the room left. Views of other tensors (slices of the incoming gradient) are free."""
    parts = entry if isinstance(entry, tuple) else (entry,)
    size = sum(t.numel() * t.element_size() for t in parts if t._base is None)
    if size > room:
        kept.append(None)
        return room
    kept.append(entry)
    return room - size


def _take(kept: list[Any] | None, i: int) -> Any:
    """Entry ``i`` of the blocks kept by a first sweep (``None`` if none were kept), released
    from the list so that its memory is freed as soon as the caller is done with it."""
    if kept is None:
        return None
    entry, kept[i] = kept[i], None
    return entry


def _transposed(x: Tensor) -> Tensor:
    """The transpose of ``(b, m, n)`` blocks, ``(b, n, m)``: contiguous on CPU, a view elsewhere.

    On CPU an elementwise step that reads a transposed operand misses the cache and the
    TLB on every element; torch's blocked 2-D transpose copy avoids that (about 5x faster
    for 128 x 2048 blocks here), so the blocks are made contiguous and transposed one
    sample at a time.
    """
    if x.device.type != "cpu":
        return x.transpose(1, 2)
    x = x.contiguous()
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    for i in range(x.shape[0]):
        out[i].copy_(x[i].t())
    return out


def _gram_panel(a_: Tensor, b0: int, b1: int, r0: int, r1: int, scale: float, eps: float | None) -> Tensor:
    """Signed-square-rooted rows r0:r1, columns r0:, of G = s A A^T for samples b0:b1."""
    return signed_sqrt_(_scaled_bmm(a_[b0:b1, r0:r1], a_[b0:b1, r0:].transpose(1, 2), scale), eps)


def _scaled_bmm(x: Tensor, y: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """``scale * x @ y`` for batches of matrices, the scale applied by the product itself.

    Written into ``out`` (which may be a strided view, e.g. a panel of the output) when
    given; its old values are ignored. No scaled copy of an operand is made.
    """
    if out is None:
        out = x.new_empty(x.shape[0], x.shape[1], y.shape[2])
    return out.baddbmm_(x, y, beta=0.0, alpha=scale)


def _pack_panel(y: Tensor, r0: int, r1: int, c: int) -> Tensor:
    """The packed upper-triangle entries of a panel, times the isometry weights."""
    index, w = _triu_block(r0, r1, c, y.device, y.dtype)
    # index_select: 2.5-7x faster than advanced indexing ([:, index]) on CPU here.
    return y.view(y.shape[0], -1).index_select(1, index).mul_(w)


def fast_bilinear_pool(
    x_a: Tensor,
    x_b: Tensor | None = None,
    *,
    reduction: str = "mean",
    signed_sqrt: bool = True,
    l2_normalize: bool = True,
    triu: bool = False,
    eps: float | None = None,
    l2_eps: float | None = None,
    save_output: bool = False,
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

    On CPU the matrices are built in cache-sized panels (row blocks for two streams;
    groups of whole samples for one stream at ``C <= 256``); on
    other devices whole, with one batched product and fused elementwise passes (Triton
    kernels on CUDA when Triton is installed; ``BILINEARPOOL_TRITON=0`` selects torch
    operations); their per-sample sums are added in a fixed order (no atomics).

    Higher derivatives (a backward with ``create_graph=True``, e.g. gradient penalties)
    are exact: such a backward differentiates the op-by-op definition instead, at its
    time and memory. ``torch.jit.trace``, ONNX export and :func:`torch.export.export`
    record that definition's plain operations (an exported program differentiates
    them), and
    ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jvp``) and forward-mode AD
    run them (the op-by-op chain's time and memory there).

    Args:
        x_a: feature map :math:`A`.
        x_b: second feature map (two-stream BCNN); ``None`` pools ``x_a`` with itself.
        reduction: ``"mean"`` (divide by :math:`N = HW`) or ``"sum"`` (the same output
            with ``signed_sqrt=False`` and ``l2_normalize=True``: the norm cancels :math:`1/N`).
        signed_sqrt: apply :func:`signed_sqrt` elementwise.
        l2_normalize: scale each sample to unit L2 norm.
        triu: keep the upper triangle only (:func:`triu_pack`); single stream only,
            since :math:`A A^\\top` is symmetric.
        eps: :math:`\\epsilon` of :func:`signed_sqrt` (gradient bound ``1/(2 sqrt(eps))``);
            ``None`` means 1e-5 (``SIGNED_SQRT_EPS``). With ``signed_sqrt=False`` it
            would do nothing: giving it there is a ValueError.
        l2_eps: lower bound of the L2 norm; ``None`` means 1e-12 (``L2_EPS``). With
            ``l2_normalize=False``, giving it is a ValueError.
        save_output: also keep the output (and one norm per sample) for backward, which
            then reads the matrices from it instead of rebuilding them: one product fewer
            (on CPU half of one, as the forward builds the upper triangle only) and less
            elementwise work, for :math:`B \\times D` more saved values. That memory is
            free when the output's consumer keeps it anyway (a linear classifier straight
            on it saves its input), and costly otherwise (dropout between them saves its
            own copy). The output must then not be modified in place (autograd raises
            if it is). For float16/bfloat16 inputs the float32 output is kept, a copy of
            twice the returned tensor's size.

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
    check_flags(signed_sqrt=signed_sqrt, l2_normalize=l2_normalize, triu=triu, save_output=save_output)
    sqrt_eps = _resolve_eps(eps, "eps", SIGNED_SQRT_EPS, "signed_sqrt", signed_sqrt)
    norm_eps = _resolve_eps(l2_eps, "l2_eps", L2_EPS, "l2_normalize", l2_normalize)
    a, b = pair_streams(x_a, x_b)
    if triu and b is not None:
        raise ValueError(
            "triu=True needs a symmetric matrix, i.e. one stream (x_b=None); "
            f"got two streams of shapes {tuple(x_a.shape)} and {tuple(x_b.shape)}"  # type: ignore[union-attr]
        )
    scale = 1.0 / a.shape[2] if reduction == "mean" else 1.0
    with no_autocast(a.device.type):
        if plain_ops(a, b):
            # The exporters and torch.jit.trace record the forward's operations (an
            # autograd.Function has no ONNX form, torch.export keeps its forward only, and
            # the tracer cannot pass the scale, a traced size there, to one); torch.func
            # transforms and forward-mode AD
            # differentiate them: whole matrices, out of place, no loop over panels.
            out = _export_forward(a, a if b is None else b, scale, sqrt_eps, norm_eps, triu)
        elif b is None:
            out = _FusedGram.apply(a, scale, sqrt_eps, norm_eps, triu, save_output)
        else:
            out = _FusedBilinear.apply(a, b, scale, sqrt_eps, norm_eps, save_output)
    if not l2_normalize:
        return out
    return out.to(x_a.dtype if x_b is None else torch.promote_types(x_a.dtype, x_b.dtype))
