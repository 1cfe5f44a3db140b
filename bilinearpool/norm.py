"""Normalisation layers for second-order features: signed square root and L2."""

from __future__ import annotations

from torch import Tensor, nn

from .functional import bilinear as _F

__all__ = ["L2Normalize", "SignedSqrt"]


class SignedSqrt(nn.Module):
    """Signed square root ``sign(x) * (sqrt(|x| + eps) - sqrt(eps))``, elementwise.

    The power normalisation of bilinear features (Perronnin et al. 2010; Lin et al. 2015).
    Its gradient is finite everywhere, zeros included, and at most
    ``1 / (2 * sqrt(eps))``; see :func:`bilinearpool.functional.signed_sqrt` for why this
    form rather than ``sign(x) * sqrt(|x| + eps)``.

    Args:
        eps: :math:`\\epsilon > 0`, bounds the gradient by :math:`1/(2\\sqrt{\\epsilon})`.

    Shape:
        - Input: any shape.
        - Output: same shape as the input.

    Examples:
        >>> import torch
        >>> SignedSqrt(eps=1e-12)(torch.tensor([-4.0, 0.0, 9.0])).round(decimals=4)
        tensor([-2.,  0.,  3.])
    """

    def __init__(self, *, eps: float = _F.SIGNED_SQRT_EPS) -> None:
        super().__init__()
        _F._check_eps(eps)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return _F.signed_sqrt(x, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class L2Normalize(nn.Module):
    """Scale each sample to unit L2 norm over all its non-batch dimensions.

    The last step of the bilinear feature of Lin, RoyChowdhury & Maji, "Bilinear CNN
    Models for Fine-grained Visual Recognition" (ICCV 2015), after the signed square root.

    Args:
        eps: lower bound of the divisor.

    Shape:
        - Input: :math:`(B, *)`.
        - Output: same shape as the input.

    Examples:
        >>> import torch
        >>> L2Normalize()(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """

    def __init__(self, *, eps: float = _F.L2_EPS) -> None:
        super().__init__()
        _F._check_eps(eps)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return _F.l2_normalize(x, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
