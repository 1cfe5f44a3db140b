"""Triton kernels of :mod:`bilinearpool.functional._elementwise` (imported only when used).

Each program handles ``BLOCK`` consecutive entries of one sample (grid: samples x blocks)
and writes its partial sums to ``(B, blocks)`` buffers, which the caller adds up.
``SQRT`` selects the signed square root ``f(g) = g / (sqrt(|g| + eps) + sqrt(eps))``;
without it ``f(g) = g``. ``eps`` and ``sqrt(eps)`` are read from a two-entry tensor in the
matrix's dtype (a Python float argument would reach the kernel as float32).
"""

import triton
import triton.language as tl


@triton.jit
def _load_y(g_ptr, row, offs, mask, eps_ptr, SQRT: tl.constexpr):
    g = tl.load(g_ptr + row + offs, mask=mask, other=0.0)
    if SQRT:
        g = g / (tl.sqrt(tl.abs(g) + tl.load(eps_ptr)) + tl.load(eps_ptr + 1))
    return g


@triton.jit
def sumsq_kernel(g_ptr, sq_ptr, n, eps_ptr, SQRT: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums of f(g)^2; g unchanged."""
    b = tl.program_id(0)
    pid = tl.program_id(1)
    row = b.to(tl.int64) * n
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = _load_y(g_ptr, row, offs, mask, eps_ptr, SQRT)
    tl.store(sq_ptr + b * tl.num_programs(1) + pid, tl.sum(y * y, axis=0))


@triton.jit
def scale_kernel(g_ptr, s_ptr, n, eps_ptr, SQRT: tl.constexpr, BLOCK: tl.constexpr):
    """g <- f(g) * s_b."""
    b = tl.program_id(0)
    pid = tl.program_id(1)
    row = b.to(tl.int64) * n
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = _load_y(g_ptr, row, offs, mask, eps_ptr, SQRT)
    tl.store(g_ptr + row + offs, y * tl.load(s_ptr + b), mask=mask)


@triton.jit
def stats_kernel(g_ptr, dz_ptr, sq_ptr, dot_ptr, n, eps_ptr, SQRT: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums of f(g)^2 and f(g) * dz; g unchanged."""
    b = tl.program_id(0)
    pid = tl.program_id(1)
    row = b.to(tl.int64) * n
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = _load_y(g_ptr, row, offs, mask, eps_ptr, SQRT)
    dz = tl.load(dz_ptr + row + offs, mask=mask, other=0.0)
    part = b * tl.num_programs(1) + pid
    tl.store(sq_ptr + part, tl.sum(y * y, axis=0))
    tl.store(dot_ptr + part, tl.sum(y * dz, axis=0))


@triton.jit
def grad_kernel(g_ptr, dz_ptr, c_ptr, n, eps_ptr, SQRT: tl.constexpr, BLOCK: tl.constexpr):
    """g <- (dz - c_b f(g)) / (|f(g)| + sqrt(eps)), or dz - c_b g without the square root."""
    b = tl.program_id(0)
    pid = tl.program_id(1)
    row = b.to(tl.int64) * n
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = _load_y(g_ptr, row, offs, mask, eps_ptr, SQRT)
    dz = tl.load(dz_ptr + row + offs, mask=mask, other=0.0)
    dg = dz - tl.load(c_ptr + b) * y
    if SQRT:
        dg = dg / (tl.abs(y) + tl.load(eps_ptr + 1))
    tl.store(g_ptr + row + offs, dg, mask=mask)
