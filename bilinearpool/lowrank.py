"""Low-rank bilinear pooling (Kim et al. 2017; Kong & Fowlkes 2017) as a module."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .functional._checks import (
    check_built_channels,
    check_dtype,
    check_flags,
    check_positive_int,
    check_streams,
    make_layer,
    uninitialized,
)
from .functional.lowrank import low_rank_bilinear_pool

__all__ = ["LowRankBilinearPool"]


class LowRankBilinearPool(nn.Module):
    """Low-rank bilinear pooling: the Hadamard product of two projections, pooled.

    From Kim et al., "Hadamard Product for Low-rank Bilinear Pooling" (ICLR 2017):
    :math:`z = \\frac1N \\sum_n \\sigma(U^\\top x_n) \\circ \\sigma(V^\\top y_n)`, optionally followed
    by a linear map to ``out_features``. With ``shared=True`` (one stream, :math:`V = U`)
    each entry is :math:`\\|u_j^\\top X\\|^2/N`, the factorised form of Kong & Fowlkes,
    "Low-rank Bilinear Pooling for Fine-Grained Classification" (CVPR 2017). Without
    ``act_layer`` and before the output map, entry :math:`j` equals
    :math:`u_j^\\top G v_j` for the full bilinear matrix :math:`G`, which is never
    formed. Exports to ONNX.

    Args:
        in_channels: channels :math:`C_1` of the first stream.
        in_channels_b: channels :math:`C_2` of the second stream; ``None`` means
            :math:`C_2 = C_1`, and ``forward(x)`` uses ``x`` for both.
        rank: number of projections :math:`r`.
        out_features: size of the output linear map :math:`P`; ``None`` returns :math:`z`.
        shared: use one projection :math:`U` for both sides (one stream only).
        act_layer: factory of :math:`\\sigma` (Kim et al. use ``nn.Tanh``); ``None`` is
            the identity.
        bias: learn a bias in the output map; ``bias=False`` without ``out_features``
            (no output map) is a ValueError.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - x: :math:`(B, C_1, H, W)` or tokens :math:`(B, N, C_1)`.
        - y: :math:`(B, C_2, H, W)` or :math:`(B, N, C_2)`, same locations (optional).
        - Output: :math:`(B, D)`, :math:`D` = ``out_features`` or ``rank``; float32 for
          float16/bfloat16 input, float64 where the input or the parameters are float64
          (as ``CovariancePool``'s reduction: a float64 layer in a float32 model then
          gives float64 features, which a float32 classifier refuses).

    Examples:
        >>> pool = LowRankBilinearPool(in_channels=64, rank=32, out_features=100)
        >>> pool(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 100])
        >>> LowRankBilinearPool(in_channels=64, rank=16, shared=True)(torch.randn(2, 49, 64)).shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        *,
        in_channels: int,
        in_channels_b: int | None = None,
        rank: int,
        out_features: int | None = None,
        shared: bool = False,
        act_layer: Callable[[], nn.Module] | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels = check_positive_int("in_channels", in_channels)
        rank = check_positive_int("rank", rank)
        if in_channels_b is not None:
            in_channels_b = check_positive_int("in_channels_b", in_channels_b)
        if out_features is not None:
            out_features = check_positive_int("out_features", out_features)
        check_flags(shared=shared, bias=bias)
        if not bias and out_features is None:
            raise ValueError("bias=False applies to the output map (out_features), but out_features is None")
        act = None if act_layer is None else make_layer(act_layer, "act_layer", "nn.Tanh, or None")
        if shared and in_channels_b is not None:
            raise ValueError(
                f"shared=True uses one projection for one stream, but got in_channels_b={in_channels_b}"
            )
        factory = {"device": device, "dtype": check_dtype(dtype)}
        self.in_channels = in_channels
        self.in_channels_b = in_channels_b
        self.rank = rank
        self.out_features = out_features
        self.shared = shared
        self.weight_a = nn.Parameter(torch.empty(rank, in_channels, **factory))
        c_b = in_channels if in_channels_b is None else in_channels_b
        self.weight_b = None if shared else nn.Parameter(torch.empty(rank, c_b, **factory))
        self.act = act
        # reset_parameters draws every initial value (a seeded build equals a seeded reset)
        self.proj = None if out_features is None else uninitialized(nn.Linear, rank, out_features, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections uniform in :math:`\\pm 1/\\sqrt{C}` (as ``nn.Linear``); output map as ``nn.Linear``."""
        for w in (self.weight_a, self.weight_b):
            if w is not None:
                bound = 1.0 / math.sqrt(w.shape[1])
                nn.init.uniform_(w, -bound, bound)
        if self.proj is not None:
            self.proj.reset_parameters()

    def output_dim(self, in_channels: int, in_channels_b: int | None = None) -> int:
        """Length of the pooled vector: ``out_features`` if set, else ``rank``.

        Raises:
            ValueError: when the channels are not those the layer was built for (as
                ``forward`` would raise on such input), so that a classifier around a
                backbone with other channels is refused when it is built.
        """
        if self.shared and in_channels_b is not None:
            raise ValueError(
                f"this LowRankBilinearPool has shared=True, one stream, but got in_channels_b={in_channels_b}"
            )
        check_built_channels(
            "LowRankBilinearPool", self.in_channels, self.in_channels_b, in_channels, in_channels_b
        )
        return self.rank if self.out_features is None else self.out_features

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        check_streams(x, y, self.in_channels, self.in_channels_b)
        if y is not None and self.shared:
            raise ValueError("shared=True pools one stream, but a second input y was given")
        return low_rank_bilinear_pool(
            x,
            y,
            weight_a=self.weight_a,
            weight_b=self.weight_b,
            out_weight=None if self.proj is None else self.proj.weight,
            out_bias=None if self.proj is None else self.proj.bias,
            activation=self.act,
        )

    def extra_repr(self) -> str:
        b = "" if self.in_channels_b is None else f", in_channels_b={self.in_channels_b}"
        out = "" if self.out_features is None else f", out_features={self.out_features}"
        return f"in_channels={self.in_channels}{b}, rank={self.rank}{out}, shared={self.shared}"
