"""The huge-page hint on the fused op's large CPU outputs (bilinearpool.functional._memory)."""

from __future__ import annotations

import warnings

import pytest
import torch

from bilinearpool.functional import _memory as M
from bilinearpool.functional import fast_bilinear_pool


def test_hint_covers_the_aligned_interior_of_large_buffers(monkeypatch):
    calls = []
    monkeypatch.setattr(M, "_madvise", lambda: lambda start, length, advice: calls.append((start, length, advice)) or 0)
    t = torch.empty(3 * (M._MIN_BYTES // 4) + 123)  # float32, not a multiple of the page
    assert M.huge_pages_hint(t)
    ((start, length, advice),) = calls
    begin, end = t.data_ptr(), t.data_ptr() + t.numel() * 4
    assert advice == M._MADV_HUGEPAGE
    assert start % M._HUGE_PAGE == 0 and length % M._HUGE_PAGE == 0 and length > 0
    assert begin <= start < start + length <= end
    assert start - begin < M._HUGE_PAGE and end - (start + length) < M._HUGE_PAGE  # all whole pages inside


def test_no_hint_for_small_buffers_or_without_madvise(monkeypatch):
    calls = []
    monkeypatch.setattr(M, "_madvise", lambda: lambda *args: calls.append(args) or 0)
    assert not M.huge_pages_hint(torch.empty(M._MIN_BYTES // 4 - 1))
    assert not calls
    monkeypatch.setattr(M, "_madvise", lambda: None)  # not Linux, or no libc
    assert not M.huge_pages_hint(torch.empty(M._MIN_BYTES))


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no ", "0\n"])
def test_no_hint_when_switched_off(monkeypatch, value):
    """Only "0" turned it off: "false", "off" and "0 " left the hint on without a word."""
    calls = []
    monkeypatch.setattr(M, "_madvise", lambda: lambda *args: calls.append(args) or 0)
    monkeypatch.setenv("BILINEARPOOL_HUGEPAGES", value)
    assert not M.huge_pages_hint(torch.empty(M._MIN_BYTES))
    assert not calls


@pytest.mark.parametrize("value", ["1", "on", "True", ""])
def test_hint_when_switched_on(monkeypatch, value):
    monkeypatch.setattr(M, "_madvise", lambda: lambda *args: 0)
    monkeypatch.setenv("BILINEARPOOL_HUGEPAGES", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.huge_pages_hint(torch.empty(M._MIN_BYTES))


def test_an_unknown_switch_value_warns_and_stays_on(monkeypatch):
    monkeypatch.setattr(M, "_madvise", lambda: lambda *args: 0)
    monkeypatch.setenv("BILINEARPOOL_HUGEPAGES", "disabled")
    with pytest.warns(RuntimeWarning, match=r"BILINEARPOOL_HUGEPAGES='disabled' is not a value it takes "
                      r"\(0, false, no or off to turn it off; 1, true, yes or on to keep it on\): left on"):
        assert M.huge_pages_hint(torch.empty(M._MIN_BYTES))
    with warnings.catch_warnings():  # once per value: the switch is read on every call
        warnings.simplefilter("error")
        assert M.huge_pages_hint(torch.empty(M._MIN_BYTES))


def test_a_refused_hint_changes_nothing(monkeypatch):
    monkeypatch.setattr(M, "_madvise", lambda: lambda *args: -1)  # e.g. EINVAL: THP not built in
    out = M.new_output(torch.zeros(1, dtype=torch.float64), 2, M._MIN_BYTES // 8)
    assert out.shape == (2, M._MIN_BYTES // 8) and out.dtype == torch.float64
    assert not M.huge_pages_hint(out)


def test_real_madvise_and_the_op_on_a_hinted_output():
    """With the real libc call (where there is one): large outputs of the op are right."""
    x = torch.randn(2, 1100, 3, 3, dtype=torch.float64).relu()  # output 2 x 1100^2 doubles: 19 MB
    assert isinstance(M.huge_pages_hint(torch.empty(M._MIN_BYTES)), bool)
    y = (x.flatten(2) @ x.flatten(2).transpose(1, 2) / 9).flatten(1)
    y = y / (y.abs() + 1e-5).sqrt().add(1e-5**0.5)
    y = y / y.norm(dim=1, keepdim=True)
    torch.testing.assert_close(fast_bilinear_pool(x), y, rtol=1e-10, atol=1e-12)
