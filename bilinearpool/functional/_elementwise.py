"""The elementwise steps of the fused BCNN op on whole matrices, one pass each.

Off the CPU the fused op (:func:`~bilinearpool.functional.fast_bilinear_pool`) builds the
whole ``(B, C1, C2)`` matrix ``G`` with one batched product and then needs a few
elementwise passes over it, most with a per-sample reduction:

* forward: :func:`ssqrt_sumsq` (the sums of ``y**2``, ``y = f(g)``, not stored), then
  :func:`ssqrt_scale_` (``g <- f(g) / |y|``);
* backward: :func:`ssqrt_stats` (the sums of ``y**2`` and of ``y * dz``), then
  :func:`ssqrt_grad_` (``g <- (dz - c y) f'(g)``, up to the constant 1/2);

where ``f(g) = g / (sqrt(|g| + eps) + sqrt(eps))`` is the signed square root and
``f'(g) = 1 / (2 (|y| + sqrt(eps)))``; with ``eps=None`` there is no square root
(``f(g) = g``, ``f' = 1``). Written with torch operations each of them is several kernels
with full-size temporaries; on CUDA, when Triton is installed (it comes with torch's Linux
CUDA wheels), each is a single Triton kernel that reads the matrix once (and writes it at
most once), with per-block partial sums added afterwards in a fixed order (deterministic,
no atomics). Set the environment variable ``BILINEARPOOL_TRITON=0`` to use the torch
operations on CUDA as well.

All inputs are ``(B, n)`` views of contiguous matrices in the compute dtype.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "backend",
    "grad_from_y_",
    "signed_sqrt_",
    "ssqrt_grad_",
    "ssqrt_scale_",
    "ssqrt_stats",
    "ssqrt_sumsq",
    "tracing",
]

#: Entries per Triton program: 4096 float32 values (16 KiB) with 8 warps.
_BLOCK = 4096
_WARPS = 8


#: Oldest GPU architecture Triton compiles for (Volta).
_MIN_CAPABILITY = (7, 0)


def backend(device: torch.device) -> str:
    """``"triton"`` on a CUDA device Triton supports, when Triton imports and
    ``BILINEARPOOL_TRITON`` is not ``0``; else ``"torch"``.

    Also ``"torch"`` while the op is traced (``torch.compile``, ``torch.jit.trace``, ONNX
    export): the traced graph then holds plain torch operations, which the compiler fuses
    itself and exporters understand.
    """
    if device.type != "cuda" or os.environ.get("BILINEARPOOL_TRITON", "1") == "0":
        return "torch"
    if tracing():
        return "torch"
    if _capability(device.index if device.index is not None else torch.cuda.current_device()) < _MIN_CAPABILITY:
        return "torch"
    return "triton" if _kernels() is not None else "torch"


def tracing() -> bool:
    """Whether the op is being traced into a graph (torch.compile, torch.jit.trace, ONNX export)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# -- torch operations (any device; the reference for the Triton kernels; the CPU panels use
# signed_sqrt_ and grad_from_y_ too) ---------------------------------------------------------


def signed_sqrt_(g: Tensor, eps: float | None) -> Tensor:
    """f(g) = g / (sqrt(|g| + eps) + sqrt(eps)) in place: signed_sqrt without sign or cancellation."""
    if eps is not None:
        g.div_(g.abs().add_(eps).sqrt_().add_(math.sqrt(eps)))
    return g


def grad_from_y_(y: Tensor, dz: Tensor, c: Tensor, eps: float | None, k: Tensor | None = None) -> Tensor:
    """Overwrite ``y = f(g)`` with ``k (dz - c y) / (|y| + sqrt(eps))`` (``k (dz - c y)`` without eps).

    ``c`` and ``k`` (default 1) hold one factor per sample (the first dimension); ``dz``
    has ``y``'s shape.
    """
    shape = (-1, *[1] * (y.dim() - 1))
    denom = y.abs().add_(math.sqrt(eps)) if eps is not None else None
    if denom is not None and k is not None:
        denom.div_(k.view(shape))
    dg = y.mul_(-c.view(shape)).add_(dz)
    if denom is not None:
        return dg.div_(denom)
    return dg if k is None else dg.mul_(k.view(shape))


def _torch_sumsq(g: Tensor, eps: float | None) -> Tensor:
    y = signed_sqrt_(g.clone(), eps) if eps is not None else g
    return torch.linalg.vecdot(y, y)


def _torch_scale_(g: Tensor, s: Tensor, eps: float | None) -> Tensor:
    return signed_sqrt_(g, eps).mul_(s.unsqueeze(1))


def _torch_stats(g: Tensor, dz: Tensor, eps: float | None) -> tuple[Tensor, Tensor]:
    y = signed_sqrt_(g.clone(), eps) if eps is not None else g
    return torch.linalg.vecdot(y, y), torch.linalg.vecdot(y, dz)


def _torch_grad_(g: Tensor, dz: Tensor, c: Tensor, eps: float | None) -> Tensor:
    return grad_from_y_(signed_sqrt_(g, eps), dz, c, eps)


