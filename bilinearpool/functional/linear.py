"""A linear map for very wide inputs and few outputs: the classifier on bilinear features.

A bilinear embedding has millions of features (``C^2 = 4,194,304`` for a ResNet-50) and a
classifier has a handful of classes, so ``F.linear`` is a matrix product with a huge
inner dimension and a tiny output: all of the work is reading ``x`` and the weight once.
cuBLAS handles this shape poorly in float32: on an NVIDIA H200 it took 0.70 ms for a
batch of 32 against 8 classes (1.27 ms of GPU time, ``sgemm_largek``, in an earlier
run), for 0.67 GB read (about 0.16 ms at the card's bandwidth); splitting the inner
dimension into a batched product did not help (1.19 ms with 128 chunks, 8.96 ms with 16).
:func:`wide_linear` does the product with one Triton kernel: each program multiplies a
tile of ``x``, up to 32 rows, with the few weight rows, adds the products up
elementwise and reduces them once, and writes its partial sums, added up afterwards in
a fixed order (deterministic). On the H200 (``benchmarks/results/gpu-h200-head``,
``benchmarks/bench_wide_linear.py``) it took 0.41 ms against F.linear's 0.70 ms at a
batch of 32 and 0.32 against 0.51 ms at 8; an earlier kernel that reduced every chunk
per class took 0.89 ms at 32. For a single row F.linear (a matrix-vector product) is
faster and is used. On CPU the BLAS library does
no better (8 classes, 4,194,304 features, one thread on the 2-core machine: 44 ms for a
batch of 8 in ``F.linear``): there the features are cut into chunks of 65536 and
multiplied as one batched product whose chunk results are summed (26 ms; 0.57x-0.81x of
``F.linear`` at batches of 2-32, ``benchmarks/results/cpu-2core-fastbcnn/wide-linear``;
from 2 rows and 2^24 products on, F.linear being as fast or faster below). Both paths are
for float32 and float64; under autocast, in half precision, while traced
(``torch.compile``, export) and on other devices it is ``F.linear``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _elementwise
from ._checks import check_tensor

__all__ = ["wide_linear"]

#: The Triton path: inputs at least this wide, at most this many outputs.
WIDE_MIN_FEATURES = 1 << 15
WIDE_MAX_OUTPUTS = 64

#: Products held per program (outputs x rows x columns of a chunk; half as many in
#: float64), features per program, warps per program.
_TILE = 1 << 14
_SPAN = 4096
_WARPS = 8


def _tiling(rows: int, out: int, f64: bool) -> tuple[int, int, int]:
    """Rows per program, columns per chunk and chunks per program of the Triton kernels
    (:func:`wide_linear`'s and the Fast BCNN head's): up to 32 rows, chunks of at least 16
    columns, an accumulator of at most :data:`_TILE` products (``_TILE / 2`` in float64)."""
    tile = _TILE // 2 if f64 else _TILE
    out_p2 = _elementwise.next_pow2(out)
    bb = max(1, min(32, _elementwise.next_pow2(rows), tile // (out_p2 * 16)))
    bk = max(16, tile // (out_p2 * bb))
    return bb, bk, max(1, _SPAN // bk)


def wide_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, faster when ``x`` is very wide and the output short.

    Values and gradients equal ``F.linear``'s up to the order of the additions. For
    float32 and float64 inputs of at least 32768 features and at most 64 outputs: on
    CUDA (from 2 rows) one Triton kernel (partial sums in the input's dtype, added up in
    a fixed order), on CPU (from 2 rows and ``rows * D * out >= 2**24``) a batched product over
    chunks of the features; everything else
    (autocast, half precision, tracing, other devices, other shapes) is ``F.linear``.
    Like ``F.linear`` it works under ``torch.func`` transforms (``grad``, ``jvp``,
    ``jacrev``, ``vmap``) and ``torch.autograd.forward_ad``, and keeps for backward only
    what the gradients need (``x`` for the weight's, the weight for ``x``'s).

    Args:
        x: input, features last.
        weight: :math:`(\\text{out}, D)`.
        bias: :math:`(\\text{out},)` or ``None``.

    Raises:
        TypeError: an argument that is not a tensor (as ``F.linear`` raises).

    Shape:
        - x: :math:`(*, D)`; output: :math:`(*, \\text{out})`.

    Examples:
        >>> x, w, b = torch.randn(2, 40000), torch.randn(3, 40000), torch.randn(3)
        >>> torch.allclose(wide_linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4)
        True
    """
    # (F.linear's own TypeError would come too late: choosing the path reads x.device)
    check_tensor(x)
    check_tensor(weight, "weight")
    if bias is not None:
        check_tensor(bias, "bias")
    path = _path(x, weight, bias)
    if path is None:
        return F.linear(x, weight, bias)
    out = _WideLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, path == "triton")
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _path(x: Tensor, weight: Tensor, bias: Tensor | None) -> str | None:
    """``"triton"``, ``"chunks"`` or ``None`` (F.linear) for these arguments."""
    if x.device.type not in ("cuda", "cpu") or x.dim() == 0 or weight.dim() != 2:
        return None
    if _elementwise.tracing():
        return None  # graphs and exports keep a plain linear layer
    out, d = weight.shape
    if d < WIDE_MIN_FEATURES or out > WIDE_MAX_OUTPUTS or x.shape[-1] != d or x.device != weight.device:
        return None
    if x.dtype not in _DTYPES or any(t.dtype != x.dtype for t in (weight,) + (() if bias is None else (bias,))):
        return None
    if (bias is not None and bias.shape != (out,)) or torch.is_autocast_enabled(x.device.type):
        return None  # autocast: its half-precision F.linear
    if x.device.type == "cpu":
        rows = x.numel() // d
        return "chunks" if rows >= 2 and rows * d * out >= _CHUNKS_FROM else None
    if x.numel() // d < _KERNEL_FROM_ROWS or out * d >= 2**31:
        return None
    return "triton" if _elementwise.backend(x.device) == "triton" else None


