"""glibc's allocator settings for CPU training (finetune --mmap-threshold-mb).

glibc raises its mmap threshold to the size of the largest mmapped block freed so far (up to 32 MiB), so after
the first few buffers every activation comes from the heap, and the heap keeps what it frees resident: buffers
that outlive their neighbours (checkpointed blocks' saved inputs, gradients) leave holes the next sizes do not
fit, and the peak resident set becomes several times the live tensors (README, issue 19). A fixed threshold
puts every buffer at least that large in a mapping of its own, given back when freed; the price is a page fault
per 4 KiB page the first time a fresh mapping is written. Values are unchanged (allocation only).

Only glibc has mallopt; elsewhere (musl, macOS) these are no-ops. The settings are process-wide and stay.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune_for_training(mmap_threshold: int) -> bool:
    """Fix glibc's mmap threshold at `mmap_threshold` bytes (which also stops its dynamic raising) and the heap's
    trim threshold at twice that. True if applied (glibc)."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, 2 * int(mmap_threshold)))