# -- Triton kernels (CUDA; also run by Triton's interpreter on CPU in the tests) -------------


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    """The four kernels (compiled by Triton on first launch), or ``None`` without Triton."""
    try:
        from . import _triton_kernels as k
    except ImportError:  # not installed: the torch operations do the same work
        return None
    except Exception as err:  # installed but broken (e.g. a mismatched build): say so once
        warnings.warn(
            f"Triton is installed but failed to import ({type(err).__name__}: {err}); the fused "
            "bilinear pooling uses torch operations on CUDA instead (slower). Set "
            "BILINEARPOOL_TRITON=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return k.sumsq_kernel, k.scale_kernel, k.stats_kernel, k.grad_kernel


def _launch(kernel: Any, g: Tensor, *args: Any, eps: float | None) -> None:
    """Run ``kernel`` over the (B, n) matrix ``g``, one program per block of one sample."""
    batch, n = g.shape
    if batch == 0 or n == 0:
        return
    grid = (batch, _cdiv(n, _BLOCK))
    consts = _consts(g.device, g.dtype, eps)
    kernel[grid](g, *args, n, consts, SQRT=eps is not None, BLOCK=_BLOCK, num_warps=_WARPS)


@functools.lru_cache(maxsize=64)
def _consts(device: torch.device, dtype: torch.dtype, eps: float | None) -> Tensor:
    """``eps`` and ``sqrt(eps)`` in the matrix dtype on its device, made once per
    (device, dtype, eps): a Python float argument would reach a kernel as float32, and a
    tensor made per launch costs two more kernel launches (or a host copy) each time."""
    value = 0.0 if eps is None else float(eps)
    return torch.tensor([value, math.sqrt(value)], dtype=dtype, device=device)


def _cdiv(n: int, block: int) -> int:
    return -(-n // block)


def _check(g: Tensor, *others: Tensor) -> None:
    if g.dim() != 2 or not g.is_contiguous() or any(t.shape != g.shape or not t.is_contiguous() for t in others):
        raise ValueError(
            "expected contiguous (B, n) tensors of one shape, got "
            + ", ".join(f"{tuple(t.shape)}{'' if t.is_contiguous() else ' (strided)'}" for t in (g, *others))
        )


#: CUDA's limit on the second grid dimension: samples of more than 65535 blocks
#: (C1 C2 > 2.7e8, e.g. C = 16384) take the torch operations.
_MAX_BLOCKS = 65535


def _triton(g: Tensor, use: str | None) -> bool:
    return (use or backend(g.device)) == "triton" and _cdiv(g.shape[1], _BLOCK) <= _MAX_BLOCKS


def _partials(g: Tensor) -> Tensor:
    return g.new_empty(g.shape[0], _cdiv(g.shape[1], _BLOCK))


# -- public entry points -----------------------------------------------------------------------


def ssqrt_sumsq(g: Tensor, eps: float | None, *, use: str | None = None) -> Tensor:
    """Per-sample sums of ``f(g)**2``; ``g`` is left unchanged.

    Shape:
        - g: :math:`(B, n)`, contiguous; output :math:`(B,)`.
    """
    _check(g)
    if not _triton(g, use):
        return _torch_sumsq(g, eps)
    sq = _partials(g)
    _launch(_kernels()[0], g, sq, eps=eps)
    return sq.sum(dim=1)


def ssqrt_scale_(g: Tensor, s: Tensor, eps: float | None, *, use: str | None = None) -> Tensor:
    """Overwrite ``g`` with ``f(g) * s``, one factor ``s`` per sample.

    Shape:
        - g: :math:`(B, n)`, contiguous; s: :math:`(B,)`; output: ``g``.
    """
    _check(g)
    if not _triton(g, use):
        return _torch_scale_(g, s, eps)
    _launch(_kernels()[1], g, s.contiguous(), eps=eps)
    return g


def ssqrt_stats(g: Tensor, dz: Tensor, eps: float | None, *, use: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample ``sum(f(g)**2)`` and ``sum(f(g) * dz)``; ``g`` is left unchanged.

    Shape:
        - g, dz: :math:`(B, n)`, contiguous; outputs :math:`(B,)` each.
    """
    _check(g, dz)
    if not _triton(g, use):
        return _torch_stats(g, dz, eps)
    sq, dot = _partials(g), _partials(g)
    _launch(_kernels()[2], g, dz, sq, dot, eps=eps)
    return sq.sum(dim=1), dot.sum(dim=1)


def ssqrt_grad_(g: Tensor, dz: Tensor, c: Tensor, eps: float | None, *, use: str | None = None) -> Tensor:
    """Overwrite ``g`` with ``(dz - c y) / (|y| + sqrt(eps))``, ``y = f(g)`` (``dz - c y`` without eps).

    Shape:
        - g, dz: :math:`(B, n)`, contiguous; c: :math:`(B,)`; output: ``g``.
    """
    _check(g, dz)
    if not _triton(g, use):
        return _torch_grad_(g, dz, c, eps)
    _launch(_kernels()[3], g, dz, c.contiguous(), eps=eps)
    return g
