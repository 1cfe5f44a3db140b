"""A check shared by the torch.compile tests: compiled values and input gradients equal eager ones."""

from __future__ import annotations

import torch


def assert_compiled_matches(module: torch.nn.Module, x: torch.Tensor, **compile_kwargs) -> object:
    """Compile ``module`` with the ``aot_eager`` backend and ``compile_kwargs``; assert that
    its output on ``x`` (which requires grad) and the gradient of a random projection of it
    with respect to ``x`` equal the eager module's. Returns the compiled module."""
    compiled = torch.compile(module, backend="aot_eager", **compile_kwargs)
    out = compiled(x)
    torch.testing.assert_close(out, module(x))
    dz = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, dz)
    (want,) = torch.autograd.grad(module(x), x, dz)
    torch.testing.assert_close(got, want)
    return compiled
