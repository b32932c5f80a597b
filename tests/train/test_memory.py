"""train/memory.py: glibc's mmap threshold, fixed for training, puts large buffers in their own mappings (given
back when freed) and leaves small ones on the heap. Checked through glibc's own accounting (mallinfo2: hblkhd is
the bytes in mmapped chunks), which counts exact chunk sizes: no memory-threshold guesswork."""
from __future__ import annotations

import ctypes

import pytest
import torch

from toolkit.train import memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_bytes() -> int:
    libc = memory._libc()
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)


@pytest.mark.skipif(memory._libc() is None or not hasattr(memory._libc(), "mallinfo2"), reason="needs glibc >= 2.33")
def test_threshold_puts_large_buffers_in_mappings_and_frees_them():
    assert memory.tune_for_training(1 << 20)
    before = _mmapped_bytes()
    small = torch.empty(1 << 17)  # 512 KiB: below the threshold, from the heap
    assert _mmapped_bytes() == before
    big = torch.empty(1 << 19)  # 2 MiB: mapped on its own
    assert _mmapped_bytes() >= before + (2 << 20)
    del big
    assert _mmapped_bytes() == before  # unmapped at once, not kept by the allocator
    del small
    memory.tune_for_training(4 << 20)  # leave the process as training's default would
