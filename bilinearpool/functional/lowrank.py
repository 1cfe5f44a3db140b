"""Low-rank bilinear pooling: Hadamard product of two projections, averaged over locations.

Kim, On, Lim, Kim, Ha & Zhang, "Hadamard Product for Low-rank Bilinear Pooling"
(ICLR 2017) write a rank-:math:`r` bilinear map as
:math:`f = P^\\top (\\sigma(U^\\top x) \\circ \\sigma(V^\\top y)) + b`. Pooled over locations,
with the identity for :math:`\\sigma`, entry :math:`j` is the quadratic form

.. math:: z_j = \\frac1N \\sum_n (u_j^\\top x_n)(v_j^\\top y_n) = u_j^\\top G v_j, \\qquad
          G = \\tfrac1N X Y^\\top ,

i.e. :math:`r` projections of the full bilinear matrix :math:`G` computed without forming
it (cost :math:`O(N r (C_1 + C_2))` instead of :math:`O(N C_1 C_2)`). With one stream and
:math:`V = U`, :math:`z_j = \\|u_j^\\top X\\|^2 / N`: the factorised form of Kong & Fowlkes,
"Low-rank Bilinear Pooling for Fine-Grained Classification" (CVPR 2017), whose
class scores :math:`\\operatorname{tr}(W_k G)` with :math:`W_k = U_k U_k^\\top - V_k V_k^\\top`
are a linear layer with :math:`\\pm1` weights on such :math:`z`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._checks import RESIZE_BY_INTERPOLATE, compute_dtype, no_autocast, pair_streams

__all__ = ["low_rank_bilinear_pool"]


def _check_weight(name: str, w: Tensor, channels: int, rank: int | None) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, but got {type(w).__name__}")
    traced = torch.jit.is_tracing()  # sizes are traced values (see _checks.as_channel_matrix)
    if w.dim() != 2 or (not traced and (w.shape[1] != channels or (rank is not None and w.shape[0] != rank))):
        want = f"({'r' if rank is None else rank}, {channels})"
        raise ValueError(f"{name} must have shape {want} (rank, input channels), but got {tuple(w.shape)}")


def low_rank_bilinear_pool(
    x: Tensor,
    y: Tensor | None = None,
    *,
    weight_a: Tensor,
    weight_b: Tensor | None = None,
    out_weight: Tensor | None = None,
    out_bias: Tensor | None = None,
    activation: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Low-rank bilinear pooling (Kim et al. 2017; Kong & Fowlkes 2017).

    Computes :math:`z = \\frac1N \\sum_n \\sigma(U^\\top x_n) \\circ \\sigma(V^\\top y_n)`, then
    :math:`P z + b` when ``out_weight`` is given. Computed in float32 for
    float16/bfloat16 inputs and under autocast, returned in float32; in float64 where an
    input or a weight is float64.

    Args:
        x: first feature map.
        y: second feature map; ``None`` uses ``x`` for both.
        weight_a: :math:`U^\\top`, ``(r, C_1)`` (as ``nn.Linear.weight``).
        weight_b: :math:`V^\\top`, ``(r, C_2)``; ``None`` shares ``weight_a`` (:math:`V = U`,
            one stream only), the Kong & Fowlkes form.
        out_weight: :math:`P^\\top`, ``(D, r)``; ``None`` returns :math:`z` itself.
        out_bias: :math:`b`, ``(D,)``, only with ``out_weight``.
        activation: :math:`\\sigma` applied to each projection (Kim et al. use ``torch.tanh``);
            ``None`` is the identity.

    Shape:
        - x: :math:`(B, C_1, H, W)` or tokens :math:`(B, N, C_1)`.
        - y: :math:`(B, C_2, H, W)` or :math:`(B, N, C_2)`, same locations.
        - Output: :math:`(B, r)`, or :math:`(B, D)` with ``out_weight``.

    Examples:
        >>> x = torch.randn(2, 16, 7, 7)
        >>> u = torch.randn(4, 16)
        >>> z = low_rank_bilinear_pool(x, weight_a=u)
        >>> z.shape, bool((z >= 0).all())
        (torch.Size([2, 4]), True)
        >>> low_rank_bilinear_pool(x, torch.randn(2, 3, 7, 7), weight_a=u,
        ...                        weight_b=torch.randn(4, 3), out_weight=torch.randn(10, 4)).shape
        torch.Size([2, 10])
    """
    a, b = pair_streams(x, y, names=("x", "y"), resize=RESIZE_BY_INTERPOLATE)
    _check_weight("weight_a", weight_a, a.shape[1], None)
    rank = weight_a.shape[0]
    if weight_b is None:
        if b is not None:
            raise ValueError(
                "weight_b=None shares weight_a between the streams, which needs one stream "
                f"(y=None), but y of shape {tuple(y.shape)} was given"  # type: ignore[union-attr]
            )
    else:
        _check_weight("weight_b", weight_b, (a if b is None else b).shape[1], rank)
    if out_weight is not None:
        if not isinstance(out_weight, Tensor):
            raise TypeError(f"out_weight must be a torch.Tensor or None, but got {type(out_weight).__name__}")
        traced = torch.jit.is_tracing()  # sizes are traced values (see _checks.as_channel_matrix)
        if out_weight.dim() != 2 or (not traced and out_weight.shape[1] != rank):
            raise ValueError(f"out_weight must have shape (D, {rank}), but got {tuple(out_weight.shape)}")
        if out_bias is not None and not isinstance(out_bias, Tensor):
            raise TypeError(f"out_bias must be a torch.Tensor or None, but got {type(out_bias).__name__}")
        if out_bias is not None and (out_bias.dim() != 1 or (not traced and out_bias.shape[0] != out_weight.shape[0])):
            raise ValueError(f"out_bias must have shape ({out_weight.shape[0]},), but got {tuple(out_bias.shape)}")
    elif out_bias is not None:
        raise ValueError("out_bias needs out_weight; got out_bias without out_weight")
    # float64 where any input or weight is (a float64 layer on float32 maps is not cut
    # down to float32: the maps are promoted, as torch's type promotion would)
    dtype = compute_dtype(a, b, weight_a, weight_b, out_weight, out_bias)
    act = activation if activation is not None else (lambda t: t)
    with no_autocast(a.device.type):
        xa = a.transpose(1, 2).to(dtype)
        pa = act(torch.matmul(xa, weight_a.to(dtype).t()))
        if weight_b is None:
            z = pa.square().mean(dim=1)
        else:
            xb = xa if b is None else b.transpose(1, 2).to(dtype)
            z = (pa * act(torch.matmul(xb, weight_b.to(dtype).t()))).mean(dim=1)
        if out_weight is None:
            return z
        return torch.nn.functional.linear(
            z, out_weight.to(dtype), None if out_bias is None else out_bias.to(dtype)
        )
