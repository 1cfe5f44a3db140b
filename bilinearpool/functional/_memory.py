"""Large CPU output buffers, backed by transparent huge pages where Linux offers them.

The fused op's output on CPU is large (``B C^2`` entries: 128 MiB at 8 x 2048^2) and
new on every call. glibc serves allocations of 32 MiB and more with fresh pages, and the
kernel zeroes each 4 KiB page on its first write, one page fault at a time: filling a new
32 MiB buffer took 14.1 ms on the development machine against 1.7 ms to refill it
(``benchmarks/bench_new_buffer.py`` measures it).
Where transparent huge pages are enabled in ``madvise`` mode (common; ``always`` needs
nothing and ``never`` ignores the hint), asking for them on the buffer (``madvise``
``MADV_HUGEPAGE``, which PyTorch itself applies to every large CPU allocation when
``THP_MEM_ALLOC_ENABLE=1`` is set) cuts that to 3.7 ms: 2 MiB pages, 512 times fewer
faults. The hint covers only the 2 MiB-aligned interior of our own new buffer; a failing
or missing ``madvise`` changes nothing but the speed. Where the kernel's THP ``defrag``
setting makes a fault on such memory compact memory first, a fragmented machine may
stall instead: set the environment variable ``BILINEARPOOL_HUGEPAGES=0`` to give no hint.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any

from torch import Tensor

from ._checks import env_switch

__all__ = ["huge_pages_hint", "new_output"]

_HUGE_PAGE = 2 << 20
#: Buffers from this size on get the hint (smaller ones come from glibc's reused heap).
_MIN_BYTES = 8 << 20
_MADV_HUGEPAGE = 14  # Linux, every architecture


@functools.lru_cache(maxsize=1)
def _madvise() -> Any:
    """libc's ``madvise`` on Linux, else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def huge_pages_hint(t: Tensor) -> bool:
    """Ask Linux to back the 2 MiB-aligned interior of CPU tensor ``t``'s memory with huge
    pages, before it is first written; returns whether the hint was given and taken."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < _MIN_BYTES or not env_switch("BILINEARPOOL_HUGEPAGES"):
        return False
    madvise = _madvise()
    if madvise is None:
        return False
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    return end > start and madvise(start, end - start, _MADV_HUGEPAGE) == 0


def new_output(like: Tensor, *shape: int) -> Tensor:
    """``like.new_empty(shape)``, with the huge-page hint when large and on CPU."""
    out = like.new_empty(shape)
    huge_pages_hint(out)
    return out
