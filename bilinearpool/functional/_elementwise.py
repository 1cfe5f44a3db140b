"""The elementwise steps of the fused BCNN op on whole matrices, one pass each.

Off the CPU the fused op (:func:`~bilinearpool.functional.fast_bilinear_pool`) builds the
whole ``(B, C1, C2)`` matrix ``G`` with one batched product and then needs two
elementwise steps over it, each with a per-sample reduction before it can write:

* forward, :func:`normalize_`: ``g <- f(g) / |f(g)|`` (the norm over the sample);
* backward, :func:`normalize_grad_`: ``g <- factor * dL/dg``, the gradient of the forward
  for an incoming gradient ``dz``, which needs the per-sample ``|y|`` and ``<y, dz>``;

where ``f(g) = g / (sqrt(|g| + eps) + sqrt(eps))`` is the signed square root and
``f'(g) = 1 / (2 (|y| + sqrt(eps)))``; with ``eps=None`` there is no square root
(``f(g) = g``, ``f' = 1``), with ``l2_eps=None`` no division by the norm. With ``diag``
(``C + 1``) the matrix is square and will be packed to its upper triangle: the entries
off the diagonal are weighted by ``sqrt(2)`` (the isometry weights; the forward's
output and the backward's ``dz`` are weighted).

Written with torch operations each step is a dozen kernels with full-size temporaries;
on CUDA, when Triton is installed (it comes with torch's Linux CUDA wheels), each step
is two Triton kernels: one reads the matrix and writes per-block partial sums, the
second reads the matrix again, adds up its sample's partials itself (in a fixed order:
deterministic, no atomics) and writes. No other kernel runs between them, which matters
on small matrices, where the time is the host's launch cost. Set the environment
variable ``BILINEARPOOL_TRITON=0`` to use the torch operations on CUDA as well.

All inputs are ``(B, n)`` views of contiguous matrices in the compute dtype.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Any

import torch
from torch import Tensor

from ._checks import env_switch

__all__ = [
    "backend",
    "grad_from_y_",
    "l2_grad_factors",
    "launch",
    "normalize_",
    "normalize_grad_",
    "signed_sqrt_",
    "tracing",
]

#: Entries per Triton program: 4096 float32 values (16 KiB) with 8 warps.
_BLOCK = 4096
_WARPS = 8


#: Oldest GPU architecture Triton compiles for (Volta).
_MIN_CAPABILITY = (7, 0)


def backend(device: torch.device) -> str:
    """``"triton"`` on a CUDA device Triton supports, when Triton imports and
    ``BILINEARPOOL_TRITON`` is not off (``0``, ``false``, ``no``, ``off``:
    :func:`~bilinearpool.functional._checks.env_switch`); else ``"torch"``.

    Also ``"torch"`` while the op is traced (``torch.compile``, ``torch.jit.trace``, ONNX
    export): the traced graph then holds plain torch operations, which the compiler fuses
    itself and exporters understand.
    """
    if device.type != "cuda" or tracing():  # traced first: env_switch may warn, which dynamo cannot trace
        return "torch"
    if not env_switch("BILINEARPOOL_TRITON"):
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


def signed_sqrt_(g: Tensor, eps: float | None, scratch: Tensor | None = None) -> Tensor:
    """f(g) = g / (sqrt(|g| + eps) + sqrt(eps)) in place: signed_sqrt without sign or cancellation.

    ``scratch``, when given, holds the denominator (a tensor of ``g.numel()`` entries or
    more, its leading ones overwritten): on CPU a fresh ``g``-sized temporary per call
    costs as much as the passes over it.
    """
    if eps is not None:
        if scratch is None:
            den = g.abs()
        else:
            den = torch.abs(g, out=scratch.view(-1)[: g.numel()].view(g.shape))
        g.div_(den.add_(eps).sqrt_().add_(math.sqrt(eps)))
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


def l2_grad_factors(sq: Tensor, dot: Tensor, l2_eps: float) -> tuple[Tensor, Tensor]:
    """Per-sample ``c, k`` of ``dL/dy = k (dz - c y)``, the backward of ``y -> y / max(|y|, l2_eps)``.

    From the squared norms ``sq = |y|^2`` and the inner products ``dot = <y, dz>``.
    """
    norm = sq.sqrt()
    c = torch.where(norm <= l2_eps, 0.0, dot / sq.clamp_min(l2_eps**2))
    return c, 1.0 / norm.clamp_min(l2_eps)


def _weigh(x: Tensor, diag: int) -> Tensor:
    """``x`` (B, C*C) times the packed triangle's isometry weights: sqrt(2) off the diagonal."""
    c = diag - 1
    d = x.view(-1, c, c).diagonal(dim1=1, dim2=2)
    kept = d.clone()
    x.mul_(math.sqrt(2.0))
    d.copy_(kept)
    return x


