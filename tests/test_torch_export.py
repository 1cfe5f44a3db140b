"""Layers and models through :func:`torch.export.export`: the exported program gives the
eager values and, run with gradients on (as an exported training graph or a plain call of
``ep.module()``), the eager gradients.

``torch.export`` records an autograd Function's forward operations only, so while it
records, the fused ops run their plain differentiable definitions (as under
``torch.func``); their in-place and ``out=`` forward steps in an exported graph made its
call with gradients on fail ("functions with out=... arguments don't support automatic
differentiation") or its backward ("modified by an inplace operation").
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilinearpool as bp


def maps(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).relu()


def spd(b: int, c: int, n: int) -> torch.Tensor:
    x = torch.randn(b, c, n, generator=torch.Generator().manual_seed(1))
    return x @ x.transpose(1, 2) / n + 0.1 * torch.eye(c)


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())


CASES = {
    "fast": lambda: (bp.FastBilinearPool(), (maps(2, 8, 5, 5),)),
    "fast-triu": lambda: (bp.FastBilinearPool(triu=True), (maps(2, 8, 5, 5),)),
    "fast-save-output": lambda: (bp.FastBilinearPool(save_output=True), (maps(2, 8, 5, 5),)),
    "fast-sum": lambda: (bp.FastBilinearPool(signed_sqrt=False, reduction="sum"), (maps(2, 8, 5, 5),)),
    "two-stream": lambda: (bp.BilinearPool(normalize=True), (maps(2, 8, 5, 5), maps(2, 6, 5, 5, seed=1))),
    "matrix-sqrt": lambda: (bp.MatrixSqrt(), (spd(2, 8, 16),)),
    "matrix-sqrt-spectral": lambda: (bp.MatrixSqrt(impl="spectral"), (spd(2, 8, 16),)),
    "matrix-sqrt-frobenius": lambda: (bp.MatrixSqrt(norm="frobenius"), (spd(2, 8, 16),)),
    "covariance-reduced": lambda: (
        bp.CovariancePool(in_channels=8, reduced_channels=4, norm=bp.MatrixSqrt()),
        (maps(2, 8, 5, 5),),
    ),
    "tensor-sketch": lambda: (bp.CompactBilinearPool(in_channels=8, out_features=32, seed=3), (maps(2, 8, 4, 4),)),
    "fast-bcnn": lambda: (bp.FastBCNN(tiny(), num_classes=3), (torch.randn(2, 3, 12, 12),)),
    "bcnn": lambda: (bp.BCNN(tiny(), num_classes=3), (torch.randn(2, 3, 12, 12),)),
    "isqrt-cov": lambda: (
        bp.BilinearClassifier(tiny(), pool=bp.CovariancePool(norm=bp.MatrixSqrt()), num_classes=3),
        (torch.randn(2, 3, 12, 12),),
    ),
}


def _grads(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> list[torch.Tensor]:
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    leaves = [*inputs, *(p for p in module.parameters() if p.requires_grad)]
    return list(torch.autograd.grad((out * weights).sum(), leaves))


@pytest.mark.parametrize("name", list(CASES))
def test_exported_program_gives_eager_values_and_gradients(name):
    torch.manual_seed(0)
    module, inputs = CASES[name]()
    module.eval()
    program = torch.export.export(module, inputs, strict=False).module()
    for p_exported, p in zip(program.parameters(), module.parameters()):
        torch.testing.assert_close(p_exported, p)
    eager_in = tuple(t.clone().requires_grad_() for t in inputs)
    exported_in = tuple(t.clone().requires_grad_() for t in inputs)
    expected = module(*eager_in)
    got = program(*exported_in)  # with gradients on: failed before
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for g_exported, g in zip(_grads(program, exported_in, got), _grads(module, eager_in, expected), strict=True):
        torch.testing.assert_close(g_exported, g, rtol=1e-4, atol=1e-6)


def test_strict_export_of_a_fast_bcnn_is_differentiable():
    """``strict=True`` records through dynamo, where ``torch.compiler.is_compiling()`` holds
    too: the plain definitions must still be chosen."""
    torch.manual_seed(0)
    module, (x,) = CASES["fast-bcnn"]()
    module.eval()
    program = torch.export.export(module, (x,), strict=True).module()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, expected = program(a), module(b)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_export_with_a_dynamic_batch():
    module, (x,) = CASES["tensor-sketch"]()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False).module()
    more = maps(5, 8, 4, 4, seed=4)
    torch.testing.assert_close(program(more), module(more))


def test_eig_exports_for_inference():
    """``method="eig"`` keeps its autograd Function, whose backward an exported program
    does not hold: the program gives the values without gradients (documented)."""
    module, (a,) = bp.MatrixSqrt(method="eig"), (spd(2, 8, 16),)
    program = torch.export.export(module, (a,), strict=False).module()
    with torch.no_grad():
        torch.testing.assert_close(program(a), module(a))
