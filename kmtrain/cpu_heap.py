"""Keep glibc's freed heap memory in the process while kmtrain works on a CPU.

A training step on a CPU allocates its activations (several GB in fp32 at the demo's shapes),
frees them in the backward, and allocates them again in the next step. glibc's malloc hands the
free top of its heap back to the kernel whenever more than its trim threshold (at most 64 MB
under its dynamic defaults) is free, so the next step takes a page fault on every 4 KB page it
touches again: 1.5 to 3.2 million faults over a 30-step make demo training on a 2-core AVX2 host
(fp32). Raising the threshold for the run keeps those pages, and what is freed is reused by the
next step instead: 11-19% less training wall time there (`bench/results/cpu_heap_cpu.md`).

PyTorch's CPU allocator has no cache of its own, so this is the one place to do it. Only glibc
is touched (Linux); elsewhere, and on an accelerator, this does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
from typing import Iterator, Optional

import torch

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Setting either turns off glibc's dynamic thresholds for the rest of the process, so both are set:
# allocations up to the largest mmap threshold glibc accepts (32 MB on 64-bit) come from the heap,
# as the dynamic scheme would have them after the first such free, and freed memory stays unless
# more than 2 GB (mallopt takes an int) is free at the top.
KEPT_MMAP_THRESHOLD = 32 << 20
KEPT_TRIM_THRESHOLD = 2**31 - 1
# After the run: the trim threshold glibc's dynamic scheme reaches at that mmap threshold (twice it)
AFTER_TRIM_THRESHOLD = 2 * KEPT_MMAP_THRESHOLD


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (looked up once), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def heap_kept(device: torch.device) -> Iterator[bool]:
    """Within the block, memory freed on a CPU stays in the process for reuse. On leaving, the
    trim threshold drops to glibc's dynamic maximum and the free memory is returned
    (``malloc_trim``), so a caller's process does not keep the block's peak. Yields whether the
    heap is kept (False on an accelerator or without glibc)."""
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_THRESHOLD, KEPT_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)
    try:
        yield True
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
        return_free_memory()


def return_free_memory() -> bool:
    """Hand the heap's free memory back to the system now (glibc's ``malloc_trim``). Returns False
    where there is no glibc, and nothing was done."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