def _torch_normalize_(
    g: Tensor, eps: float | None, l2_eps: float | None, diag: int | None, norms: Tensor | None = None
) -> Tensor:
    y = signed_sqrt_(g, eps)
    if l2_eps is not None:
        norm = torch.linalg.vecdot(y, y).sqrt_()
        if norms is not None:
            norms.copy_(norm)
        y.div_(norm.clamp_min_(l2_eps).unsqueeze(1))
    return y if diag is None else _weigh(y, diag)


def _torch_normalize_grad_(
    g: Tensor, dz: Tensor, eps: float | None, l2_eps: float | None, factor: float, diag: int | None
) -> Tensor:
    if diag is not None:
        dz = _weigh(dz.clone(), diag)
    y = signed_sqrt_(g, eps)
    half = factor * (0.5 if eps is not None else 1.0)
    if l2_eps is not None:
        c, k = l2_grad_factors(torch.linalg.vecdot(y, y), torch.linalg.vecdot(y, dz), l2_eps)
        return grad_from_y_(y, dz, c, eps, k.mul_(half))
    if eps is None:
        return y.copy_(dz).mul_(half)
    return torch.div(dz, y.abs_().add_(math.sqrt(eps)), out=y).mul_(half)


# -- Triton kernels (CUDA; also run by Triton's interpreter on CPU in the tests) -------------


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    """The kernels (compiled by Triton on first launch), or ``None`` without Triton."""
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
    return k


@functools.lru_cache(maxsize=64)
def _consts(
    device: torch.device, dtype: torch.dtype, eps: float | None, l2_eps: float | None = None, factor: float = 1.0
) -> Tensor:
    """The kernels' constants ``[eps, sqrt(eps), l2_eps, l2_eps**2, factor, sqrt(2)]`` in
    the matrix dtype on its device (``factor`` with the 1/2 of ``f'`` when ``eps`` is
    given), made once per set of values: a Python float argument would reach a kernel as
    float32, and a tensor made per launch costs a host-to-device copy each time."""
    e = 0.0 if eps is None else float(eps)
    l2 = 0.0 if l2_eps is None else float(l2_eps)
    f = factor * (0.5 if eps is not None else 1.0)
    return torch.tensor([e, math.sqrt(e), l2, l2 * l2, f, math.sqrt(2.0)], dtype=dtype, device=device)


def _flags(eps: float | None, l2_eps: float | None, diag: int | None) -> dict[str, Any]:
    return dict(SQRT=eps is not None, L2=l2_eps is not None, TRIU=diag is not None)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): Triton's block sizes."""
    return 1 << max(0, n - 1).bit_length()


def _rblock(nparts: int) -> int:
    """Partials read per step by the writing kernels: a power of two, at most 1024."""
    return min(1024, next_pow2(nparts))


