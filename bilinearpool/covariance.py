"""Covariance pooling (MPN-COV / iSQRT-COV), with optional dimension reduction and normalisation."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .functional._checks import (
    as_channel_matrix,
    check_dtype,
    check_optional_positive_int,
    does_nothing,
    make_layer,
    uninitialized,
)
from .functional.bilinear import triu_pack
from .functional.covariance import covariance_pool
from .matrix_sqrt import MatrixSqrt

__all__ = ["CovariancePool"]


class CovariancePool(nn.Module):
    """Global covariance pooling, optionally reduced and square-root normalised (iSQRT-COV).

    From Li, Xie, Wang & Zhang, "Is Second-order Information Helpful for Large-scale
    Visual Recognition?" (ICCV 2017) and Li, Xiong, Wang & Zhang, "Towards Faster
    Training of Global Covariance Pooling Networks by Iterative Matrix Square Root
    Normalization" (CVPR 2018). The pipeline is

    1. optional dimension reduction, a 1x1 convolution + batch norm + ReLU from
       ``in_channels`` to ``reduced_channels`` (iSQRT-COV reduces 2048 to 256);
    2. :func:`~bilinearpool.functional.covariance.covariance_pool`, the mean-centred
       covariance :math:`\\Sigma` (no :math:`HW \\times HW` centring matrix is built);
    3. optional ``norm`` on :math:`\\Sigma`, e.g. :class:`~bilinearpool.matrix_sqrt.MatrixSqrt`
       (iSQRT-COV), any module mapping :math:`(B, C, C)` to :math:`(B, C, C)`;
    4. flattening: the upper triangle with off-diagonals times :math:`\\sqrt2` (``triu=True``,
       L2 norm preserved) or the full matrix.

    Args:
        in_channels: channels of the input; needed with ``reduced_channels``, and when
            given, ``forward`` checks the input against it.
        reduced_channels: output channels of the 1x1 reduction; ``None`` skips it.
        norm: module applied to the covariance matrices; ``None`` for none. Give it
            matrices out (``MatrixSqrt(triu=False)``); flattening is ``triu``'s job.
        triu: flatten to the packed upper triangle instead of the full matrix.
        act_layer: factory of the reduction block's activation, called without
            arguments (a module class such as ``nn.ReLU``; not a function such as
            ``F.relu``); ``None`` for none. Without ``reduced_channels`` there is no
            block: another than the default is a ValueError (it would do nothing).
        device: device of the reduction's parameters (with ``reduced_channels`` only:
            without, there are none and giving it is a ValueError).
        dtype: dtype of the reduction's parameters (with ``reduced_channels`` only). Half-precision input is reduced in
            it; input it cannot hold without loss (float64 into float32, bfloat16 into
            float16) is refused, not cut down; float64 under autocast too (which leaves
            float64 alone).

    Shape:
        - Input: :math:`(B, C, H, W)` or tokens :math:`(B, N, C)`.
        - Output: :math:`(B, D)` with :math:`D` = ``output_dim(C)``:
          :math:`C'(C'+1)/2` with ``triu``, else :math:`C'^2`, where :math:`C'` is
          ``reduced_channels`` or :math:`C`. float32 for float16/bfloat16 input.

    Examples:
        >>> pool = CovariancePool(in_channels=64, reduced_channels=16, norm=MatrixSqrt())
        >>> pool(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 136])
        >>> pool.output_dim(64)
        136
        >>> CovariancePool(triu=False)(torch.randn(2, 49, 8)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        *,
        in_channels: int | None = None,
        reduced_channels: int | None = None,
        norm: nn.Module | None = None,
        triu: bool = True,
        act_layer: Callable[[], nn.Module] | None = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels = check_optional_positive_int("in_channels", in_channels)
        reduced_channels = check_optional_positive_int("reduced_channels", reduced_channels)
        if reduced_channels is not None and in_channels is None:
            raise ValueError(
                f"reduced_channels={reduced_channels} needs in_channels (the 1x1 convolution's input), "
                "but got in_channels=None"
            )
        if norm is not None and not isinstance(norm, nn.Module):
            raise TypeError(f"norm must be an nn.Module or None, but got {type(norm).__name__}")
        if isinstance(norm, MatrixSqrt) and norm.triu:
            raise ValueError("norm must return matrices: use MatrixSqrt(triu=False) and CovariancePool(triu=...)")
        if not isinstance(triu, bool):
            raise TypeError(f"triu must be a bool, but got {type(triu).__name__}")
        factory = {"device": device, "dtype": check_dtype(dtype)}
        if reduced_channels is None and (device is not None or dtype is not None):
            names = [k for k, v in factory.items() if v is not None]
            raise does_nothing(names, "the reduction's parameters", "reduced_channels is None (no parameters)",
                               fix="give reduced_channels")
        act = nn.Identity() if act_layer is None else make_layer(act_layer, "act_layer", "nn.ReLU, or None")
        if reduced_channels is None and act_layer is not nn.ReLU:
            shown = "None" if act_layer is None else getattr(act_layer, "__name__", type(act_layer).__name__)
            raise does_nothing(["act_layer"], "the reduction block (reduced_channels)", "reduced_channels is None",
                               fix="give reduced_channels", drop=f"act_layer={shown}")
        self.in_channels = in_channels
        self.reduced_channels = reduced_channels
        self.triu = triu
        self.reduce: nn.Module | None = None
        if reduced_channels is not None:
            self.reduce = nn.Sequential(  # reset_parameters draws the convolution's weights
                uninitialized(nn.Conv2d, in_channels, reduced_channels, kernel_size=1, bias=False, **factory),
                nn.BatchNorm2d(reduced_channels, **factory),
                act,
            )
        self.norm = norm
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the reduction block (Kaiming normal convolution, unit batch norm)."""
        if self.reduce is not None:
            nn.init.kaiming_normal_(self.reduce[0].weight, mode="fan_out", nonlinearity="relu")
            self.reduce[1].reset_parameters()

    def output_dim(self, in_channels: int, in_channels_b: int | None = None) -> int:
        """Length of the pooled vector for ``in_channels`` input channels (one stream).

        A pool built with ``in_channels`` takes that many only, as ``forward`` does
        (with or without reduction); one built without takes any.
        """
        if in_channels_b is not None:
            raise ValueError(f"CovariancePool has one stream, but got in_channels_b={in_channels_b}")
        if self.in_channels is not None and in_channels != self.in_channels:
            raise ValueError(
                f"this CovariancePool was built for in_channels={self.in_channels}, "
                f"but output_dim got in_channels={in_channels}"
            )
        c = self.reduced_channels if self.reduced_channels is not None else in_channels
        return c * (c + 1) // 2 if self.triu else c * c

    def forward(self, x: Tensor) -> Tensor:
        # layout, dtype and at least one location, checked before the reduction runs on it
        as_channel_matrix(x)
        # (sizes are traced values in torch.jit.trace: see functional._checks.as_channel_matrix)
        if self.in_channels is not None and x.dim() in (3, 4) and not torch.jit.is_tracing():
            channels = x.shape[1] if x.dim() == 4 else x.shape[2]
            if channels != self.in_channels:
                raise ValueError(
                    f"input must have in_channels={self.in_channels} channels, but got shape {tuple(x.shape)}"
                )
        if self.reduce is not None:
            weight = self.reduce[0].weight
            if x.dtype != weight.dtype:
                # Half input into a float32 reduction: the reduction runs in its own dtype
                # (under autocast, autocast picks, but never for float64). Input the
                # weights' dtype cannot hold without loss is not cut down.
                autocast = torch.is_autocast_enabled(x.device.type)
                lossy = torch.promote_types(x.dtype, weight.dtype) != weight.dtype
                if lossy and (not autocast or x.dtype == torch.float64):
                    raise TypeError(
                        f"expected input that the reduction's {weight.dtype} holds without loss (half "
                        f"precision into float32 is computed in float32), but got {x.dtype}: convert "
                        f"the layer, e.g. .to({x.dtype})"
                    )
                if not autocast:
                    x = x.to(weight.dtype)
            if x.dim() == 3:
                # Tokens (B, N, C) -> (B, C, N, 1) so the 1x1 convolution applies per token.
                x = self.reduce(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
            elif x.dim() == 4:
                x = self.reduce(x)
        cov = covariance_pool(x)
        if self.norm is not None:
            cov = self.norm(cov)
        return triu_pack(cov) if self.triu else cov.flatten(1)

    def extra_repr(self) -> str:
        parts = []
        if self.in_channels is not None:
            parts.append(f"in_channels={self.in_channels}")
        if self.reduced_channels is not None:
            parts.append(f"reduced_channels={self.reduced_channels}")
        parts.append(f"triu={self.triu}")
        return ", ".join(parts)
