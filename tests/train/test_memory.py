"""train/memory.py: glibc's mmap threshold, fixed for training, puts large buffers in their own mappings (given
back when freed) and leaves small ones on the heap. Checked through glibc's own accounting (mallinfo2: hblkhd is
the bytes in mmapped chunks), which counts exact chunk sizes: no memory-threshold guesswork. In a fresh process:
glibc serves a large request from a free heap chunk that fits before it maps anything, and a long test session's
heap has such chunks (as training's would if the threshold were set late; finetune sets it before building the model)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from toolkit.train import memory

CHECK = r"""
import ctypes, torch
from toolkit.train import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = memory._libc()
libc.mallinfo2.restype = MallInfo2
mapped = lambda: int(libc.mallinfo2().hblkhd)
assert memory.tune_for_training(1 << 20)
before = mapped()
small = torch.empty(1 << 17)  # 512 KiB: below the threshold, from the heap
assert mapped() == before, (mapped(), before)
big = torch.empty(1 << 19)  # 2 MiB: mapped on its own
assert mapped() >= before + (2 << 20), (mapped(), before)
del big
assert mapped() == before, (mapped(), before)  # unmapped at once, not kept by the allocator
"""


@pytest.mark.skipif(memory._libc() is None or not hasattr(memory._libc(), "mallinfo2"), reason="needs glibc >= 2.33")
def test_threshold_puts_large_buffers_in_mappings_and_frees_them():
    p = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
