"""Compact bilinear pooling: random features whose inner product approximates bilinear pooling.

Gao, Beijbom, Zhang & Darrell, "Compact Bilinear Pooling" (CVPR 2016). Both maps
:math:`\\phi: \\mathbb{R}^{C_1} \\times \\mathbb{R}^{C_2} \\to \\mathbb{R}^d` satisfy
:math:`\\mathbb{E}\\langle \\phi(x, y), \\phi(x', y') \\rangle = \\langle x, x' \\rangle \\langle y, y' \\rangle`
over the random projections, so pooled features
:math:`\\frac1N \\sum_n \\phi(x_n, y_n)` approximate the kernel of full bilinear pooling,
:math:`\\langle G, G' \\rangle_F` with :math:`G = \\frac1N \\sum_n x_n y_n^\\top`, in
:math:`d` dimensions instead of :math:`C_1 C_2`; the variance falls like :math:`1/d`.

- **Tensor Sketch** (Pham & Pagh 2013): count sketches :math:`\\Psi_1 x, \\Psi_2 y` with
  hashes :math:`h_i: [C_i] \\to [d]` and signs :math:`s_i \\in \\{\\pm 1\\}`, combined by
  circular convolution, :math:`\\phi = \\mathcal F^{-1}(\\mathcal F \\Psi_1 x \\circ \\mathcal F \\Psi_2 y)`
  (here ``torch.fft.rfft``; the sum over locations is taken before the inverse
  transform, which is linear). Cost :math:`O(N d \\log d)`.
- **Random Maclaurin** (Kar & Karnick 2012): :math:`\\phi = \\frac{1}{\\sqrt d} (W_1 x) \\circ (W_2 y)`
  with Rademacher :math:`W_i \\in \\{\\pm1\\}^{d \\times C_i}`. Cost :math:`O(N d (C_1 + C_2))`.

For one stream (:math:`y = x`) the two projections must still be independent draws,
otherwise the estimate is biased. float16/bfloat16 inputs are computed and returned in
float32 (``torch.fft`` has no bfloat16 on CPU, and the products square magnitudes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import compute_dtype, no_autocast, pair_streams

__all__ = ["random_maclaurin", "tensor_sketch"]


def _check_projection(name: str, t: Tensor, channels: int, dim: int, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, but got {type(t).__name__}")
    if t.dim() != dim or t.shape[-1] != channels:
        raise ValueError(
            f"{name} must be {what} with last dimension {channels} (the input channels), "
            f"but got shape {tuple(t.shape)}"
        )


def _count_sketch(m: Tensor, index: Tensor, sign: Tensor, out_features: int) -> Tensor:
    """``(B, C, N)`` features -> ``(B, N, d)`` count sketches ``sum_{c: h(c)=j} s(c) x_c``."""
    src = m.transpose(1, 2) * sign.to(m.dtype)
    out = src.new_zeros(src.shape[0], src.shape[1], out_features)
    return out.index_add(2, index, src)


def tensor_sketch(
    x: Tensor,
    y: Tensor | None = None,
    *,
    index_a: Tensor,
    sign_a: Tensor,
    index_b: Tensor,
    sign_b: Tensor,
    out_features: int,
) -> Tensor:
    """Compact bilinear pooling by Tensor Sketch, averaged over locations.

    From Gao et al., "Compact Bilinear Pooling" (CVPR 2016), Algorithm 2.

    Args:
        x: first feature map.
        y: second feature map; ``None`` pools ``x`` with itself (the two sketches still
            use the independent hashes ``a`` and ``b``).
        index_a: hash :math:`h_1`, ints in ``[0, out_features)``, one per channel of ``x``.
        sign_a: signs :math:`s_1` (:math:`\\pm 1`), one per channel of ``x``.
        index_b: hash :math:`h_2` for the channels of ``y`` (of ``x`` if ``y`` is None).
        sign_b: signs :math:`s_2` for the channels of ``y``.
        out_features: sketch dimension :math:`d`.

    Shape:
        - x: :math:`(B, C_1, H, W)` or tokens :math:`(B, N, C_1)`.
        - y: :math:`(B, C_2, H, W)` or :math:`(B, N, C_2)`, same locations.
        - Output: :math:`(B, d)`.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> h = [torch.randint(0, 64, (8,), generator=g) for _ in range(2)]
        >>> s = [torch.randint(0, 2, (8,), generator=g) * 2.0 - 1 for _ in range(2)]
        >>> x = torch.randn(2, 8, 7, 7)
        >>> tensor_sketch(x, index_a=h[0], sign_a=s[0], index_b=h[1], sign_b=s[1], out_features=64).shape
        torch.Size([2, 64])
    """
    a, b = pair_streams(x, y)
    b = a if b is None else b
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"out_features must be a positive int, but got {out_features!r}")
    for name, t, m in (("index_a", index_a, a), ("sign_a", sign_a, a), ("index_b", index_b, b), ("sign_b", sign_b, b)):
        _check_projection(name, t, m.shape[1], 1, "a vector")
    dtype = compute_dtype(a)
    d = out_features
    with no_autocast(a.device.type):
        fa = torch.fft.rfft(_count_sketch(a.to(dtype), index_a, sign_a, d), n=d, dim=2)
        fb = torch.fft.rfft(_count_sketch(b.to(dtype), index_b, sign_b, d), n=d, dim=2)
        return torch.fft.irfft((fa * fb).mean(dim=1), n=d, dim=1)


def random_maclaurin(
    x: Tensor,
    y: Tensor | None = None,
    *,
    weight_a: Tensor,
    weight_b: Tensor,
) -> Tensor:
    """Compact bilinear pooling by Random Maclaurin projection, averaged over locations.

    From Gao et al., "Compact Bilinear Pooling" (CVPR 2016), Algorithm 1:
    :math:`\\frac1N \\sum_n \\frac{1}{\\sqrt d} (W_1 x_n) \\circ (W_2 y_n)`.

    Args:
        x: first feature map.
        y: second feature map; ``None`` pools ``x`` with itself (with the independent
            projections ``weight_a`` and ``weight_b``).
        weight_a: :math:`W_1`, Rademacher (:math:`\\pm 1`) entries, ``(d, C_1)``.
        weight_b: :math:`W_2`, ``(d, C_2)`` (``(d, C_1)`` if ``y`` is None).

    Shape:
        - x: :math:`(B, C_1, H, W)` or tokens :math:`(B, N, C_1)`.
        - y: :math:`(B, C_2, H, W)` or :math:`(B, N, C_2)`, same locations.
        - Output: :math:`(B, d)`.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = [torch.randint(0, 2, (64, 8), generator=g) * 2.0 - 1 for _ in range(2)]
        >>> random_maclaurin(torch.randn(2, 8, 7, 7), weight_a=w[0], weight_b=w[1]).shape
        torch.Size([2, 64])
    """
    a, b = pair_streams(x, y)
    b = a if b is None else b
    _check_projection("weight_a", weight_a, a.shape[1], 2, "a (d, C) matrix")
    _check_projection("weight_b", weight_b, b.shape[1], 2, "a (d, C) matrix")
    if weight_a.shape[0] != weight_b.shape[0]:
        raise ValueError(
            "weight_a and weight_b must have the same number of rows d, but got "
            f"{tuple(weight_a.shape)} and {tuple(weight_b.shape)}"
        )
    dtype = compute_dtype(a)
    d = weight_a.shape[0]
    with no_autocast(a.device.type):
        pa = torch.matmul(a.transpose(1, 2).to(dtype), weight_a.to(dtype).t())
        pb = torch.matmul(b.transpose(1, 2).to(dtype), weight_b.to(dtype).t())
        return (pa * pb).mean(dim=1) * d**-0.5
