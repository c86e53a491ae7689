"""caap.cpu: the glibc malloc setting the command line and the experiment scripts apply."""

from __future__ import annotations

import ctypes.util
import sys

import pytest
import torch

from caap.cpu import MMAP_THRESHOLD_MAX, keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="glibc's mallopt exists on Linux only")
def test_keep_freed_memory_applies_and_allocation_still_works():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
    x = torch.ones(8, 197, 768)  # above and below the thresholds
    y = torch.ones(MMAP_THRESHOLD_MAX // 4 + 1)
    assert float(x.sum()) == 8 * 197 * 768 and float(y.sum()) == MMAP_THRESHOLD_MAX // 4 + 1


def test_keep_freed_memory_is_a_no_op_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False