_DTYPES = (torch.float32, torch.float64)

#: The Triton path from this many rows on: for one row cuBLAS's matrix-vector product
#: reads the weight at full speed (1 x 4,194,304 x 8 on an H200: F.linear 0.084-0.098 ms,
#: the kernel 0.20-0.27 ms; ``benchmarks/results/gpu-h200-head``).
_KERNEL_FROM_ROWS = 2

#: Features per chunk of the CPU path.
_CHUNK = 1 << 16
#: The CPU path from 2 rows and this many products (rows x features x outputs) on: below,
#: F.linear was as fast or faster (one thread, 2-core machine: chunked / F.linear 0.52-0.97
#: above, 1.0-1.27 at 1 row and at 2 rows of 262144 x 3; see benchmarks/bench_wide_linear.py).
_CHUNKS_FROM = 1 << 24


def _chunked(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x`` as a batched product over feature chunks
    (views, no copies, when rows are contiguous), then the sum over chunks. Not for
    autograd (its backward through the chunks is 2x slower than F.linear's): see
    :class:`_WideLinear`."""
    d = x.shape[1]
    n = d // _CHUNK * _CHUNK
    if n == 0:
        out = x.mm(weight.t())
    else:
        xs = x[:, :n].reshape(x.shape[0], -1, _CHUNK).transpose(0, 1)  # (chunks, B, _CHUNK)
        ws = weight[:, :n].reshape(weight.shape[0], -1, _CHUNK).permute(1, 2, 0)  # (chunks, _CHUNK, out)
        out = torch.bmm(xs, ws).sum(0)
        if n < d:
            out = out.addmm(x[:, n:], weight[:, n:].t())
    return out if bias is None else out + bias


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x`` with the Triton kernel."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    rows, d = x.shape
    out = weight.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if rows == 0:
        return x.new_zeros(0, out)
    bb, bk, steps = _tiling(rows, out, acc == torch.float64)
    programs = _elementwise._cdiv(d, bk * steps)
    parts = torch.empty(programs, rows, out, dtype=acc, device=x.device)
    _elementwise.launch(
        _elementwise._kernels().wide_linear_kernel, (programs, _elementwise._cdiv(rows, bb)), x.device,
        x, weight, parts, rows, d, x.stride(0), weight.stride(0),
        OUT=out, OUT_P2=_elementwise.next_pow2(out), BB=bb, BK=bk, STEPS=steps,
        F64=acc == torch.float64, num_warps=_WARPS,
    )
    y = parts.sum(0)
    if bias is not None:
        y += bias
    return y.to(x.dtype)


class _WideLinear(torch.autograd.Function):
    """Forward by the Triton kernel (``triton``) or the chunked product; backward and
    forward-mode tangent as ``F.linear``'s (two products and a sum).

    New style (``forward`` without ``ctx``, then ``setup_context``) with ``jvp`` and
    ``vmap`` rules: ``torch.func`` transforms and ``torch.autograd.forward_ad`` need them.
    Backward keeps what ``F.linear``'s keeps: ``x`` only when the weight needs a gradient,
    the weight only when ``x`` does (a frozen classifier keeps no B x D features).
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, triton: bool) -> Tensor:  # type: ignore[override]
        return _forward(x, weight, bias) if triton else _chunked(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, bias, _ = inputs
        needs_x, needs_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if needs_w else None, weight if needs_x else None)
        ctx.save_for_forward(x, weight)  # for jvp only: autograd drops them when apply returns
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gx = grad.mm(weight) if ctx.needs_input_grad[0] else None
        gw = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None

    @staticmethod
    def jvp(ctx: Any, dx: Tensor | None, dw: Tensor | None, db: Tensor | None, _: None) -> Tensor:
        """``dx W^T + x dW^T + db`` over the tangents given (autograd passes at least one)."""
        x, weight = ctx.saved_for_forward
        parts = [] if dx is None else [F.linear(dx, weight)]
        if dw is not None:
            parts.append(F.linear(x, dw))
        if db is not None:
            parts.append(db.expand(*x.shape[:-1], db.shape[-1]))
        if not parts:
            raise RuntimeError("wide_linear's jvp got no tangent for any input")
        return sum(parts[1:], parts[0].clone() if len(parts) == 1 else parts[0])

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        triton: bool,
    ) -> tuple[Tensor, int]:
        """A batch of inputs is more rows (the fast path again); a stack of weights (and of
        biases) is a batched ``matmul``. At least one of them is batched; the output's batch
        dimension is its first."""
        bx, bw, bb = in_dims[:3]
        x = x if bx is None else x.movedim(bx, 0)  # (V, rows, D) or (rows, D)
        if bw is None:
            out = wide_linear(x, weight, bias if bb is None else None)
        else:
            out = torch.matmul(x, weight.movedim(bw, 0).transpose(-1, -2))  # (V, rows, out)
            if bias is not None and bb is None:
                out = out + bias
        if bias is not None and bb is not None:
            out = out + bias.movedim(bb, 0).unsqueeze(-2)
        return out, 0
