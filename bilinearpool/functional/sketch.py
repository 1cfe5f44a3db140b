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
  transform, which is linear). Cost :math:`O(N d \\log d)`. Locations are processed in
  chunks by a custom autograd function that saves only the inputs and recomputes the
  spectra in backward, so memory does not grow like :math:`N d`.
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
    """``(B, C, n)`` features -> ``(B, n, d)`` count sketches ``sum_{c: h(c)=j} s(c) x_c``."""
    src = m.transpose(1, 2) * sign.to(m.dtype)
    out = src.new_zeros(src.shape[0], src.shape[1], out_features)
    return out.index_add_(2, index, src)


# Locations per chunk are chosen so that one chunk's count sketch, (B, n, d), has about
# this many elements; the working set of forward and backward is a few such tensors.
_CHUNK_ELEMENTS = 1 << 20


def _chunk_size(batch: int, locations: int, out_features: int) -> int:
    return max(1, min(locations, _CHUNK_ELEMENTS // max(1, batch * out_features)))


def _stream_grad(
    g: Tensor,
    f_other: Tensor,
    chunk: Tensor,
    index: Tensor,
    sign: Tensor,
    d: int,
    need_x: bool,
    need_sign: bool,
    grads: list[Tensor],
    grad_sign: Tensor | None,
) -> Tensor | None:
    """One stream's gradient for one chunk of locations, in the sketch backward.

    d/d(Psi x) is the cross-correlation of the incoming gradient's spectrum ``g`` with the
    other stream's sketch spectrum, gathered at the hash positions h(c): (B, n, C). Appends
    the input gradient of the chunk to ``grads`` and returns the running sign gradient.
    """
    if not (need_x or need_sign):
        return grad_sign
    hit = torch.fft.irfft(g * f_other.conj(), n=d, dim=2).index_select(2, index)
    if need_x:
        grads.append((hit * sign.to(hit.dtype)).transpose(1, 2))
    if need_sign:
        part = (hit * chunk.transpose(1, 2)).sum(dim=(0, 1))
        grad_sign = part if grad_sign is None else grad_sign + part
    return grad_sign


class _TensorSketch(torch.autograd.Function):
    """``irfft(mean_n rfft(Psi_a a_n) * rfft(Psi_b b_n))``, in chunks of locations.

    Saves only the inputs and the hashes / signs; backward recomputes the spectra chunk
    by chunk. Gradients (``G = rfft(grad) / N``, ``F_a, F_b`` the spectra of a location):
    the output is the mean circular convolution of the count sketches, so
    ``d/d(Psi_a a_n) = irfft(G * conj(F_b))`` (a circular cross-correlation) and
    symmetrically for ``b``; through the count sketch this is a gather at the hash
    ``h(c)`` times the sign ``s(c)``. The backward is written with differentiable ops on
    the saved inputs, so double backward works too.
    """

    @staticmethod
    def forward(ctx, a, b, index_a, sign_a, index_b, sign_b, d):  # type: ignore[override]
        bsz, _, n = a.shape
        step = _chunk_size(bsz, n, d)
        acc = None
        for s in range(0, n, step):
            fa = torch.fft.rfft(_count_sketch(a[:, :, s : s + step], index_a, sign_a, d), n=d, dim=2)
            fb = torch.fft.rfft(_count_sketch(b[:, :, s : s + step], index_b, sign_b, d), n=d, dim=2)
            part = fa.mul_(fb).sum(dim=1)
            acc = part if acc is None else acc.add_(part)
        ctx.save_for_backward(a, b, index_a, sign_a, index_b, sign_b)
        ctx.d = d
        return torch.fft.irfft(acc.div_(n), n=d, dim=1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        a, b, index_a, sign_a, index_b, sign_b = ctx.saved_tensors
        d = ctx.d
        need_a, need_b, _, need_sa, _, need_sb = ctx.needs_input_grad[:6]
        out: list[Tensor | None] = [None] * 7
        if not (need_a or need_b or need_sa or need_sb):
            return tuple(out)
        bsz, _, n = a.shape
        step = _chunk_size(bsz, n, d)
        with no_autocast(a.device.type):
            g = torch.fft.rfft(grad.to(a.dtype), n=d, dim=1).div(n).unsqueeze(1)  # (B, 1, F)
            ga, gb, gsa, gsb = [], [], None, None
            for s in range(0, n, step):
                ca, cb = a[:, :, s : s + step], b[:, :, s : s + step]
                fa = torch.fft.rfft(_count_sketch(ca, index_a, sign_a, d), n=d, dim=2)
                fb = torch.fft.rfft(_count_sketch(cb, index_b, sign_b, d), n=d, dim=2)
                gsa = _stream_grad(g, fb, ca, index_a, sign_a, d, need_a, need_sa, ga, gsa)
                gsb = _stream_grad(g, fa, cb, index_b, sign_b, d, need_b, need_sb, gb, gsb)
        if need_a:
            out[0] = torch.cat(ga, dim=2)
        if need_b:
            out[1] = torch.cat(gb, dim=2)
        if need_sa:
            out[3] = gsa.to(sign_a.dtype)
        if need_sb:
            out[5] = gsb.to(sign_b.dtype)
        return tuple(out)


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

    From Gao et al., "Compact Bilinear Pooling" (CVPR 2016), Algorithm 2. Computed as
    :math:`\\mathcal F^{-1}\\big(\\frac1N \\sum_n \\mathcal F \\Psi_1 x_n \\circ \\mathcal F \\Psi_2 y_n\\big)`
    over chunks of locations; only the inputs (and hashes / signs) are saved for
    backward, which recomputes the per-location spectra chunk by chunk.

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
    one_stream = b is None
    b = a if b is None else b
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"out_features must be a positive int, but got {out_features!r}")
    for name, t, m in (("index_a", index_a, a), ("sign_a", sign_a, a), ("index_b", index_b, b), ("sign_b", sign_b, b)):
        _check_projection(name, t, m.shape[1], 1, "a vector")
    dtype = compute_dtype(a)
    d = out_features
    with no_autocast(a.device.type):
        a = a.to(dtype)
        b = a if one_stream else b.to(dtype)
        if torch.onnx.is_in_onnx_export():
            # The exporter traces the plain formula (and stops at rfft, which it lacks).
            fa = torch.fft.rfft(_count_sketch(a, index_a, sign_a, d), n=d, dim=2)
            fb = torch.fft.rfft(_count_sketch(b, index_b, sign_b, d), n=d, dim=2)
            return torch.fft.irfft((fa * fb).mean(dim=1), n=d, dim=1)
        return _TensorSketch.apply(a, b, index_a, sign_a, index_b, sign_b, d)


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
