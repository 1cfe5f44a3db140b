"""Bilinear pooling modules: two-stream :class:`BilinearPool`, one-stream :class:`FastBilinearPool`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import bilinear as _F
from .functional._checks import as_channel_matrix, check_choice, check_flags, check_positive_int

__all__ = ["BilinearPool", "FastBilinearPool"]

_RESIZE_MODES = ("bilinear", "bicubic", "nearest", "area")


class BilinearPool(nn.Module):
    """Bilinear pooling of two feature maps (Lin, RoyChowdhury & Maji, ICCV 2015).

    The average over locations of the outer product of the two streams' features,
    :math:`G = A B^\\top / N`. With ``normalize=True`` it also applies the signed square
    root and L2 normalisation of the BCNN head (Liu, Juhas & Zhang, 2020) in one fused
    step (:func:`~bilinearpool.functional.fast_bilinear_pool`) and returns flat vectors.

    Args:
        reduction: ``"mean"`` over the :math:`N = HW` locations (the paper) or ``"sum"``.
        resize: what to do when the streams' spatial sizes differ. ``None`` raises a
            :class:`ValueError`; an interpolation mode (``"bilinear"``, ``"bicubic"``,
            ``"nearest"``, ``"area"``) resizes ``x_b`` to the size of ``x_a``, larger or
            smaller (``"area"`` is adaptive average pooling: each output cell averages the
            input cells it covers, shrinking or enlarging; it repeats values as
            ``"nearest"`` does only when the size grows by a whole factor).
        normalize: return ``l2_normalize(signed_sqrt(G))`` flattened, computed fused.
        eps: :math:`\\epsilon` of the signed square root, default 1e-5; with
            ``normalize=False`` there is none, and giving ``eps`` is a ValueError (the
            attribute is then ``None``).
        save_output: with ``normalize``, keep the output for backward as well as the
            inputs, so that the backward reads the matrices instead of rebuilding them
            (see :func:`~bilinearpool.functional.fast_bilinear_pool`).

    Shape:
        - x_a: :math:`(B, C_1, H, W)` or tokens :math:`(B, N, C_1)`.
        - x_b: :math:`(B, C_2, H', W')` or :math:`(B, N, C_2)`; ``None`` pools ``x_a`` with itself.
        - Output: :math:`(B, C_1, C_2)`, or :math:`(B, C_1 C_2)` with ``normalize``.

    Examples:
        >>> import torch
        >>> pool = BilinearPool()
        >>> pool(torch.randn(2, 64, 7, 7), torch.randn(2, 32, 7, 7)).shape
        torch.Size([2, 64, 32])
        >>> pool = BilinearPool(resize="bilinear", normalize=True)
        >>> pool(torch.randn(2, 64, 14, 14), torch.randn(2, 32, 7, 7)).shape
        torch.Size([2, 2048])
    """

    def __init__(
        self,
        *,
        reduction: str = "mean",
        resize: str | None = None,
        normalize: bool = False,
        eps: float | None = None,
        save_output: bool = False,
    ) -> None:
        super().__init__()
        _F._check_reduction(reduction)
        check_flags(normalize=normalize, save_output=save_output)
        eps = _F._resolve_eps(eps, "eps", _F.SIGNED_SQRT_EPS, "normalize", normalize)
        check_choice("resize", resize, _RESIZE_MODES, optional=True)
        if save_output and not normalize:
            raise ValueError(
                "save_output=True applies to the fused normalized op (normalize=True); "
                "without normalize the plain product's autograd saves the inputs"
            )
        self.save_output = save_output
        self.reduction = reduction
        self.resize = resize
        self.normalize = normalize
        self.eps = eps

    def output_dim(self, in_channels: int, in_channels_b: int | None = None) -> int:
        """Number of output features per sample for the given channel counts."""
        in_channels = check_positive_int("in_channels", in_channels)
        if in_channels_b is None:
            return in_channels * in_channels
        return in_channels * check_positive_int("in_channels_b", in_channels_b)

    def forward(self, x_a: Tensor, x_b: Tensor | None = None, save_output: bool | None = None) -> Tensor:
        """Pool ``x_a`` with ``x_b`` (or with itself); ``save_output`` overrides the layer's
        setting for this call (the classifiers set it when their linear layer keeps the
        output anyway)."""
        save_output = self.save_output if save_output is None else save_output
        if save_output and not self.normalize:
            raise ValueError("save_output=True applies to the fused normalized op (normalize=True)")
        if x_b is x_a:
            x_b = None  # the symmetric path does half the backward work
        if x_b is not None and self.resize is not None:
            # what the op checks, before the resize meets it (with torch's words)
            as_channel_matrix(x_a, "x_a")
            as_channel_matrix(x_b, "x_b")
        # Traced (torch.jit.trace), sizes are traced values: the resize is recorded
        # always (to the same size it gives the map unchanged), so that the trace takes
        # streams of other sizes too.
        if (
            x_b is not None
            and self.resize is not None
            and x_a.dim() == 4
            and x_b.dim() == 4
            and (torch.jit.is_tracing() or x_a.shape[-2:] != x_b.shape[-2:])
        ):
            align = False if self.resize in ("bilinear", "bicubic") else None
            x_b = F.interpolate(x_b, size=x_a.shape[-2:], mode=self.resize, align_corners=align)
        if self.normalize:
            return _F.fast_bilinear_pool(x_a, x_b, reduction=self.reduction, eps=self.eps, save_output=save_output)
        return _F.bilinear_pool(x_a, x_b, reduction=self.reduction)

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("save_output", False)  # modules pickled before the option existed
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, resize={self.resize!r}, normalize={self.normalize}"
            + (f", eps={self.eps}" if self.normalize else "")
            + (", save_output=True" if self.save_output else "")
        )


class FastBilinearPool(nn.Module):
    """One-stream bilinear pooling with signed square root and L2 norm, fused.

    The "Fast BCNN" head of Liu, Juhas & Zhang (2020): ``l2(ssqrt(A A^T / N))`` for one
    feature map :math:`A`, computed by :func:`~bilinearpool.functional.fast_bilinear_pool`
    with a custom backward that keeps only the input for backward (at B=8, C=2048, 7x7:
    3.1 MiB instead of 515 MiB for the op-by-op chain) and recomputes the rest. On CPU it
    works on cache-sized panels of the upper triangle (on groups of whole samples when
    ``C <= 256``, full or packed output); on CUDA on whole matrices, with
    its elementwise passes as Triton kernels when Triton is installed (no atomics; set
    ``BILINEARPOOL_TRITON=0`` for torch operations). See the design notes in the docs.

    Args:
        reduction: ``"mean"`` over locations (the paper) or ``"sum"``. With
            ``signed_sqrt=False`` and ``l2_normalize=True`` both give the same output (the
            L2 normalisation cancels the :math:`1/N`).
        signed_sqrt: apply the signed square root (see :class:`~bilinearpool.SignedSqrt`).
        l2_normalize: scale each output to unit L2 norm.
        triu: return the packed upper triangle (off-diagonals times :math:`\\sqrt{2}`, so
            norms are unchanged): :math:`C(C+1)/2` features instead of :math:`C^2`, which
            halves the parameters of a linear classifier on top.
        eps: :math:`\\epsilon` of the signed square root; gradients are at most
            :math:`1/(2\\sqrt{\\epsilon})`. Default 1e-5; with
            ``signed_sqrt=False`` giving it is a ValueError (it would do nothing; the
            attribute is then ``None``).
        save_output: keep the output for backward as well as the input, so that the
            backward reads the matrices instead of rebuilding them (faster where the
            matrix products dominate, i.e. many locations); free in memory when a linear
            classifier takes the output directly (it keeps it anyway), :math:`B D` more
            saved values otherwise. See
            :func:`~bilinearpool.functional.fast_bilinear_pool`.

    Shape:
        - Input: :math:`(B, C, H, W)` or tokens :math:`(B, N, C)`.
        - Output: :math:`(B, C^2)`, or :math:`(B, C(C+1)/2)` with ``triu``.

    Examples:
        >>> import torch
        >>> pool = FastBilinearPool()
        >>> pool(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 4096])
        >>> FastBilinearPool(triu=True)(torch.randn(2, 49, 64)).shape  # tokens (B, N, C)
        torch.Size([2, 2080])
    """

    def __init__(
        self,
        *,
        reduction: str = "mean",
        signed_sqrt: bool = True,
        l2_normalize: bool = True,
        triu: bool = False,
        eps: float | None = None,
        save_output: bool = False,
    ) -> None:
        super().__init__()
        _F._check_reduction(reduction)
        check_flags(signed_sqrt=signed_sqrt, l2_normalize=l2_normalize, triu=triu, save_output=save_output)
        eps = _F._resolve_eps(eps, "eps", _F.SIGNED_SQRT_EPS, "signed_sqrt", signed_sqrt)
        self.reduction = reduction
        self.signed_sqrt = signed_sqrt
        self.l2_normalize = l2_normalize
        self.triu = triu
        self.eps = eps
        self.save_output = save_output

    def output_dim(self, in_channels: int, in_channels_b: int | None = None) -> int:
        """Number of output features per sample for ``in_channels`` input channels."""
        if in_channels_b is not None:
            raise ValueError("FastBilinearPool pools one stream; use BilinearPool for two")
        in_channels = check_positive_int("in_channels", in_channels)
        return _F.triu_size(in_channels) if self.triu else in_channels * in_channels

    def forward(self, x: Tensor) -> Tensor:
        return _F.fast_bilinear_pool(x, **self.options())

    def options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~bilinearpool.functional.fast_bilinear_pool` (and
        :func:`~bilinearpool.functional.fast_bilinear_linear`) this layer computes with."""
        return {
            "reduction": self.reduction,
            "signed_sqrt": self.signed_sqrt,
            "l2_normalize": self.l2_normalize,
            "triu": self.triu,
            # None without signed_sqrt (a layer pickled before then holds the old default)
            "eps": self.eps if self.signed_sqrt else None,
            "save_output": self.save_output,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("save_output", False)  # modules pickled before the option existed
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, signed_sqrt={self.signed_sqrt}, "
            f"l2_normalize={self.l2_normalize}, triu={self.triu}"
            + (f", eps={self.eps}" if self.signed_sqrt else "")
            + (", save_output=True" if self.save_output else "")
        )
