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
  rank-deficient or not; it approaches :math:`\\sqrt{A}` as :math:`K` grows, slowest on the
  smallest eigenvalues (which is the regularisation iSQRT-COV relies on).
- ``method="eig"``: the exact PSD square root :math:`U \\sqrt{\\max(\\Lambda, 0)} U^\\top`
  through :func:`torch.linalg.eigh` (improved B-CNN, Lin & Maji, BMVC 2017). Its gradient
  uses the divided differences :math:`1 / (\\sqrt{\\lambda_i} + \\sqrt{\\lambda_j})`, which need
  no division by eigenvalue gaps, so repeated eigenvalues are harmless; only the pairs
  of (numerically) zero eigenvalues, where the true derivative is infinite, are bounded
  by flooring the eigenvalues at ``eps * lambda_max`` in the backward pass.

Newton-Schulz is one function with two evaluation strategies (``impl``), equal up to
rounding:

- ``"iterative"``: the matrix iterations above (3 matrix products per step); the backward
  recomputes them from the saved input, so only :math:`A` is kept for backward (the
  public iSQRT-COV code keeps every :math:`Y_k, Z_k`).
- ``"spectral"``: evaluates the same polynomial :math:`q_K` on the eigenvalues of
  :math:`\\tilde A` and its exact gradient from divided differences of :math:`q_K`,
  computed by running the iteration on eigenvalue pairs (no division, so no loss at
  close eigenvalues). Saves the eigenvectors and eigenvalues only.
- ``"auto"`` (default): ``"spectral"`` on CPU, where LAPACK's ``eigh`` is cheaper than the
  matrix products; ``"iterative"`` elsewhere (GPUs multiply matrices fast and
  decompose them slowly), and always ``"iterative"`` during ONNX export.

All inputs are symmetrised, :math:`(A + A^\\top)/2`, so the gradient is the symmetric one.
float16/bfloat16 inputs (and autocast) are computed and returned in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_floating, compute_dtype, no_autocast

__all__ = ["matrix_sqrt"]

_METHODS = ("newton_schulz", "eig")
_NORMS = ("trace", "frobenius")
_IMPLS = ("auto", "iterative", "spectral")
#: Lower bound of the pre-normalisation factor s (guards the all-zero matrix).
_SCALE_EPS = 1e-12


def _check_matrices(a: Tensor) -> None:
    check_floating(a)
    if a.dim() != 3 or a.shape[1] != a.shape[2] or a.shape[1] == 0:
        raise ValueError(
            f"input must be a batch of square matrices (B, C, C) with C >= 1, but got shape {tuple(a.shape)}"
        )


