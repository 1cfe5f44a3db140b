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
  transform, which is linear). Two algorithms compute it, both custom autograd
  functions that save only the inputs (and hashes / signs) for backward:

  - ``"fft"``: the formula above, per location. Cost :math:`O(N d \\log d)`. Locations
    are processed in chunks and backward recomputes the spectra, so memory does not
    grow like :math:`N d`.
  - ``"gram"``: the sketch is linear in :math:`G`,
    :math:`\\phi = \\sum_{ij} G_{ij} s_1(i) s_2(j) e_{(h_1(i) + h_2(j)) \\bmod d}`, so it is
    one batched matmul for :math:`G` (as full bilinear pooling) and a scatter-add of its
    :math:`C_1 C_2` entries into :math:`d` bins. Cost :math:`O(C_1 C_2 N)` at matmul
    speed plus :math:`O(C_1 C_2)`; worked in blocks of samples and rows of :math:`G`, and
    backward is a gather and matmuls, without :math:`G`.

  ``"auto"`` (the default) picks by a cost model measured on a CPU: Gram for small
  :math:`C_1 C_2` against :math:`d \\log d` (e.g. C=512 at 28x28 with d=8192, ~9x faster),
  FFT for large channel counts (C=2048 at d=8192, ~6x faster). ONNX export and
  ``torch.jit.trace`` record the Gram formula (plain operations, so a trace can be saved),
  and ``torch.func`` transforms and forward-mode AD differentiate it.
- **Random Maclaurin** (Kar & Karnick 2012): :math:`\\phi = \\frac{1}{\\sqrt d} (W_1 x) \\circ (W_2 y)`
  with Rademacher :math:`W_i \\in \\{\\pm1\\}^{d \\times C_i}`. Cost :math:`O(N d (C_1 + C_2))`.

