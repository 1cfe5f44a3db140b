"""Covariance pooling: mean-centred second-order pooling (MPN-COV / iSQRT-COV).

For a feature matrix :math:`X \\in \\mathbb{R}^{C \\times N}` over :math:`N = HW` locations,

.. math:: \\Sigma = X \\bar I X^\\top, \\qquad \\bar I = \\tfrac1N \\left(I - \\tfrac1N \\mathbf{1}\\mathbf{1}^\\top\\right)

(Li, Xie, Wang & Zhang, "Is Second-order Information Helpful for Large-scale Visual
Recognition?", ICCV 2017). The :math:`N \\times N` centring matrix :math:`\\bar I` is never
built: with :math:`X_c = X - \\mu \\mathbf 1^\\top` the same matrix is :math:`X_c X_c^\\top / N`.
The backward saves only the input and uses :math:`\\partial \\Sigma / \\partial X` in closed
form, :math:`(G + G^\\top) X_c / N`, whose rows already sum to zero over locations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import as_channel_matrix, compute_dtype, no_autocast, plain_ops

__all__ = ["covariance_pool"]


def _centred(x: Tensor, dtype: torch.dtype) -> Tensor:
    x = x.to(dtype)
    return x - x.mean(dim=2, keepdim=True)


class _Covariance(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        xc = _centred(x, compute_dtype(x))
        return torch.bmm(xc, xc.transpose(1, 2)).div_(x.shape[2])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        with no_autocast(x.device.type):
            xc = _centred(x, grad.dtype)
            g = torch.bmm(grad + grad.transpose(1, 2), xc).div_(x.shape[2])
        return g.to(x.dtype)


def covariance_pool(x: Tensor) -> Tensor:
    """Mean-centred covariance of the features over locations.

    The second-order pooling of MPN-COV (Li et al., ICCV 2017) and iSQRT-COV (Li et al.,
    CVPR 2018): :math:`\\Sigma = \\frac1N \\sum_n (x_n - \\mu)(x_n - \\mu)^\\top` with the
    mean :math:`\\mu` over the :math:`N` locations, computed without an :math:`N \\times N`
    centring matrix. Accumulated and returned in float32 for float16/bfloat16 inputs.

    Args:
        x: feature map or token sequence.

    Shape:
        - Input: :math:`(B, C, H, W)` or tokens :math:`(B, N, C)`.
        - Output: :math:`(B, C, C)`, symmetric positive semi-definite, of rank at most
          :math:`\\min(C, N - 1)` (centring removes one dimension: a single location
          gives the zero matrix).

    Examples:
        >>> x = torch.randn(2, 8, 7, 7)
        >>> cov = covariance_pool(x)
        >>> cov.shape
        torch.Size([2, 8, 8])
        >>> torch.allclose(cov[0], torch.cov(x[0].flatten(1), correction=0), atol=1e-6)
        True
    """
    m = as_channel_matrix(x)
    with no_autocast(m.device.type):
        # ONNX export and torch.jit.trace record the plain ops below (no autograd.Function);
        # torch.func transforms and forward-mode AD differentiate them.
        if torch.is_grad_enabled() and m.requires_grad and not plain_ops(m):
            return _Covariance.apply(m)
        xc = _centred(m, compute_dtype(m))
        return torch.bmm(xc, xc.transpose(1, 2)).div_(m.shape[2])