def _cdiv(n: int, block: int) -> int:
    return -(-n // block)


def _check(g: Tensor, *others: Tensor, diag: int | None = None) -> None:
    if g.dim() != 2 or not g.is_contiguous() or any(t.shape != g.shape or not t.is_contiguous() for t in others):
        raise ValueError(
            "expected contiguous (B, n) tensors of one shape, got "
            + ", ".join(f"{tuple(t.shape)}{'' if t.is_contiguous() else ' (strided)'}" for t in (g, *others))
        )
    if diag is not None and (diag - 1) ** 2 != g.shape[1]:
        raise ValueError(f"diag={diag} needs (B, {(diag - 1) ** 2}) matrices (C = diag - 1 squared), got {tuple(g.shape)}")


#: CUDA's limit on the second grid dimension: samples of more than 65535 blocks
#: (C1 C2 > 2.7e8, e.g. C = 16384) take the torch operations.
_MAX_BLOCKS = 65535


def on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context making ``device`` the current CUDA device while a Triton kernel is
    launched: Triton launches on the current device, so tensors on another GPU (a model
    moved to ``cuda:1`` without ``torch.cuda.set_device``) would be refused there. No
    switch (a null context) when it is current already, or for a device without index."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel: Any, grid: tuple[int, ...], device: torch.device, /, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` with ``device`` (its tensors') the current CUDA
    device (:func:`on_device`): every Triton launch of the library goes through here."""
    with on_device(device):
        kernel[grid](*args, **kwargs)


def _triton(g: Tensor, use: str | None) -> bool:
    return (use or backend(g.device)) == "triton" and _cdiv(g.shape[1], _BLOCK) <= _MAX_BLOCKS


def _partials(g: Tensor) -> Tensor:
    return g.new_empty(g.shape[0], _cdiv(g.shape[1], _BLOCK))


# -- public entry points -----------------------------------------------------------------------


def normalize_(
    g: Tensor,
    eps: float | None,
    l2_eps: float | None,
    *,
    diag: int | None = None,
    use: str | None = None,
    norms: Tensor | None = None,
) -> Tensor:
    """Overwrite ``g`` with ``y / max(|y|, l2_eps)``, ``y = f(g)``, the norm per sample
    (``y`` without ``l2_eps``); with ``diag = C + 1``, then weighted for packing.
    ``norms`` (with ``l2_eps``), when given, receives each sample's ``|y|`` (unclamped).

    Shape:
        - g: :math:`(B, n)`, contiguous (:math:`n = C^2` with ``diag``); output: ``g``.
        - norms: :math:`(B,)`.
    """
    _check(g, diag=diag)
    if norms is not None and (l2_eps is None or norms.shape != (g.shape[0],)):
        raise ValueError(f"norms needs l2_eps and shape ({g.shape[0]},), got {tuple(norms.shape)}, l2_eps={l2_eps}")
    if not _triton(g, use):
        return _torch_normalize_(g, eps, l2_eps, diag, norms)
    batch, n = g.shape
    if batch == 0 or n == 0 or (eps is None and l2_eps is None and diag is None):
        if norms is not None:
            norms.zero_()
        return g
    sumsq, normalize = _kernels().sumsq_kernel, _kernels().normalize_kernel
    nparts = _cdiv(n, _BLOCK)
    consts, grid = _consts(g.device, g.dtype, eps, l2_eps), (batch, nparts)
    sq = _partials(g) if l2_eps is not None else g  # without L2 the kernel reads no partials
    if l2_eps is not None:
        launch(
            sumsq, grid, g.device, g, sq, n, nparts, consts, SQRT=eps is not None, BLOCK=_BLOCK, num_warps=_WARPS
        )
    launch(
        normalize, grid, g.device, g, sq, n, nparts, diag or 1, consts, **_flags(eps, l2_eps, diag),
        BLOCK=_BLOCK, RBLOCK=_rblock(nparts), num_warps=_WARPS,
    )
    if norms is not None and l2_eps is not None:
        torch.sum(sq, dim=1, out=norms).sqrt_()
    return g


def normalize_grad_(
    g: Tensor,
    dz: Tensor,
    eps: float | None,
    l2_eps: float | None,
    factor: float = 1.0,
    *,
    diag: int | None = None,
    use: str | None = None,
) -> Tensor:
    """Overwrite ``g`` with ``factor`` times the gradient of :func:`normalize_` at ``g``
    for the incoming gradient ``dz`` (of the weighted output with ``diag``); ``dz`` is
    left unchanged.

    Shape:
        - g, dz: :math:`(B, n)`, contiguous; output: ``g``.
    """
    _check(g, dz, diag=diag)
    if not _triton(g, use):
        return _torch_normalize_grad_(g, dz, eps, l2_eps, factor, diag)
    batch, n = g.shape
    if batch == 0 or n == 0:
        return g
    stats, grad = _kernels().stats_kernel, _kernels().grad_kernel
    nparts = _cdiv(n, _BLOCK)
    consts, grid = _consts(g.device, g.dtype, eps, l2_eps, float(factor)), (batch, nparts)
    sq, dot = (_partials(g), _partials(g)) if l2_eps is not None else (g, g)  # unread without L2
    if l2_eps is not None:
        launch(
            stats, grid, g.device, g, dz, sq, dot, n, nparts, diag or 1, consts,
            SQRT=eps is not None, TRIU=diag is not None, BLOCK=_BLOCK, num_warps=_WARPS,
        )
    launch(
        grad, grid, g.device, g, dz, sq, dot, n, nparts, diag or 1, consts, **_flags(eps, l2_eps, diag),
        BLOCK=_BLOCK, RBLOCK=_rblock(nparts), num_warps=_WARPS,
    )
    return g
