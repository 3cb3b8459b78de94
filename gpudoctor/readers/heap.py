"""Keep a streaming reader's large transient buffers on the heap (glibc only).

A streaming reader allocates and frees a few 16-64 MB buffers per block (the block, the text carried
over, the event texts picked out of it). glibc serves such sizes with ``mmap`` and unmaps them on
``free``, so every block's buffers are faulted in again page by page: on a 3.4 GB trace that was about
two million page faults and a quarter of the read's CPU time (system time). Raising
``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` while reading keeps those buffers in the heap, reused from
one block to the next; afterwards the thresholds are set to what glibc's own adjustment reaches (32 MB
and twice that) and the free heap is given back (``malloc_trim``). With another C library this does
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from typing import Iterator

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_READ_MMAP_THRESHOLD_BYTES = 512 << 20
_AFTER_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def large_buffers_on_heap() -> Iterator[None]:
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _READ_MMAP_THRESHOLD_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * _READ_MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _AFTER_MMAP_THRESHOLD_BYTES)
        libc.malloc_trim(0)
