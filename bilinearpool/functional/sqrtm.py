"""Matrix square root of symmetric positive semi-definite matrices, with finite gradients.

Two functions of a batch of covariance-like matrices :math:`A` (symmetric PSD, typically
rank-deficient: a 7x7 map gives 49 locations for 2048 channels):

- ``method="newton_schulz"``: the iSQRT-COV square root (Li, Xiong, Wang & Zhang,
  "Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix
  Square Root Normalization", CVPR 2018). Pre-normalise :math:`\\tilde A = A / s` with
  :math:`s = \\operatorname{tr} A` (or :math:`\\|A\\|_F`), run :math:`K` coupled
  Newton-Schulz iterations

  .. math:: T_k = \\tfrac12 (3I - Z_k Y_k), \\quad Y_{k+1} = Y_k T_k, \\quad
            Z_{k+1} = T_k Z_k, \\qquad Y_0 = \\tilde A,\\ Z_0 = I,

  and post-compensate :math:`\\sqrt{s}\\, Y_K`. :math:`Y_K = q_K(\\tilde A)` is a fixed
  polynomial of :math:`\\tilde A`, so values and gradients are finite for every input,
  rank-deficient or not (in float32 with ``impl="iterative"`` for :math:`K` up to about
  20: see :func:`matrix_sqrt`'s ``num_iters``); it approaches :math:`\\sqrt{A}` as
  :math:`K` grows, slowest on the smallest eigenvalues (which is the regularisation
  iSQRT-COV relies on). The result is exactly homogeneous, :math:`f(cA) = \\sqrt{c}\\,
  f(A)`, as long as :math:`s` is at least the square root of the dtype's smallest normal
  number (``torch.finfo(dtype).tiny ** 0.5``, about 1e-19 in float32 and 1e-154 in
  float64: the floor of :math:`s`, where the derivative of :math:`1/s` still fits the
  dtype). A matrix with :math:`s \\le 0` (the all-zero matrix; any other such input, a
  trace that is not positive, is not positive semi-definite) takes :math:`s = 1`: the zero
  matrix gets the square root 0 and the finite gradient :math:`q_K'(0)
  \\operatorname{sym}(G)`, with finite higher derivatives too.
- ``method="eig"``: the exact PSD square root :math:`U \\sqrt{\\max(\\Lambda, 0)} U^\\top`
  through :func:`torch.linalg.eigh` (improved B-CNN, Lin & Maji, BMVC 2017). Its gradient
  uses the divided differences :math:`1 / (\\sqrt{\\lambda_i} + \\sqrt{\\lambda_j})`, which need
  no division by eigenvalue gaps, so repeated eigenvalues are harmless; only the pairs
  of (numerically) zero eigenvalues, where the true derivative is infinite, are bounded
  by flooring the eigenvalues at ``eps * lambda_max`` in the backward pass
  (``lambda_max = 1`` where no eigenvalue is positive, e.g. the all-zero matrix, whose
  gradient is then :math:`\\operatorname{sym}(G) / (2\\sqrt{\\epsilon})`).

Newton-Schulz is one function with two evaluation strategies (``impl``), equal up to
rounding:

- ``"iterative"``: matrix products only, :math:`3K - 3` of them in the forward pass
  (the same polynomial through :math:`P_k = Z_k Y_k`, :math:`P_{k+1} = P_k T_k^2`,
  :math:`Y_{k+1} = Y_k T_k`). The backward uses that the derivative of a matrix polynomial
  at a symmetric matrix is self-adjoint: the gradient is the forward-mode derivative in
  the direction :math:`\\operatorname{sym}(G)`, carried along while the iterates are
  recomputed from the saved input (:math:`8K - 8` products, symmetric tangents making
  :math:`d(P^2)` one product). Only :math:`A` is kept for backward; the public iSQRT-COV
  code keeps every :math:`Y_k, Z_k` and spends :math:`10K` products in its backward.
- ``"spectral"``: evaluates the same polynomial :math:`q_K` on the eigenvalues of
  :math:`\\tilde A` (those below 0, rounding of a PSD input, taken as 0) and its exact gradient from the divided differences
  :math:`(q_K(\\lambda_i) - q_K(\\lambda_j)) / (\\lambda_i - \\lambda_j)` in closed form, with
  :math:`q_K` in float64 on the eigenvalues; the band of close pairs of the sorted
  spectrum, where that quotient cancels, is recomputed in float64 (:math:`q_K'`, from a
  forward-mode scalar recurrence, for equal pairs; under ``torch.compile``, which cannot
  size the band from the data, every pair is computed so, with several float64
  :math:`(B, C, C)` temporaries unless the backend fuses them). It shares its ``eigh`` and its
  products with ``method="eig"``: the two differ only by elementwise work. Saves the
  eigenvectors, and the eigenvalues with ``q_K`` and ``q_K'`` on them.
- ``"auto"`` (default): ``"spectral"`` on CPU, where LAPACK's ``eigh`` is cheaper than the
  matrix products; ``"iterative"`` elsewhere (GPUs multiply matrices fast and
  decompose them slowly), and always ``"iterative"`` during ONNX export,
  :func:`torch.export.export` and :func:`torch.jit.trace`.

While traced (ONNX export, :func:`torch.jit.trace`), ``"iterative"`` runs as plain
out-of-place operations, so the trace holds no Python autograd function and can be
exported or saved (:func:`torch.jit.save`); ``impl="spectral"`` and ``method="eig"`` are
autograd functions there and do neither. Under ``torch.func`` transforms (``grad``,
``vmap``, ``jacrev``, ``jvp``) and forward-mode AD, Newton-Schulz (either ``impl``) runs
as those plain operations; ``method="eig"`` raises a ``RuntimeError`` there. Under
:func:`torch.export.export` both impls run as the plain operations too (an exported
program keeps no autograd function, and differentiates what it recorded);
``method="eig"`` exports its forward only, for inference.

All inputs are symmetrised, :math:`(A + A^\\top)/2`, so the gradient is the symmetric one.
float16/bfloat16 inputs (and autocast) are computed and returned in float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

from ._checks import check_choice, check_floating, check_positive_int, check_real, compute_dtype, does_nothing, exporting, no_autocast, plain_ops

__all__ = ["matrix_sqrt"]

_METHODS = ("newton_schulz", "eig")
_NORMS = ("trace", "frobenius")
_IMPLS = ("auto", "iterative", "spectral")


def _check_matrices(a: Tensor) -> None:
    check_floating(a)
    if a.dim() != 3 or (not torch.jit.is_tracing() and (a.shape[1] != a.shape[2] or a.shape[1] == 0)):
        raise ValueError(
            f"input must be a batch of square matrices (B, C, C) with C >= 1, but got shape {tuple(a.shape)}"
        )


#: What each method reads (the rest of the settings do nothing there and are refused).
_METHOD_SETTINGS = {"newton_schulz": ("num_iters", "norm", "impl"), "eig": ("eps",)}
_DEFAULTS = {"num_iters": 5, "norm": "trace", "impl": "auto", "eps": 1e-6}


def _resolve_config(
    method: str, num_iters: int | None, norm: str | None, impl: str | None, eps: float | None
) -> tuple[int | None, str | None, str | None, float | None]:
    """Check the settings of :func:`matrix_sqrt` and fill in the defaults of ``method``'s.

    Returns ``(num_iters, norm, impl, eps)``: ``method``'s own settings, given or default
    (``num_iters`` as a Python int, ``eps`` as a Python float), and ``None`` for the others.

    Raises:
        ValueError: for an unknown value, or a setting given that ``method`` does not
            read (``num_iters``, ``norm`` and ``impl`` are Newton-Schulz's; ``eps`` is
            ``"eig"``'s), which would do nothing.
    """
    check_choice("method", method, _METHODS)
    given = {"num_iters": num_iters, "norm": norm, "impl": impl, "eps": eps}
    foreign = [k for k, v in given.items() if v is not None and k not in _METHOD_SETTINGS[method]]
    if foreign:
        other = next(m for m in _METHODS if m != method)
        raise does_nothing(foreign, f"method={other!r} only", f"method={method!r}", fix=f"use method={other!r}")
    settings = {k: (_DEFAULTS[k] if given[k] is None else given[k]) for k in _METHOD_SETTINGS[method]}
    if "norm" in settings:
        check_choice("norm", settings["norm"], _NORMS)
    if "impl" in settings:
        check_choice("impl", settings["impl"], _IMPLS)
    if "num_iters" in settings:
        # any integer (numpy scalars too); bools refused
        settings["num_iters"] = check_positive_int("num_iters", settings["num_iters"])
    if "eps" in settings:
        settings["eps"] = float(check_real("eps", settings["eps"], "a number in (0, 1)", lambda v: 0 < v < 1))
    return settings.get("num_iters"), settings.get("norm"), settings.get("impl"), settings.get("eps")


#: Divided differences of the Newton-Schulz polynomial (spectral backward): pairs of
#: eigenvalues with ``|l_i - l_j| <= _BAND_REL * (|l_i| + |l_j|)`` lie in a narrow band of the
#: sorted spectrum; there the quotient ``(q_i - q_j) / (l_i - l_j)`` loses digits to
#: cancellation, so the band is recomputed in float64 (the rest keeps at least
#: ``-log10(2 eps / _BAND_REL)`` digits: about 6 in float32).
_BAND_REL = 0.05
#: Inside the band, pairs closer than this (relative) take the mean of the two derivatives,
#: whose error is of order ``_EQUAL_REL ** 2``.
_EQUAL_REL = 1e-5
#: A band wider than this (clusters of many equal eigenvalues, e.g. a zero or scalar
#: matrix) has all pairs computed in float64 instead.
_BAND_MAX = 32


def _scale(a2: Tensor, norm: str, differentiable: bool = False) -> tuple[Tensor, Tensor]:
    """Pre-normalisation factor ``s`` of ``sym(a) = a2 / 2`` (B,) and whether it was replaced (B,) bool.

    ``s`` is floored at ``sqrt(finfo.tiny)`` only (so that ``1 / s`` and its derivative
    ``-1 / s^2`` stay finite), which keeps the result homogeneous, ``f(cA) = sqrt(c) f(A)``,
    down to that scale; ``s <= 0`` (the all-zero matrix) becomes 1, so that its square
    root is 0 with the gradient ``q_K'(0) sym(G)`` instead of one that grows like
    ``1 / sqrt(floor)``.
    Where replaced, ``s`` is a constant: no chain rule through it. ``differentiable``:
    autograd will differentiate ``s`` (to any order), so the norm avoids the zero matrix.
    """
    if norm == "trace":
        raw = torch.diagonal(a2, dim1=1, dim2=2).sum(-1) * 0.5
        empty = raw <= 0
    else:
        # ||a2|| = m ||a2 / m|| for the largest |entry| m: the squares of entries above
        # sqrt(finfo.max) (1.8e19 in float32) would overflow to inf. m is a constant to
        # autograd, which is exact to every order as the norm is homogeneous.
        m = a2.detach().abs().amax(dim=(1, 2))
        m = torch.where(m > 0, m, torch.ones_like(m)).view(-1, 1, 1)
        unit = a2 / m
        raw = torch.linalg.matrix_norm(unit) * m.view(-1) * 0.5
        empty = raw == 0
        if differentiable:
            # The norm's second derivative at 0 is NaN, and a mask after it multiplies the
            # NaN by 0: take the norm of a nonzero stand-in there (the "double where").
            safe = torch.where(empty.view(-1, 1, 1), torch.ones_like(unit), unit)
            raw = torch.linalg.matrix_norm(safe) * m.view(-1) * 0.5
    floor = torch.finfo(raw.dtype).tiny ** 0.5
    s = torch.where(empty, torch.ones_like(raw), raw.clamp_min(floor))
    return s, empty | (raw < floor)


def _sym_eigh(
    a: Tensor, norm: str | None = None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """Eigenvalues and eigenvectors of ``sym(a) / s`` (``s = 1`` for ``norm=None``).

    Shared by ``method="eig"`` and the spectral Newton-Schulz, so that they differ only by
    elementwise work on vectors. ``eigh`` runs on ``a + a^T`` (one pass, no halving or
    division over the matrix: scaling a symmetric matrix scales its eigenvalues and keeps
    its eigenvectors), and the eigenvalues are scaled instead. Returns
    ``(lam, u, s, clamped, buffer)``; ``buffer`` (``a + a^T``, no longer needed) can take
    the output.
    """
    a2 = a + a.transpose(1, 2)
    if norm is None:
        s = clamped = None
        factor: Tensor | float = 0.5
    else:
        s, clamped = _scale(a2, norm)
        factor = (0.5 / s).unsqueeze(1)
    try:
        lam, u = torch.linalg.eigh(a2)
    except torch.linalg.LinAlgError as err:
        # eigh blames ill-conditioning or repeated eigenvalues, also for NaN or inf (a
        # diverged training run): say so. Looked for only once it failed (no device sync).
        bad = int((~torch.isfinite(a)).flatten(1).any(1).sum())
        if bad == 0:
            raise
        raise ValueError(
            f"input holds non-finite values (NaN or inf) in {bad} of the {a.shape[0]} matrices of "
            f"the batch, which the eigendecomposition cannot take ({type(err).__name__}: {err}); "
            "such values usually come from a diverged training run (check the loss, the learning "
            "rate and the layers before)"
        ) from err
    return lam * factor, u, s, clamped, a2


def _from_eig(u: Tensor, values: Tensor, out: Tensor) -> Tensor:
    """``U diag(values) U^T`` into ``out``, scaling the columns of ``U`` (no diagonal matrix)."""
    return torch.bmm(u * values.unsqueeze(1), u.transpose(1, 2), out=out)


def _eig_backward(u: Tensor, grad: Tensor, weigh: Callable[[Tensor, Tensor], None]) -> Tensor:
    """``U (W o 2 U^T sym(G) U) U^T``: the backward shared by ``eig`` and spectral Newton-Schulz.

    ``weigh(gs, scratch)`` multiplies ``gs = 2 U^T sym(G) U`` (exactly symmetric, as it is
    symmetrised after the products) by the weights ``W`` in place, with one scratch
    matrix. Two (B, C, C) buffers in all, reused by the four products.
    """
    # Autocast is off here, as in every backward of the library: a backward run inside
    # an autocast region would otherwise compute the products in half precision (and the
    # ones with out= buffers refuse that).
    with no_autocast(u.device.type):
        ut = u.transpose(1, 2)
        gu = torch.bmm(grad, u)
        gh = torch.bmm(ut, gu)
        gs = torch.add(gh, gh.transpose(1, 2), out=gu)
        weigh(gs, gh)
        torch.bmm(gs, ut, out=gh)
        return torch.bmm(u, gh, out=gu)


def _ns_slopes(lam: Tensor, num_iters: int) -> tuple[Tensor, Tensor]:
    """``q_K`` and its derivative ``q_K'`` on eigenvalues (B, C): forward mode, O(C K).

    On scalars the coupled iteration reduces to ``p_0 = lam``, ``t_k = 3/2 - p_k / 2``,
    ``y_{k+1} = y_k t_k`` and ``p_{k+1} = p_k t_k^2`` (``p_k = z_k y_k``), whose derivatives
    are ``dy_{k+1} = dy_k t_k + y_k dt_k`` and ``dp_{k+1} = dp_k t_k (t_k - p_k)``.
    """
    y, p = lam.clone(), lam.clone()
    dy, dp = torch.ones_like(lam), torch.ones_like(lam)
    for _ in range(num_iters):
        t = p.mul(-0.5).add_(1.5)
        dt = dp.mul(-0.5)
        dy.mul_(t).addcmul_(y, dt)
        y.mul_(t)
        dp.mul_(t).mul_(t - p)
        p.mul_(t).mul_(t)
    return y, dy


def _dd_exact(li: Tensor, lj: Tensor, qi: Tensor, qj: Tensor, pi: Tensor, pj: Tensor) -> Tensor:
    """Divided differences ``(q_i - q_j) / (l_i - l_j)``; the mean derivative for (near) equal pairs."""
    d = li - lj
    equal = d.abs() <= _EQUAL_REL * (li.abs() + lj.abs())
    return torch.where(equal, 0.5 * (pi + pj), (qi - qj) / torch.where(equal, torch.ones_like(d), d))


def _band(lam64: Tensor) -> int:
    """Largest offset ``j - i`` of a close pair (``_BAND_REL``) in the sorted spectrum.

    Pairs of exact zeros are left out: the spectral Newton-Schulz takes the eigenvalues
    below 0 of a rank-deficient matrix as 0, hundreds of them (C=512 at 14x14), and
    :func:`_ns_weigh` gives such pairs ``q_K'(0)`` by itself; counted, they made the band
    as wide as the zero block and sent every pair to the float64 quotient (1.4x the time).
    """
    r = _BAND_REL
    bound = torch.where(lam64 > 0, lam64 * ((1 + r) / (1 - r)), lam64 * ((1 - r) / (1 + r)))
    end = torch.searchsorted(lam64, bound, right=True)
    start = torch.arange(1, lam64.shape[1] + 1, device=lam64.device)
    end = torch.where(lam64 == 0, start, end)
    return int((end - start).amax())


@functools.lru_cache(maxsize=32)
def _band_index(c: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flat indices into a (C, C) matrix of the band ``(i, i + o)``, ``0 <= o <= width``.

    Returns ``(upper, keep, upper_kept, lower_kept)``: the C * (width + 1) indices of the
    band read row by row (entries past the last column point at the row's last entry),
    the positions of the real entries among them, and the flat indices of those entries
    and of their mirror images ``(i + o, i)``.
    """
    i = torch.arange(c).unsqueeze(1)
    j = i + torch.arange(width + 1)
    keep = (j < c).flatten().nonzero().squeeze(1)
    upper = (i * c + j.clamp_max(c - 1)).flatten()
    return upper, keep, upper[keep], (j * c + i).flatten()[keep]


def _ns_weigh(
    gs: Tensor, scratch: Tensor, lam: Tensor, q64: Tensor, dq64: Tensor, factor: Tensor
) -> None:
    """``gs <- factor * gs o D`` in place; ``D_ij``: divided differences of ``q_K`` at the eigenvalues.

    Closed form, ``(q_i - q_j) / (l_i - l_j)`` over all pairs (4 in-place passes, with
    ``q_K`` evaluated in float64 on the C eigenvalues) instead of K iterations over the
    (C, C) pairs; then the band of close pairs of the sorted spectrum, where that quotient
    cancels, is recomputed in float64 (``q_K'`` for equal pairs), gathered and scattered
    back with one index each. ``q64`` and ``dq64``: ``q_K`` and ``q_K'`` (float64, (B, C));
    ``lam`` ascending, none below 0.
    """
    b, c = lam.shape
    lam64 = lam.double()
    f64 = factor.double().unsqueeze(1)
    # The band's width depends on the eigenvalues: under torch.compile, which cannot
    # branch on data, every pair takes the exact float64 quotient instead.
    width = _BAND_MAX + 1 if torch.compiler.is_compiling() else _band(lam64)
    if width <= _BAND_MAX:
        # Exact zeros come first in the sorted spectrum (z of them): their pairs, which
        # the closed form gives as 0 / 0, take q_K'(0) (q_K(0) = 0 exactly, so a zero
        # paired with a positive eigenvalue needs no band).
        zeros = (lam64 == 0).sum(1).tolist()
        blocks = [gs[i, :z, :z] * (dq64[i, 0] * f64[i, 0]).to(gs.dtype) if z > 1 else None
                  for i, z in enumerate(zeros)]
    if width > _BAND_MAX:
        dd = _dd_exact(
            lam64.unsqueeze(2), lam64.unsqueeze(1), q64.unsqueeze(2), q64.unsqueeze(1),
            dq64.unsqueeze(2), dq64.unsqueeze(1),
        )
        gs.copy_(gs.double() * dd * f64.unsqueeze(2))
        return

    # gather / scatter with (B, K) indices: much faster on CPU than advanced indexing.
    index = _band_index.__wrapped__ if torch.compiler.is_compiling() else _band_index  # dynamo skips caches
    upper, keep, upper_kept, lower_kept = (t.to(gs.device).expand(b, -1) for t in index(c, width))
    flat = gs.view(b, c * c)
    band = flat.gather(1, upper).view(b, c, width + 1)

    # Entry (i, o) of the (B, C, width + 1) windows is the pair (i, i + o); rows are
    # padded past the end with the last eigenvalue (those entries are not written back).
    def window(v: Tensor) -> Tensor:
        return torch.cat([v, v[:, -1:].expand(b, width)], 1).unfold(1, width + 1, 1)

    dd = _dd_exact(
        lam64.unsqueeze(2), window(lam64), q64.unsqueeze(2), window(q64), dq64.unsqueeze(2), window(dq64)
    )
    qf = (q64 * f64).to(gs.dtype)
    gs.mul_(torch.sub(qf.unsqueeze(2), qf.unsqueeze(1), out=scratch))
    gs.div_(torch.sub(lam.unsqueeze(2), lam.unsqueeze(1), out=scratch))
    band = (band * dd.mul_(f64.unsqueeze(2))).to(gs.dtype).view(b, -1).gather(1, keep)
    flat.scatter_(1, upper_kept, band)
    flat.scatter_(1, lower_kept, band)
    for i, block in enumerate(blocks):
        if block is not None:
            gs[i, : block.shape[0], : block.shape[0]] = block


def _ns_poly(a_n: Tensor, num_iters: int, plain: bool = False) -> Tensor:
    """``q_K(a_n)`` by matrix products.

    With :math:`P_k = Z_k Y_k` (all iterates are polynomials of :math:`\\tilde A`, so they
    commute), :math:`T_k = \\tfrac32 - \\tfrac12 P_k`, :math:`Y_{k+1} = Y_k T_k` and
    :math:`P_{k+1} = P_k T_k^2 = \\tfrac94 P_k - \\tfrac32 P_k^2 + \\tfrac14 P_k^3`: the same
    polynomial as the coupled iteration, in ``3K - 3`` products (``K >= 2``). Plain
    out-of-place ops while tracing (ONNX export, ``torch.compile``) and with ``plain``
    (differentiable by autograd), otherwise four reused buffers and in-place updates
    (fresh large allocations cost page faults).
    """
    if plain or torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        q = torch.bmm(a_n, a_n)
        y = torch.add(a_n, q, alpha=-1.0 / 3.0) * 1.5  # A T_0 = 1.5 A - 0.5 A^2
        if num_iters == 1:
            return y
        p = torch.baddbmm(torch.add(a_n, q, alpha=-2.0 / 3.0) * 2.25, q, a_n, alpha=0.25)
        for k in range(1, num_iters):
            y_next = torch.baddbmm(y, y, p, beta=1.5, alpha=-0.5)
            if k + 1 < num_iters:
                q = torch.bmm(p, p)
                p = torch.baddbmm(torch.add(p, q, alpha=-2.0 / 3.0) * 2.25, q, p, alpha=0.25)
            y = y_next
        return y
    q = torch.bmm(a_n, a_n)
    y = torch.add(a_n, q, alpha=-1.0 / 3.0).mul_(1.5)
    if num_iters == 1:
        return y
    p = torch.add(a_n, q, alpha=-2.0 / 3.0).mul_(2.25).baddbmm_(q, a_n, alpha=0.25)
    x = torch.empty_like(q)
    for k in range(1, num_iters):
        torch.bmm(y, p, out=x)
        y.mul_(1.5).add_(x, alpha=-0.5)
        if k + 1 < num_iters:
            torch.bmm(p, p, out=q)
            torch.bmm(q, p, out=x)
            p.mul_(2.25).add_(q, alpha=-1.5).add_(x, alpha=0.25)
    return y


def _ns_jvp(a_n: Tensor, e: Tensor, num_iters: int) -> tuple[Tensor, Tensor]:
    """``q_K(a_n)`` and its derivative in the symmetric direction ``e`` (forward mode).

    The derivative of a matrix polynomial at a symmetric matrix is self-adjoint, so this
    tangent *is* the gradient: the backward needs no stored iterates and no reverse sweep.
    Tangents of the symmetric iterates are symmetric, so ``d(P^2) = X + X^T`` with
    ``X = dP P`` costs one product; per step 3 products recompute the iterates and 5 carry
    the tangent (``8K - 8`` in all for ``K >= 2``, against ``10K`` in the published backward),
    and one elementwise step keeps ``dP`` symmetric against rounding (see the loop).
    Seven buffers, updated in place; ``a_n`` and ``e`` are not modified.
    """
    q = torch.bmm(a_n, a_n)
    x = torch.bmm(e, a_n)
    dq = torch.add(x, x.transpose(1, 2))
    y = torch.add(a_n, q, alpha=-1.0 / 3.0).mul_(1.5)
    dy = torch.add(e, dq, alpha=-1.0 / 3.0).mul_(1.5)
    if num_iters == 1:
        return y, dy
    p = torch.add(a_n, q, alpha=-2.0 / 3.0).mul_(2.25).baddbmm_(q, a_n, alpha=0.25)
    dp = torch.add(e, dq, alpha=-2.0 / 3.0).mul_(2.25)
    dp.baddbmm_(dq, a_n, alpha=0.25).baddbmm_(q, e, alpha=0.25)
    for k in range(1, num_iters):
        # dP is symmetric in exact arithmetic, but rounding leaves an antisymmetric part,
        # for which d(P^2) = X + X^T is wrong: as P -> I the step below maps it to 2.5 times
        # itself (it would be 0 for a symmetric part), so in float32 the gradient was 10%
        # off after 20 steps and useless after 30. Symmetrising dP each step keeps it exact.
        torch.add(dp, dp.transpose(1, 2), out=x)
        dp, x = x.mul_(0.5), dp
        # dY <- 1.5 dY - 0.5 (dY P + Y dP), then Y <- 1.5 Y - 0.5 Y P.
        torch.bmm(dy, p, out=x).baddbmm_(y, dp)
        dy.mul_(1.5).add_(x, alpha=-0.5)
        torch.bmm(y, p, out=x)
        y.mul_(1.5).add_(x, alpha=-0.5)
        if k + 1 < num_iters:
            torch.bmm(p, p, out=q)
            torch.bmm(dp, p, out=x)
            torch.add(x, x.transpose(1, 2), out=dq)
            # dP <- 2.25 dP - 1.5 dQ + 0.25 (dQ P + Q dP), then P <- 2.25 P - 1.5 Q + 0.25 Q P.
            torch.bmm(dq, p, out=x).baddbmm_(q, dp)
            dp.mul_(2.25).add_(dq, alpha=-1.5).add_(x, alpha=0.25)
            torch.bmm(q, p, out=x)
            p.mul_(2.25).add_(q, alpha=-1.5).add_(x, alpha=0.25)
    return y, dy


def _ns_plain(a: Tensor, num_iters: int, norm: str) -> Tensor:
    """Newton-Schulz square root with plain ops, in place (no-grad evaluation)."""
    a2 = a + a.transpose(1, 2)
    s, _ = _scale(a2, norm)
    y = _ns_poly(a2.mul_((0.5 / s).view(-1, 1, 1)), num_iters)
    return y.mul_(s.sqrt().view(-1, 1, 1))


def _ns_definition(a: Tensor, num_iters: int, norm: str) -> Tensor:
    """:func:`_ns_plain` out of place throughout, so that autograd can differentiate it
    (and its gradient) for a backward that records a graph, and in traces."""
    a2 = a + a.transpose(1, 2)
    # f(a) = sqrt(m) f(a / m) for a constant m >= 1 (the largest |entry| of a large a2):
    # else autograd's products of the gradient (~sqrt(s)) with a2 (~s) overflow to
    # inf - inf = NaN for s above ~1e25 in float32.
    m = a2.detach().abs().amax(dim=(1, 2)).clamp_min(1).view(-1, 1, 1)
    a2 = a2 / m
    s, _ = _scale(a2, norm, differentiable=True)
    y = _ns_poly(a2 * (0.5 / s).view(-1, 1, 1), num_iters, plain=True)
    return y * (s.sqrt().view(-1, 1, 1) * m.sqrt())


def _inner(x: Tensor, y: Tensor) -> Tensor:
    """Frobenius inner products ``<x_b, y_b>`` (B,), without an elementwise temporary."""
    b = x.shape[0]
    return torch.bmm(x.reshape(b, 1, -1), y.reshape(b, -1, 1)).view(b)


def _scale_grad(
    m: Tensor, coef: Tensor, clamped: Tensor, norm: str, a_n: Tensor | None, lam: Tensor | None
) -> None:
    """Add, in place, the chain rule through ``s`` to ``m`` (a gradient w.r.t. ``A~``, scaled by 1/sqrt(s)).

    ``coef`` (B,) is already divided by sqrt(s); ``ds/dA`` is ``I`` (trace) or ``A~``
    (Frobenius), given as the matrix ``a_n`` or, in the eigenbasis, the diagonal ``lam``.
    """
    coef = torch.where(clamped, torch.zeros_like(coef), coef).to(m.dtype)
    if norm == "trace":
        torch.diagonal(m, dim1=1, dim2=2).add_(coef.unsqueeze(1))
    elif lam is not None:
        torch.diagonal(m, dim1=1, dim2=2).add_(coef.unsqueeze(1) * lam)
    else:
        m.add_(a_n * coef.view(-1, 1, 1))


def _first_derivatives_only(op: str, advice: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a backward that autograd cannot differentiate (it works in place on buffers
    and does not keep the input): it raises in a backward that records a graph
    (``create_graph=True``), naming ``op`` and ``advice``.

    Its gradient would carry no history there, so a second derivative (a gradient
    penalty, a Hessian-vector product) would silently miss its part; and
    :func:`torch.autograd.function.once_differentiable` does not help when only some
    inputs are differentiated (``torch.autograd.grad(..., inputs)`` skips its error node,
    which has no path to them).
    """

    def decorate(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def run(ctx: Any, *grads: Tensor) -> Any:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{op} has first derivatives only, but its backward was asked to record a "
                    f"graph (create_graph=True) for higher derivatives; {advice}"
                )
            return backward(ctx, *grads)

        return run

    return decorate


class _NSIterative(torch.autograd.Function):
    """Newton-Schulz by matrix products; the backward recomputes the iterates from the input
    and carries the forward-mode tangent along (no stored iterates, no reverse sweep).
    A backward that records a graph (``create_graph=True``) differentiates the plain
    iteration instead (:func:`_ns_definition`), so higher derivatives are exact too."""

    @staticmethod
    def forward(ctx, a: Tensor, num_iters: int, norm: str) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a)
        ctx.config = (num_iters, norm)
        return _ns_plain(a, num_iters, norm)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        num_iters, norm = ctx.config
        if torch.is_grad_enabled():
            with no_autocast(a.device.type):
                y = _ns_definition(a, num_iters, norm)
                return torch.autograd.grad(y, a, grad, create_graph=True)[0], None, None
        with no_autocast(a.device.type):
            a2 = a + a.transpose(1, 2)
            s, clamped = _scale(a2, norm)
            a_n = a2.mul_((0.5 / s).view(-1, 1, 1))
            e = grad + grad.transpose(1, 2)  # 2 sym(G): the tangent below is twice L_q(A~, sym G)
            q, dq = _ns_jvp(a_n, e, num_iters)
            inv_root = s.rsqrt()
            # f(A) = sqrt(s) q(A / s): coef = <sym G, q(A~)> / 2 - <L_q(A~, sym G), A~>.
            coef = 0.25 * _inner(e, q) - 0.5 * _inner(dq, a_n)
            g = dq.mul_((0.5 * inv_root).view(-1, 1, 1))
            _scale_grad(g, coef * inv_root, clamped, norm, a_n, None)
        return g, None, None


class _NSSpectral(torch.autograd.Function):
    """Newton-Schulz polynomial evaluated on eigenvalues; exact gradient of that polynomial.
    First derivatives only: differentiating its gradient raises (``impl="iterative"``
    has higher derivatives)."""

    @staticmethod
    def forward(ctx, a: Tensor, num_iters: int, norm: str) -> Tensor:  # type: ignore[override]
        lam, u, s, clamped, buffer = _sym_eigh(a, norm)
        # A is PSD: eigenvalues below 0 are rounding (about -1e-7 of the largest in float32
        # for a rank-deficient A), and q_K grows 2.25x per step on them (to -inf near
        # K = 27); as the exact zeros they are, they get q_K(0) = 0 and q_K'(0).
        lam = lam.clamp_min_(0)
        q, dq = _ns_slopes(lam.double(), num_iters)  # q_K' too: the backward needs it
        ctx.save_for_backward(u, lam, s, clamped, q, dq)
        ctx.config = (num_iters, norm)
        return _from_eig(u, (q * s.double().sqrt().unsqueeze(1)).to(lam.dtype), buffer)

    @staticmethod
    @_first_derivatives_only('matrix_sqrt(impl="spectral")', 'use impl="iterative"')
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, lam, s, clamped, q, dq = ctx.saved_tensors
        num_iters, norm = ctx.config
        inv_root = s.rsqrt()

        def weigh(gs: Tensor, scratch: Tensor) -> None:
            # U^T L_q(A~, sym G) U / sqrt(s): divided differences of q_K times U^T sym(G) U.
            g_diag = 0.5 * torch.diagonal(gs, dim1=1, dim2=2).double()
            _ns_weigh(gs, scratch, lam, q, dq, 0.5 * inv_root)
            # f(A) = sqrt(s) q(A / s): the chain rule through s adds a multiple of ds/dA.
            coef = (g_diag * (0.5 * q - dq * lam.double())).sum(1)
            _scale_grad(gs, coef * inv_root.double(), clamped, norm, None, lam)

        return _eig_backward(u, grad, weigh), None, None


class _EigSqrt(torch.autograd.Function):
    """Exact PSD square root by eigendecomposition with a division-free backward.
    First derivatives only: differentiating its gradient raises."""

    @staticmethod
    def forward(ctx, a: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        lam, u, _, _, buffer = _sym_eigh(a)
        ctx.save_for_backward(u, lam)
        ctx.eps = eps
        return _from_eig(u, lam.clamp_min(0).sqrt(), buffer)

    @staticmethod
    @_first_derivatives_only('matrix_sqrt(method="eig")', 'use method="newton_schulz", impl="iterative"')
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, lam = ctx.saved_tensors
        # Floor eps * lambda_max, with lambda_max = 1 where no eigenvalue is positive (the
        # all-zero matrix, where the relative floor would be 0 and the gradient unbounded).
        top = lam.amax(1, keepdim=True)
        top = torch.where(top > 0, top, torch.ones_like(top))
        floor = (top * ctx.eps).clamp_min(torch.finfo(lam.dtype).tiny)
        root2 = torch.maximum(lam, floor).sqrt().mul_(2.0)

        def weigh(gs: Tensor, scratch: Tensor) -> None:
            # U^T sym(G) U / (r_i + r_j) = (2 U^T sym(G) U) / (2 r_i + 2 r_j).
            gs.div_(torch.add(root2.unsqueeze(2), root2.unsqueeze(1), out=scratch))

        return _eig_backward(u, grad, weigh), None


def matrix_sqrt(
    a: Tensor,
    *,
    method: str = "newton_schulz",
    num_iters: int | None = None,
    norm: str | None = None,
    impl: str | None = None,
    eps: float | None = None,
) -> Tensor:
    """Matrix square root of a batch of symmetric positive semi-definite matrices.

    ``method="newton_schulz"`` is the iSQRT-COV normalisation of Li et al. (CVPR 2018):
    pre-normalisation by the trace (or Frobenius norm), ``num_iters`` coupled
    Newton-Schulz iterations, post-compensation. ``method="eig"`` is the exact square
    root by eigendecomposition (Lin & Maji, "Improved Bilinear Pooling with CNNs",
    BMVC 2017). Both give finite values and gradients for rank-deficient inputs; see the
    module documentation for how.

    Args:
        a: symmetric PSD matrices :math:`A` (symmetrised as :math:`(A + A^\\top)/2`).
        method: ``"newton_schulz"`` or ``"eig"``. ``num_iters``, ``norm`` and ``impl``
            are Newton-Schulz's settings, ``eps`` is ``"eig"``'s; giving one to the other
            method is a ValueError (it would do nothing). ``None`` means the default.
        num_iters: Newton-Schulz iterations :math:`K \\ge 1`, default 5 (iSQRT-COV uses 3 to 5). The
            zero eigenvalues of a rank-deficient :math:`A` come out of float32 arithmetic
            as rounding noise (about 1e-7 of the largest), which each step multiplies by
            2.25: with ``impl="iterative"`` the result loses accuracy from about
            :math:`K = 20` and overflows from about :math:`K = 27` (float64: about twice
            those :math:`K`); ``impl="spectral"`` takes such eigenvalues as the zeros they
            are and stays finite at any :math:`K`.
        norm: pre-normalisation :math:`s`, ``"trace"`` (the default: :math:`\\operatorname{tr}A`, as
            iSQRT-COV) or ``"frobenius"`` (:math:`\\|A\\|_F`, converges a little faster).
        impl: how Newton-Schulz is evaluated: ``"iterative"`` (matrix products),
            ``"spectral"`` (the same polynomial on eigenvalues) or ``"auto"`` (the
            default: spectral on CPU, iterative elsewhere, in ONNX export and in
            :func:`torch.jit.trace`). Only ``"iterative"`` has higher derivatives
            (``create_graph=True``, e.g. gradient penalties); ``"spectral"`` and
            ``method="eig"`` raise there.
        eps: ``method="eig"`` only, default 1e-6: in the backward pass eigenvalues are floored at
            ``eps * lambda_max`` (``lambda_max = 1`` where no eigenvalue is positive,
            e.g. the all-zero matrix), which bounds the weight of each pair of
            eigenvectors in the gradient by ``1 / (2 sqrt(eps * lambda_max))``.

    Raises:
        ValueError: where the eigendecomposition (``impl="spectral"``, ``method="eig"``)
            fails on input that holds NaN or inf (it is looked for only then); see
            :class:`~bilinearpool.matrix_sqrt.MatrixSqrt` for what each path does with it.

    Shape:
        - Input: :math:`(B, C, C)`.
        - Output: :math:`(B, C, C)`, symmetric; float32 for float16/bfloat16 input.

    Examples:
        >>> x = torch.randn(2, 6, 20, dtype=torch.float64)
        >>> a = x @ x.transpose(1, 2) / 20
        >>> r = matrix_sqrt(a, method="eig")
        >>> torch.allclose(r @ r, a)
        True
        >>> r5 = matrix_sqrt(a, num_iters=30)
        >>> torch.allclose(r5, r, atol=1e-6)
        True
        >>> matrix_sqrt(a).shape
        torch.Size([2, 6, 6])
    """
    _check_matrices(a)
    num_iters, norm, impl, eps = _resolve_config(method, num_iters, norm, impl, eps)
    dtype = compute_dtype(a)
    with no_autocast(a.device.type):
        a = a.to(dtype)
        if not torch.jit.is_tracing() and a.shape[0] == 0:  # an empty batch: nothing to decompose
            return a * 0
        # ONNX export, torch.export and torch.jit.trace cannot record an autograd.Function;
        # torch.func transforms and forward-mode AD need rules that the Functions do not have.
        plain = plain_ops(a)
        transformed = plain and not exporting()
        if method == "eig":
            if transformed:
                raise RuntimeError(
                    'matrix_sqrt(method="eig") has no torch.func or forward-mode AD rule (the '
                    'eigendecomposition\'s derivative is unbounded at repeated eigenvalues); use '
                    'method="newton_schulz", which runs as plain operations there'
                )
            return _EigSqrt.apply(a, eps)
        if impl == "auto":
            impl = "spectral" if a.device.type == "cpu" and not plain else "iterative"
        # torch.export records a Function's forward operations only (an exported program
        # could not differentiate them): the spectral evaluation runs as its polynomial
        # there, as under torch.func (ONNX export and torch.jit.trace keep the Function
        # and refuse it, see above).
        if impl == "spectral" and (not plain or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()):
            return _NSSpectral.apply(a, num_iters, norm)
        if plain:
            # Out of place and differentiable by autograd, with or without grad: one graph
            # (torch.jit.trace's check reruns it under no_grad); under torch.func the
            # spectral evaluation's polynomial too (equal up to rounding).
            return _ns_definition(a, num_iters, norm)
        if not (torch.is_grad_enabled() and a.requires_grad):
            return _ns_plain(a, num_iters, norm)  # nothing to differentiate: in place
        return _NSIterative.apply(a, num_iters, norm)