def _check_config(method: str, num_iters: int, norm: str, impl: str, eps: float) -> None:
    """Raise ValueError for settings :func:`matrix_sqrt` does not accept."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, but got {method!r}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, but got {norm!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, but got {impl!r}")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive int, but got {num_iters!r}")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1), but got {eps!r}")


def _sym(a: Tensor) -> Tensor:
    return (a + a.transpose(1, 2)) * 0.5


def _eye_like(a: Tensor) -> Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)


def _scale(a: Tensor, norm: str) -> tuple[Tensor, Tensor]:
    """Pre-normalisation factor ``s`` (B,) and whether it was clamped (B,) bool."""
    if norm == "trace":
        raw = torch.diagonal(a, dim1=1, dim2=2).sum(-1)
    else:
        raw = torch.linalg.matrix_norm(a)
    return raw.clamp_min(_SCALE_EPS), raw <= _SCALE_EPS


def _ns_iterate(a_n: Tensor, num_iters: int) -> Tensor:
    """``q_K(a_n)`` by coupled Newton-Schulz iterations (plain ops, differentiable)."""
    eye = _eye_like(a_n)
    y = a_n
    z = eye
    for k in range(num_iters):
        # T = (3I - Z Y) / 2; the first step has Z = I, the last needs no Z.
        zy = y if k == 0 else torch.bmm(z, y)
        t = torch.sub(eye, zy, alpha=1.0 / 3.0).mul(1.5)
        y = torch.bmm(y, t)
        if k + 1 < num_iters:
            z = t if k == 0 else torch.bmm(t, z)
    return y


def _ns_plain(a: Tensor, num_iters: int, norm: str) -> Tensor:
    """Newton-Schulz square root written with differentiable ops (used to recompute)."""
    a = _sym(a)
    s, _ = _scale(a, norm)
    y = _ns_iterate(a / s.view(-1, 1, 1), num_iters)
    return y * s.sqrt().view(-1, 1, 1)


def _ns_values(lam: Tensor, num_iters: int) -> Tensor:
    """``q_K`` on eigenvalues (B, C), the forward of :func:`_ns_scalar` alone."""
    y, z = lam, torch.ones_like(lam)
    for _ in range(num_iters):
        t = 1.5 - 0.5 * (z * y)
        y, z = y * t, t * z
    return y


def _ns_scalar(lam: Tensor, num_iters: int) -> tuple[Tensor, Tensor]:
    """``q_K`` on eigenvalues (B, C) and its divided differences (B, C, C).

    Runs the iteration on pairs with the product rule of divided differences,
    ``[a, b](f g) = f(a) [a, b] g + [a, b] f g(b)``, so close or equal eigenvalues need no
    division; the diagonal holds the derivative ``q_K'``.
    """
    li, lj = lam.unsqueeze(2), lam.unsqueeze(1)
    y, dy = lam, torch.ones_like(li * lj)
    z, dz = torch.ones_like(lam), torch.zeros_like(dy)
    for _ in range(num_iters):
        p = z * y
        dp = z.unsqueeze(2) * dy + dz * y.unsqueeze(1)
        t = 1.5 - 0.5 * p
        dt = dp * -0.5
        dy = y.unsqueeze(2) * dt + dy * t.unsqueeze(1)
        dz = t.unsqueeze(2) * dz + dt * z.unsqueeze(1)
        y, z = y * t, t * z
    return y, dy


def _from_eig(u: Tensor, values: Tensor) -> Tensor:
    """``U diag(values) U^T``."""
    return torch.bmm(u * values.unsqueeze(1), u.transpose(1, 2))


def _conjugate(u: Tensor, g: Tensor) -> Tensor:
    """``U^T sym(G) U``."""
    return torch.bmm(u.transpose(1, 2), torch.bmm(_sym(g), u))


class _NSIterative(torch.autograd.Function):
    """Newton-Schulz by matrix iterations; backward recomputes them from the input."""

    @staticmethod
    def forward(ctx, a: Tensor, num_iters: int, norm: str) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a)
        ctx.config = (num_iters, norm)
        return _ns_plain(a, num_iters, norm)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (a,) = ctx.saved_tensors
        num_iters, norm = ctx.config
        with torch.enable_grad(), no_autocast(a.device.type):
            leaf = a.detach().requires_grad_(True)
            out = _ns_plain(leaf, num_iters, norm)
            (g,) = torch.autograd.grad(out, leaf, grad)
        return g, None, None


class _NSSpectral(torch.autograd.Function):
    """Newton-Schulz polynomial evaluated on eigenvalues; exact gradient of that polynomial."""

    @staticmethod
    def forward(ctx, a: Tensor, num_iters: int, norm: str) -> Tensor:  # type: ignore[override]
        a = _sym(a)
        s, clamped = _scale(a, norm)
        lam, u = torch.linalg.eigh(a / s.view(-1, 1, 1))
        q = _ns_values(lam, num_iters)
        ctx.save_for_backward(u, lam, s, clamped)
        ctx.config = (num_iters, norm)
        return _from_eig(u, q * s.sqrt().unsqueeze(1))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, lam, s, clamped = ctx.saved_tensors
        num_iters, norm = ctx.config
        q, dq = _ns_scalar(lam, num_iters)
        g_hat = _conjugate(u, grad)
        m_hat = g_hat * dq  # U^T L_q(A~, G) U
        # f(A) = sqrt(s) q(A / s): the chain rule through s adds a multiple of ds/dA.
        g_diag = torch.diagonal(g_hat, dim1=1, dim2=2)
        coef = 0.5 * (g_diag * q).sum(1) - (torch.diagonal(m_hat, dim1=1, dim2=2) * lam).sum(1)
        coef = torch.where(clamped, torch.zeros_like(coef), coef)
        # ds/dA is I (trace) or A~ (Frobenius), both diagonal in the eigenbasis.
        ds = torch.ones_like(lam) if norm == "trace" else lam
        m_hat = m_hat + torch.diag_embed(coef.unsqueeze(1) * ds)
        g = torch.bmm(u, torch.bmm(m_hat, u.transpose(1, 2)))
        return g / s.sqrt().view(-1, 1, 1), None, None


class _EigSqrt(torch.autograd.Function):
    """Exact PSD square root by eigendecomposition with a division-free backward."""

    @staticmethod
    def forward(ctx, a: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        lam, u = torch.linalg.eigh(_sym(a))
        ctx.save_for_backward(u, lam)
        ctx.eps = eps
        return _from_eig(u, lam.clamp_min(0).sqrt())

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        u, lam = ctx.saved_tensors
        top = lam.amax(1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny)
        root = torch.maximum(lam, top * ctx.eps).sqrt()
        k = 1.0 / (root.unsqueeze(2) + root.unsqueeze(1))
        g = torch.bmm(u, torch.bmm(_conjugate(u, grad) * k, u.transpose(1, 2)))
        return g, None


def matrix_sqrt(
    a: Tensor,
    *,
    method: str = "newton_schulz",
    num_iters: int = 5,
    norm: str = "trace",
    impl: str = "auto",
    eps: float = 1e-6,
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
        method: ``"newton_schulz"`` or ``"eig"``.
        num_iters: Newton-Schulz iterations :math:`K \\ge 1` (iSQRT-COV uses 3 to 5).
        norm: pre-normalisation :math:`s`, ``"trace"`` (:math:`\\operatorname{tr}A`, as
            iSQRT-COV) or ``"frobenius"`` (:math:`\\|A\\|_F`, converges a little faster).
        impl: how Newton-Schulz is evaluated: ``"iterative"`` (matrix products),
            ``"spectral"`` (the same polynomial on eigenvalues) or ``"auto"``
            (spectral on CPU, iterative elsewhere and in ONNX export).
        eps: ``method="eig"`` only: in the backward pass eigenvalues are floored at
            ``eps * lambda_max``, which bounds the gradient of pairs of (numerically)
            zero eigenvalues.

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
    _check_config(method, num_iters, norm, impl, eps)
    dtype = compute_dtype(a)
    with no_autocast(a.device.type):
        a = a.to(dtype)
        if method == "eig":
            return _EigSqrt.apply(a, float(eps))
        if impl == "auto":
            exporting = torch.onnx.is_in_onnx_export()
            impl = "spectral" if a.device.type == "cpu" and not exporting else "iterative"
        if impl == "spectral":
            return _NSSpectral.apply(a, num_iters, norm)
        if not (torch.is_grad_enabled() and a.requires_grad):
            # Nothing to differentiate: plain ops, which also trace for ONNX export.
            return _ns_plain(a, num_iters, norm)
        return _NSIterative.apply(a, num_iters, norm)
