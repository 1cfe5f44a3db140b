"""bilinearpool: second-order (bilinear) pooling layers for PyTorch.

Layers (``nn.Module``), their functions in :mod:`bilinearpool.functional`, and
classifiers that put them on any backbone.

Examples:
    >>> import torch
    >>> import bilinearpool as bp
    >>> pool = bp.FastBilinearPool()
    >>> pool(torch.randn(2, 32, 7, 7)).shape
    torch.Size([2, 1024])
"""

from __future__ import annotations

from . import functional
from .attention import SEBlock, insert_se_blocks
from .backbones import FeatureExtractor, build_backbone, check_backbone_name, list_backbones
from .compact import CompactBilinearPool
from .covariance import CovariancePool
from .models import (
    BCNN,
    BilinearClassifier,
    ChannelReduction,
    FastBCNN,
    GAPClassifier,
    GlobalAvgPool,
    build_model,
)
from .linear import WideLinear
from .lowrank import LowRankBilinearPool
from .matrix_sqrt import MatrixSqrt
from .norm import L2Normalize, SignedSqrt
from .pooling import BilinearPool, FastBilinearPool

__version__ = "0.1.0"

__all__ = [
    "BCNN",
    "BilinearClassifier",
    "BilinearPool",
    "ChannelReduction",
    "CompactBilinearPool",
    "CovariancePool",
    "FastBCNN",
    "FastBilinearPool",
    "FeatureExtractor",
    "GAPClassifier",
    "GlobalAvgPool",
    "L2Normalize",
    "LowRankBilinearPool",
    "MatrixSqrt",
    "SEBlock",
    "SignedSqrt",
    "WideLinear",
    "__version__",
    "build_backbone",
    "build_model",
    "check_backbone_name",
    "functional",
    "insert_se_blocks",
    "list_backbones",
]