For one stream (:math:`y = x`) the two projections must still be independent draws,
otherwise the estimate is biased. float16/bfloat16 inputs are computed and returned in
float32 (``torch.fft`` has no bfloat16 on CPU, and the products square magnitudes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _elementwise
from ._checks import RESIZE_BY_INTERPOLATE, check_choice, check_positive_int, compute_dtype, no_autocast, pair_streams, plain_ops

__all__ = ["random_maclaurin", "tensor_sketch"]


def _check_projection(name: str, t: Tensor, channels: int, dim: int, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, but got {type(t).__name__}")
    if t.dim() != dim or (not torch.jit.is_tracing() and t.shape[-1] != channels):
        raise ValueError(
            f"{name} must be {what} with last dimension {channels} (the input channels), "
            f"but got shape {tuple(t.shape)}"
        )


def _check_hash(name: str, index: Tensor, d: int) -> None:
    """``index`` must hold integer bins in ``[0, d)``: values outside would be wrapped
    modulo ``d`` by one algorithm and fail in the other. The values are checked on CPU (and
    asserted on the device elsewhere, without a host synchronisation), not while traced."""
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer bins (the hash of each channel), but got dtype {index.dtype}")
    if _elementwise.tracing() or index.numel() == 0:
        return
    bad = (index < 0) | (index >= d)
    if index.device.type != "cpu":
        torch._assert_async(~bad.any(), f"{name} must hold bins in [0, out_features={d})")
    elif bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name} must hold bins in [0, out_features={d}), but entry {i} is {int(index[i])}")


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


def _gradients(
    out: list[Tensor | None],
    ga: list[Tensor] | None,
    gb: list[Tensor] | None,
    dim: int,
    gsa: Tensor | None,
    gsb: Tensor | None,
    sign_a: Tensor,
    sign_b: Tensor,
) -> tuple[Tensor | None, ...]:
    """The backward's result: the streams' gradients joined from their chunks along ``dim``
    (slots 0 and 1), and the signs' gradients in the signs' dtype (slots 3 and 5)."""
    if ga is not None:
        out[0] = torch.cat(ga, dim=dim)
    if gb is not None:
        out[1] = torch.cat(gb, dim=dim)
    if gsa is not None:
        out[3] = gsa.to(sign_a.dtype)
    if gsb is not None:
        out[5] = gsb.to(sign_b.dtype)
    return tuple(out)


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
        return _gradients(out, ga if need_a else None, gb if need_b else None, 2, gsa, gsb, sign_a, sign_b)


# The Gram path works on blocks of (samples x rows) of the per-sample C1 x C2 matrix G,
# sized so that one block has about this many elements: besides inputs and outputs,
# forward and backward keep a few such blocks (G, the gathered gradient) and, once per
# call, the (C1, C2) int64 bins and sign weights. 2^18 (1 MiB of float32) measured
# fastest on the CPU: from 2^20 on, per-entry costs grow up to 2.5x (cache and page faults).
_GRAM_BLOCK_ELEMENTS = 1 << 18


# One stream: folding the two input-gradient products into one, (P∘W + (P∘W)^T) a, saves
# a (C x C) @ (C x N) product (2N flops per entry of G, ~0.03 N ns at one thread) but
# costs a second gather and multiply (~5 ns per entry); measured break-even N ~ 100-150.
_SYMMETRIC_MIN_LOCATIONS = 128


def _gram_blocks(batch: int, c1: int, c2: int) -> tuple[int, int]:
    """Samples and rows of G per block; whole samples while one fits in a block."""
    if c1 * c2 <= _GRAM_BLOCK_ELEMENTS:
        return max(1, min(batch, _GRAM_BLOCK_ELEMENTS // (c1 * c2))), c1
    return 1, max(1, min(c1, _GRAM_BLOCK_ELEMENTS // c2))


def _bins(index_a: Tensor, index_b: Tensor, d: int) -> Tensor:
    """``(C1, C2)`` output bin ``(h_a(i) + h_b(j)) mod d`` of each entry of G."""
    return (index_a.long()[:, None] + index_b.long()[None, :]).remainder(d)


def _gram_grad_symmetric(
    grad: Tensor,
    a: Tensor,
    index_a: Tensor,
    sa: Tensor,
    index_b: Tensor,
    sb: Tensor,
    d: int,
    step: int,
    rows: int,
) -> Tensor:
    """Input gradient of the one-stream Gram path, ``(P∘W + (P∘W)^T) a``: one product instead of two."""
    n = a.shape[2]
    # The transposed bins and weights are built contiguous: gathering through a transposed
    # view of ``bins`` reads it with stride C and costs more than the whole product at small N.
    bins, bins_t = _bins(index_a, index_b, d), _bins(index_b, index_a, d)
    weight, weight_t = sa[:, None] * sb[None, :] / n, sb[:, None] * sa[None, :] / n
    parts = []
    for s in range(0, a.shape[0], step):
        gs, a_s, rows_out = grad[s : s + step], a[s : s + step], []
        for r in range(0, a.shape[1], rows):
            p = gs.index_select(1, bins[r : r + rows].flatten()).view(gs.shape[0], -1, a.shape[1])
            p_t = gs.index_select(1, bins_t[r : r + rows].flatten()).view_as(p)
            dg = torch.addcmul(p * weight[r : r + rows], p_t, weight_t[r : r + rows])
            rows_out.append(torch.matmul(dg, a_s))
        parts.append(torch.cat(rows_out, dim=1))
    return torch.cat(parts, dim=0)


class _TensorSketchGram(torch.autograd.Function):
    """``sum_ij G_ij s_a(i) s_b(j) e_{(h_a(i) + h_b(j)) mod d}`` with ``G = a b^T / N``, in blocks.

    Tensor Sketch is linear in the pooled outer product G, so it is one batched matmul
    (as full bilinear pooling) followed by a count sketch of the ``C1 C2`` entries of G.
    Saves only the inputs and the hashes / signs, never G. Backward needs no G either:
    with ``P_ij = grad[(h_a(i) + h_b(j)) mod d]`` (a gather) and
    ``Q = (P diag(s_b) / N) b``, the input gradient is ``diag(s_a) Q`` and the sign
    gradient ``sum_{B,n} a * Q``; symmetrically for ``b`` with ``P^T``. For one stream
    without sign gradients the two products fold into one, ``(P∘W + (P∘W)^T) a`` with
    ``W = s_a s_b^T / N``. Written with differentiable ops, so double backward works.
    """

    @staticmethod
    def forward(ctx, a, b, index_a, sign_a, index_b, sign_b, d, one_stream):  # type: ignore[override]
        bsz, c1, n = a.shape
        c2 = b.shape[1]
        bins = _bins(index_a, index_b, d)
        weight = sign_a.to(a.dtype)[:, None] * sign_b.to(a.dtype)[None, :] / n
        step, rows = _gram_blocks(bsz, c1, c2)
        out = a.new_zeros(bsz, d)
        bt = b.transpose(1, 2)
        for s in range(0, bsz, step):
            for r in range(0, c1, rows):
                g = torch.matmul(a[s : s + step, r : r + rows], bt[s : s + step]).mul_(weight[r : r + rows])
                where = bins[r : r + rows].flatten().expand(g.shape[0], -1)
                out[s : s + step].scatter_add_(1, where, g.flatten(1))
        ctx.save_for_backward(a, b, index_a, sign_a, index_b, sign_b)
        ctx.d, ctx.one_stream = d, one_stream
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        a, b, index_a, sign_a, index_b, sign_b = ctx.saved_tensors
        need_a, need_b, _, need_sa, _, need_sb = ctx.needs_input_grad[:6]
        out: list[Tensor | None] = [None] * 8
        if not (need_a or need_b or need_sa or need_sb):
            return tuple(out)
        bsz, c1, n = a.shape
        c2 = b.shape[1]
        step, rows = _gram_blocks(bsz, c1, c2)
        with no_autocast(a.device.type):
            grad = grad.to(a.dtype)
            sa, sb = sign_a.to(a.dtype), sign_b.to(a.dtype)
            if ctx.one_stream and n >= _SYMMETRIC_MIN_LOCATIONS and not (need_sa or need_sb):
                out[0] = _gram_grad_symmetric(grad, a, index_a, sa, index_b, sb, ctx.d, step, rows)
                return tuple(out)
            bins = _bins(index_a, index_b, ctx.d)
            ga, gb, gsa, gsb = [], [], None, None
            for s in range(0, bsz, step):
                gs, a_s, b_s = grad[s : s + step], a[s : s + step], b[s : s + step]
                qa, acc_b = [], None
                for r in range(0, c1, rows):
                    p = gs.index_select(1, bins[r : r + rows].flatten()).view(gs.shape[0], -1, c2)
                    if need_a or need_sa:
                        qa.append(torch.matmul(p * (sb / n), b_s))
                    if need_b or need_sb:
                        pw = p * (sa[r : r + rows, None] / n)
                        part = torch.matmul(pw.transpose(1, 2), a_s[:, r : r + rows])
                        acc_b = part if acc_b is None else acc_b + part
                if qa:
                    q = torch.cat(qa, dim=1)
                    if need_a:
                        ga.append(q * sa[:, None])
                    if need_sa:
                        part = (q * a_s).sum(dim=(0, 2))
                        gsa = part if gsa is None else gsa + part
                if acc_b is not None:
                    if need_b:
                        gb.append(acc_b * sb[:, None])
                    if need_sb:
                        part = (acc_b * b_s).sum(dim=(0, 2))
                        gsb = part if gsb is None else gsb + part
        return _gradients(out, ga if need_a else None, gb if need_b else None, 0, gsa, gsb, sign_a, sign_b)


_ALGORITHMS = ("auto", "fft", "gram")

# "auto": a cost model of forward + backward per sample, in ns at one CPU thread, fitted by
# least squares to times of both algorithms measured with torch 2.14 on the shared two-core
# x86-64 development machine (C in 128..2048, N in 1..784, d in 2048..16384, one and two
# streams; benchmarks/bench_tensor_sketch.py times the shapes that check it):
#   fft:  N * (1.0 * d * log2(d) + 16 * (C1 + C2))   rfft / irfft and count sketches per location
#   gram: C1 * C2 * (5 + 0.033 * p * N)              scatter / gather of G, and p products
# with p = 2 for one stream at N >= _SYMMETRIC_MIN_LOCATIONS (the folded backward), else 3.
# The fit is within ~30% except at N ~ 9, where skinny matmuls make the Gram path up to
# 2.5x slower than modelled (fft still wins there at d = 8192). Most shapes are far from
# the boundary: at d = 8192 Gram is 6-25x faster for C <= 512 and N >= 196, and 5-90x
# slower for C >= 1536 and N <= 49; at C = 2048 and d = 8192 FFT wins at every N. The
# rule picked the faster algorithm at all 18 shapes of the benchmark's one- and
# two-stream runs. Not calibrated on GPUs; the same rule is used there.
_FFT_NS_PER_BUTTERFLY = 1.0
_FFT_NS_PER_CHANNEL = 16.0
_GRAM_NS_PER_ENTRY = 5.0
_GRAM_NS_PER_PRODUCT = 0.033


def _gram_is_cheaper(c1: int, c2: int, locations: int, d: int, one_stream: bool) -> bool:
    """Whether the Gram algorithm is predicted faster than the FFT one (see the cost model above)."""
    products = 2 if one_stream and locations >= _SYMMETRIC_MIN_LOCATIONS else 3
    fft = locations * (_FFT_NS_PER_BUTTERFLY * d * math.log2(max(d, 2)) + _FFT_NS_PER_CHANNEL * (c1 + c2))
    gram = c1 * c2 * (_GRAM_NS_PER_ENTRY + _GRAM_NS_PER_PRODUCT * products * locations)
    return gram < fft


def tensor_sketch(
    x: Tensor,
    y: Tensor | None = None,
    *,
    index_a: Tensor,
    sign_a: Tensor,
    index_b: Tensor,
    sign_b: Tensor,
    out_features: int,
    algorithm: str = "auto",
) -> Tensor:
    """Compact bilinear pooling by Tensor Sketch, averaged over locations.

    From Gao et al., "Compact Bilinear Pooling" (CVPR 2016), Algorithm 2:
    :math:`\\mathcal F^{-1}\\big(\\frac1N \\sum_n \\mathcal F \\Psi_1 x_n \\circ \\mathcal F \\Psi_2 y_n\\big)`,
    which equals the count sketch of the pooled outer product :math:`G = \\frac1N X Y^\\top`,
    :math:`\\sum_{ij} G_{ij} s_1(i) s_2(j) e_{(h_1(i) + h_2(j)) \\bmod d}`. Both
    algorithms save only the inputs (and hashes / signs) for backward:

    - ``"fft"`` evaluates the first form over chunks of locations, :math:`O(N d \\log d)`;
      backward recomputes the spectra chunk by chunk.
    - ``"gram"`` evaluates the second: one batched matmul and a scatter-add of the
      :math:`C_1 C_2` entries of :math:`G`, :math:`O(C_1 C_2 N)` at matmul speed plus
      :math:`O(C_1 C_2)`, in blocks of about :math:`2^{18}` entries of :math:`G`.
      Backward gathers the output gradient at the bins and multiplies, without :math:`G`.
    - ``"auto"`` picks the one a cost model predicts faster. Fitted to forward + backward
      times at one CPU thread, per sample in ns:
      FFT :math:`N (1.0\\, d \\log_2 d + 16 (C_1 + C_2))`, Gram
      :math:`C_1 C_2 (5 + 0.033\\, p N)` with :math:`p` = 2 matmuls for one stream at
      :math:`N \\ge 128`, else 3. Measured (one stream, d = 8192, one thread, fft / gram
      ms): B=16, C=512, 28x28: 1690 / 180; B=32, C=256, 14x14: 780 / 30;
      B=16, C=1024, 14x14: 460 / 260; B=8, C=2048, 7x7: 66 / 380; B=8, C=1536, 5x5:
      29 / 175 (``benchmarks/bench_tensor_sketch.py``). Not calibrated on GPUs; the same
      rule is used there.

    The two agree to rounding; ``"fft"`` and ``"gram"`` force one.

    Args:
        x: first feature map.
        y: second feature map; ``None`` pools ``x`` with itself (the two sketches still
            use the independent hashes ``a`` and ``b``).
        index_a: hash :math:`h_1`, ints in ``[0, out_features)``, one per channel of ``x``.
        sign_a: signs :math:`s_1` (:math:`\\pm 1`), one per channel of ``x``.
        index_b: hash :math:`h_2` for the channels of ``y`` (of ``x`` if ``y`` is None).
        sign_b: signs :math:`s_2` for the channels of ``y``.
        out_features: sketch dimension :math:`d`.
        algorithm: ``"auto"``, ``"fft"`` or ``"gram"`` (see above).

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
        >>> fft, gram = (tensor_sketch(x, index_a=h[0], sign_a=s[0], index_b=h[1], sign_b=s[1],
        ...                            out_features=64, algorithm=a) for a in ("fft", "gram"))
        >>> torch.allclose(fft, gram, atol=1e-5)
        True
    """
    a, b = pair_streams(x, y, names=("x", "y"), resize=RESIZE_BY_INTERPOLATE)
    one_stream = b is None
    b = a if b is None else b
    out_features = check_positive_int("out_features", out_features)
    for name, t, m in (("index_a", index_a, a), ("sign_a", sign_a, a), ("index_b", index_b, b), ("sign_b", sign_b, b)):
        _check_projection(name, t, m.shape[1], 1, "a vector")
    _check_hash("index_a", index_a, out_features)
    _check_hash("index_b", index_b, out_features)
    check_choice("algorithm", algorithm, _ALGORITHMS)
    # Any integer dtype passes the check; index_add_/index_select take int64 (or int32).
    index_a, index_b = index_a.long(), index_b.long()
    dtype = compute_dtype(a, b)
    d = out_features
    if not torch.jit.is_tracing() and a.shape[0] == 0:  # an empty batch: (0, d), still connected to every input
        inputs = (a, b, sign_a, sign_b) if sign_a.is_floating_point() and sign_b.is_floating_point() else (a, b)
        return a.new_zeros(0, d, dtype=dtype) + sum(t.to(dtype).sum() * 0 for t in inputs)
    with no_autocast(a.device.type):
        a = a.to(dtype)
        b = a if one_stream else b.to(dtype)
        if plain_ops(a, b, sign_a, sign_b):
            # The exporter and torch.jit.trace record the plain Gram formula (an autograd
            # Function has no ONNX form and cannot be saved with a trace; the exporter has
            # no rfft, and its index_add refuses repeated indices; scatter_add becomes
            # ScatterElements(reduction="add")); torch.func transforms and forward-mode
            # AD differentiate it.
            weight = sign_a.to(dtype)[:, None] * sign_b.to(dtype)[None, :] / a.shape[2]
            g = torch.matmul(a, b.transpose(1, 2)) * weight
            bins = _bins(index_a, index_b, d).flatten().expand(g.shape[0], -1)
            return g.new_zeros(g.shape[0], d).scatter_add(1, bins, g.flatten(1))
        if algorithm == "auto":
            cheaper = _gram_is_cheaper(a.shape[1], b.shape[1], a.shape[2], d, one_stream)
            algorithm = "gram" if cheaper else "fft"
        # One stream: the second input is a view of the first, not the same tensor, which
        # torch.compile refuses as an autograd.Function input twice (graph break, or an
        # error with fullgraph=True); the view's gradient flows back into a as before.
        b_in = a.view_as(a) if one_stream else b
        if algorithm == "gram":
            return _TensorSketchGram.apply(a, b_in, index_a, sign_a, index_b, sign_b, d, one_stream)
        return _TensorSketch.apply(a, b_in, index_a, sign_a, index_b, sign_b, d)


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
    a, b = pair_streams(x, y, names=("x", "y"), resize=RESIZE_BY_INTERPOLATE)
    b = a if b is None else b
    _check_projection("weight_a", weight_a, a.shape[1], 2, "a (d, C) matrix")
    _check_projection("weight_b", weight_b, b.shape[1], 2, "a (d, C) matrix")
    if not torch.jit.is_tracing() and weight_a.shape[0] != weight_b.shape[0]:
        raise ValueError(
            "weight_a and weight_b must have the same number of rows d, but got "
            f"{tuple(weight_a.shape)} and {tuple(weight_b.shape)}"
        )
    dtype = compute_dtype(a, b)
    d = weight_a.shape[0]
    with no_autocast(a.device.type):
        pa = torch.matmul(a.transpose(1, 2).to(dtype), weight_a.to(dtype).t())
        pb = torch.matmul(b.transpose(1, 2).to(dtype), weight_b.to(dtype).t())
        return (pa * pb).mean(dim=1) * d**-0.5
