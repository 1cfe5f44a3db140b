"""Every layer of the library through ``torch.onnx.export``'s default exporter (dynamo,
torch.export based), run with onnxruntime against PyTorch.

The layer tests export with the TorchScript exporter (``dynamo=False``); since torch 2.9
``torch.onnx.export`` uses the dynamo exporter unless told otherwise, so a user's plain
``torch.onnx.export(model, ...)`` takes this path. While exported, the fused ops run
their traced forms (plain torch operations, no autograd functions or panel loops).
"""

from __future__ import annotations

import onnxscript  # noqa: F401  (the dynamo exporter needs it: extra dev)
import pytest
import torch
from torch import nn

import bilinearpool as bp

def maps(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).relu()


def spd(b: int, c: int, n: int) -> torch.Tensor:
    x = torch.randn(b, c, n, generator=torch.Generator().manual_seed(1))
    return x @ x.transpose(1, 2) / n


CASES = {
    "fast": lambda: (bp.FastBilinearPool(), (maps(2, 6, 3, 4),)),
    "fast-triu": lambda: (bp.FastBilinearPool(triu=True), (maps(2, 6, 3, 4),)),
    "fast-plain": lambda: (bp.FastBilinearPool(signed_sqrt=False, l2_normalize=False), (maps(2, 6, 3, 4),)),
    "fast-tokens": lambda: (bp.FastBilinearPool(), (torch.randn(2, 9, 6),)),
    "two-stream": lambda: (bp.BilinearPool(normalize=True), (maps(2, 6, 3, 4), maps(2, 4, 3, 4, seed=1))),
    "tensor-sketch-fft": lambda: (bp.CompactBilinearPool(in_channels=6, out_features=16, algorithm="fft"), (maps(2, 6, 3, 3),)),
    "tensor-sketch-gram": lambda: (bp.CompactBilinearPool(in_channels=6, out_features=16, algorithm="gram"), (maps(2, 6, 3, 3),)),
    "random-maclaurin": lambda: (
        bp.CompactBilinearPool(in_channels=6, in_channels_b=4, out_features=16, method="random_maclaurin"),
        (maps(2, 6, 3, 3), maps(2, 4, 3, 3, seed=1)),
    ),
    "covariance": lambda: (bp.CovariancePool(in_channels=8, reduced_channels=4, norm=bp.MatrixSqrt(), triu=False), (maps(2, 8, 5, 5),)),
    "covariance-triu": lambda: (bp.CovariancePool(), (maps(2, 4, 3, 3),)),
    "low-rank": lambda: (bp.LowRankBilinearPool(in_channels=6, rank=4, out_features=3), (maps(2, 6, 3, 3),)),
    "matrix-sqrt": lambda: (bp.MatrixSqrt(), (spd(2, 6, 12),)),
    "se-block": lambda: (bp.SEBlock(16, reduction=4), (maps(2, 16, 5, 5),)),
    "wide-linear": lambda: (bp.WideLinear(40000, 3), (torch.randn(2, 40000),)),
    "fast-bcnn": lambda: (
        bp.FastBCNN(nn.Sequential(nn.Conv2d(3, 12, 3, stride=4), nn.ReLU()), num_classes=4),
        (torch.randn(2, 3, 24, 24),),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layer_exports_with_the_default_exporter(name):
    from _onnx import run_onnx

    torch.manual_seed(0)
    module, inputs = CASES[name]()
    module.eval()
    with torch.no_grad():
        expected = module(*inputs)
    exported = torch.from_numpy(run_onnx(module, *inputs, dynamo=True))
    torch.testing.assert_close(exported, expected, rtol=1e-4, atol=1e-5)
