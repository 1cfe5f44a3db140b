"""Matrix square root normalisation of second-order (covariance) matrices, as a module."""

from __future__ import annotations

import torch  # noqa: F401  (used by the doctest)
from torch import Tensor, nn

from .functional.bilinear import triu_pack
from .functional.sqrtm import _resolve_config, matrix_sqrt

__all__ = ["MatrixSqrt"]


class MatrixSqrt(nn.Module):
    """Matrix square root normalisation: iSQRT-COV Newton-Schulz or eigendecomposition.

    From Li et al., "Towards Faster Training of Global Covariance Pooling Networks by
    Iterative Matrix Square Root Normalization" (CVPR 2018) and Lin & Maji, "Improved
    Bilinear Pooling with CNNs" (BMVC 2017). Wraps
    :func:`bilinearpool.functional.sqrtm.matrix_sqrt`, which documents the methods; the
    default (Newton-Schulz, 5 iterations, trace pre-normalisation) is iSQRT-COV's.
    Values and gradients stay finite for rank-deficient inputs. Put it after
    :class:`~bilinearpool.covariance.CovariancePool` (or pass it as that pool's ``norm``)
    to get iSQRT-COV.

    Non-finite input (NaN or inf, e.g. from a diverged training run) is not looked for
    before the computation (that would cost a device sync per call); what happens depends
    on the path. The eigendecomposition paths (``impl="spectral"``, the default on CPU,
    and ``method="eig"``) raise a ValueError that says the input holds NaN or inf and in
    how many matrices of the batch, chained to :func:`torch.linalg.eigh`'s error, where
    ``eigh`` fails on it (as LAPACK's does for a matrix of NaN); where it does not fail
    (it may not, e.g. for a few inf entries) those matrices come out non-finite.
    ``impl="iterative"`` (the default on GPUs, and in export and tracing) never raises
    for it: the matrices that hold NaN or inf come out non-finite (NaN, or inf), the
    others as usual.

    Export: Newton-Schulz with ``impl="iterative"`` or ``impl="auto"`` (which picks the
    iterative form while exported or traced, on every device) exports to ONNX, with
    both the TorchScript exporter (``dynamo=False``) and the default dynamo exporter,
    ``triu=True`` included, and gives a :func:`torch.jit.trace` that
    :func:`torch.jit.save` can store. ``impl="spectral"`` and ``method="eig"`` do
    neither: they are Python autograd functions around an eigendecomposition, which
    ONNX has no operator for (the dynamo exporter raises a ``ConversionError``, the
    TorchScript exporter a ``RuntimeError``, :func:`torch.jit.save` "Could not export
    Python function call"). Under :func:`torch.export.export` the default and
    ``impl="spectral"`` run as the plain iteration (the spectral evaluation of the same
    polynomial, equal up to rounding), which the exported program differentiates;
    ``method="eig"`` exports its forward only, for inference (call the program under
    :func:`torch.no_grad`: with gradients on it fails). All methods and impls compile with
    ``torch.compile(fullgraph=True)``, backward included (compiled, the spectral
    backward takes the exact float64 quotient for every eigenvalue pair, not only the
    band of close pairs).

    Args:
        method: ``"newton_schulz"`` or ``"eig"`` (exact square root). ``num_iters``,
            ``norm`` and ``impl`` apply to Newton-Schulz only and ``eps`` to ``"eig"``
            only: giving one to the other method is a ValueError (it would do nothing);
            ``None`` means the default, and the attribute of a setting the method does
            not read is ``None``.
        num_iters: Newton-Schulz iterations, default 5 (an int, numpy integers included).
        norm: Newton-Schulz pre-normalisation, ``"trace"`` (default) or ``"frobenius"``.
        impl: Newton-Schulz evaluation, ``"auto"`` (default), ``"iterative"`` or ``"spectral"``.
        eps: ``method="eig"``: relative eigenvalue floor of the backward pass, default
            1e-6 (a real number in (0, 1), numpy floats included).
        triu: return the upper triangle, off-diagonals times :math:`\\sqrt2`
            (:func:`~bilinearpool.functional.triu_pack`), so its L2 norm is the
            matrix's Frobenius norm.

    Shape:
        - Input: :math:`(B, C, C)` symmetric positive semi-definite.
        - Output: :math:`(B, C, C)`, or :math:`(B, C(C+1)/2)` with ``triu=True``; float32
          for float16/bfloat16 input.

    Examples:
        >>> x = torch.randn(2, 8, 49)
        >>> cov = x @ x.transpose(1, 2) / 49
        >>> MatrixSqrt()(cov).shape
        torch.Size([2, 8, 8])
        >>> MatrixSqrt(method="eig", triu=True)(cov).shape
        torch.Size([2, 36])
        >>> MatrixSqrt(method="eig", num_iters=7)
        Traceback (most recent call last):
            ...
        ValueError: num_iters applies to method='newton_schulz' only, but method='eig'; drop num_iters (it would do nothing), or use method='newton_schulz'
    """

    def __init__(
        self,
        *,
        method: str = "newton_schulz",
        num_iters: int | None = None,
        norm: str | None = None,
        impl: str | None = None,
        eps: float | None = None,
        triu: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(triu, bool):
            raise TypeError(f"triu must be a bool, but got {type(triu).__name__}")
        self.method = method
        # the method's own settings (numpy scalars as Python numbers); None for the others
        self.num_iters, self.norm, self.impl, self.eps = _resolve_config(method, num_iters, norm, impl, eps)
        self.triu = triu

    def output_dim(self, in_channels: int, in_channels_b: int | None = None) -> int:
        """Flat size of the output for ``in_channels x in_channels`` input matrices."""
        if in_channels_b is not None and in_channels_b != in_channels:
            raise ValueError(
                f"MatrixSqrt takes square matrices, but got in_channels={in_channels} "
                f"and in_channels_b={in_channels_b}"
            )
        return in_channels * (in_channels + 1) // 2 if self.triu else in_channels * in_channels

    def forward(self, x: Tensor) -> Tensor:
        # only the method's own settings (a layer pickled before the others became None has them all)
        if self.method == "eig":
            out = matrix_sqrt(x, method="eig", eps=self.eps)
        else:
            out = matrix_sqrt(x, num_iters=self.num_iters, norm=self.norm, impl=self.impl)
        return triu_pack(out) if self.triu else out

    def extra_repr(self) -> str:
        if self.method == "eig":
            s = f"method='eig', eps={self.eps}"
        else:
            s = f"method='newton_schulz', num_iters={self.num_iters}, norm='{self.norm}', impl='{self.impl}'"
        return s + f", triu={self.triu}"
