"""A process setting that makes batched patching on the CPU faster on Linux (glibc's malloc).

PyTorch allocates CPU tensors with plain `malloc`. The engine's batches allocate and free the same
large activations (megabytes each) on every pass, and with glibc's default, adaptive thresholds many of
them are handed back to the operating system when freed and come back as fresh pages, each page fault
costing time. On the 2-core development machine the engine's ViT-Tiny layer x position sweep took 18.5 s
with glibc's defaults and 14.6 s with this setting (`experiments/speed_caap.py`, with and without
`--default-malloc`). `keep_freed_memory()` fixes the thresholds; the command line and the experiment
scripts call it, library users may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20
"""The maximum M_MMAP_THRESHOLD that mallopt(3) documents for 64-bit systems."""


def keep_freed_memory(trim_threshold: int = 256 * 2**20, mmap_threshold: int = MMAP_THRESHOLD_MAX) -> bool:
    """Ask glibc's malloc to serve blocks below `mmap_threshold` bytes from its heap and to keep up to
    `trim_threshold` bytes of freed heap memory for reuse, instead of returning it to the operating
    system at once. Process-wide and lasting; the price is a higher resident memory (at most
    `trim_threshold` more). Returns whether both settings were applied (False off Linux/glibc, or if
    glibc refused a value).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    trim_ok = mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    return mmap_ok and trim_ok
