"""The classifier layer for bilinear features: ``nn.Linear`` made fast for very wide inputs."""

from __future__ import annotations

from torch import Tensor, nn

from .functional.linear import wide_linear

__all__ = ["WideLinear"]


class WideLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`~bilinearpool.functional.wide_linear`.

    Same parameters, initialisation and ``state_dict`` as ``nn.Linear`` (a checkpoint of
    one loads into the other). For float32 and float64 inputs of at least 32768 features
    and at most 64 outputs (a classifier on bilinear features) the forward product runs
    on CUDA as one Triton kernel, on CPU (from 2 rows and ``rows * D * out >= 2**24``) as
    a batched product over chunks of the features, where cuBLAS and the CPU's BLAS handle
    this shape poorly (:func:`~bilinearpool.functional.wide_linear`); everything else
    (autocast, half precision, tracing, other devices, other shapes) is ``nn.Linear``.
    Like ``nn.Linear`` it works under ``torch.func`` transforms and forward-mode AD.
    The classifiers of :mod:`bilinearpool` (:class:`~bilinearpool.FastBCNN` and the
    others) use it.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to learn an additive bias.
        device: device of the parameters, as in ``nn.Linear``.
        dtype: dtype of the parameters, as in ``nn.Linear``.

    Shape:
        - Input: :math:`(*, \\text{in\\_features})`; output: :math:`(*, \\text{out\\_features})`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> layer = WideLinear(40000, 8)
        >>> layer(torch.randn(2, 40000)).shape
        torch.Size([2, 8])
        >>> isinstance(layer, nn.Linear)
        True
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear's name: layer(input=...) works
        return wide_linear(input, self.weight, self.bias)
