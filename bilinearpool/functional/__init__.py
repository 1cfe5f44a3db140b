"""Pure tensor functions: the math behind every layer of :mod:`bilinearpool`.

Modules in :mod:`bilinearpool` are thin wrappers around these functions; use the
functions directly when you do not need an ``nn.Module``.
"""

from __future__ import annotations

from .bilinear import (
    bilinear_pool,
    fast_bilinear_pool,
    l2_normalize,
    signed_sqrt,
    signed_sqrt_grad_bound,
    triu_fold,
    triu_pack,
    triu_size,
    triu_unpack,
)
from .covariance import covariance_pool
from .head import fast_bilinear_linear
from .linear import wide_linear
from .lowrank import low_rank_bilinear_pool
from .sketch import random_maclaurin, tensor_sketch
from .sqrtm import matrix_sqrt

__all__ = [
    "bilinear_pool",
    "covariance_pool",
    "fast_bilinear_linear",
    "fast_bilinear_pool",
    "l2_normalize",
    "low_rank_bilinear_pool",
    "matrix_sqrt",
    "random_maclaurin",
    "signed_sqrt",
    "signed_sqrt_grad_bound",
    "tensor_sketch",
    "triu_fold",
    "triu_pack",
    "triu_size",
    "triu_unpack",
    "wide_linear",
]
