"""train/memory.py: --huge-pages sets torch's huge-page switch before torch loads; glibc's mmap threshold, fixed
for training, puts large buffers in their own mappings (given back when freed) and leaves small ones on the heap.
Checked through glibc's own accounting (mallinfo2: hblkhd is the bytes in mmapped chunks), which counts exact chunk
sizes: no memory-threshold guesswork. In a fresh process: glibc serves a large request from a free heap chunk that
fits before it maps anything, and a long test session's heap has such chunks (as training's would if the threshold
were set late; finetune sets it before building the model)."""
from __future__ import annotations

import os
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


# A fresh process: the command's main() decides before torch loads; torch's allocator then aligns buffers to pages
# (its huge-page path, which also madvises those of 2 MiB and more) or to 64 bytes. main() fails afterwards on the
# missing model, which is fine here.
HUGE = r"""
import os, sys
from toolkit.errors import ToolkitError
from toolkit.train import finetune
try:
    finetune.main(["--model-base", "/nonexistent/m.gguf", "--train-data", "/nonexistent/d.txt", "--ctx", "256",
                   "--batch", sys.argv[1], "--huge-pages", sys.argv[2], "--adam-iter", "1"])
except ToolkitError:
    pass
import torch
big = [torch.empty(3 << 18) for _ in range(8)]  # 3 MiB each
aligned = sum(t.data_ptr() % 4096 == 0 for t in big)
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), aligned)
"""


@pytest.mark.parametrize("batch,setting,expect", [("8", "auto", ("1", 8)), ("1", "auto", ("None", None)),
                                                  ("1", "on", ("1", 8)), ("8", "off", ("None", None))])
def test_huge_pages_are_set_before_torch_loads(batch, setting, expect):
    env = {k: v for k, v in os.environ.items() if k != memory.HUGE_PAGE_ENV}
    p = subprocess.run([sys.executable, "-c", HUGE, batch, setting], capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    flag, aligned = p.stdout.split()
    assert flag == expect[0]
    if expect[1] is not None:
        assert int(aligned) == expect[1]  # every buffer on a page boundary
    else:
        assert int(aligned) < 8  # torch's usual 64-byte alignment: not all of them by chance


def test_huge_pages_rule_and_a_loaded_torch():
    assert memory.wants_huge_pages("auto", memory.HUGE_PAGE_TOKENS)
    assert not memory.wants_huge_pages("auto", memory.HUGE_PAGE_TOKENS - 1)
    assert memory.wants_huge_pages("on", 1) and not memory.wants_huge_pages("off", 10**6)
    if memory.HUGE_PAGE_ENV not in os.environ:  # torch is loaded in this process: too late, and "on" says so
        assert "already loaded" in memory.request_huge_pages("on", 1)
        assert memory.request_huge_pages("auto", 10**6) is None
        assert memory.HUGE_PAGE_ENV not in os.environ


# A fresh process: main() picks OpenMP's wait policy before torch loads (busy share injected); libgomp reads it then.
OMP = r"""
import os, sys
from toolkit.errors import ToolkitError
from toolkit.train import finetune, memory
memory.cpu_busy_fraction = lambda seconds=0.25: float(sys.argv[2])
try:
    finetune.main(["--model-base", "/nonexistent/m.gguf", "--train-data", "/nonexistent/d.txt",
                   "--omp-wait", sys.argv[1], "--adam-iter", "1"])
except ToolkitError:
    pass
print(os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.parametrize("setting,busy,expect", [("auto", "0.9", "PASSIVE"), ("auto", "0.1", "None"),
                                                 ("passive", "0.0", "PASSIVE"), ("spin", "1.0", "None")])
def test_omp_wait_policy_is_chosen_before_torch_loads(setting, busy, expect):
    env = {k: v for k, v in os.environ.items() if k != memory.OMP_WAIT_ENV}
    p = subprocess.run([sys.executable, "-c", OMP, setting, busy], capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-1] == expect
    assert ("keep 90% of the CPUs busy" in p.stderr) == (setting == "auto" and expect == "PASSIVE")


def test_omp_wait_keeps_the_users_choice_and_measures_the_cpus(monkeypatch):
    monkeypatch.setenv(memory.OMP_WAIT_ENV, "ACTIVE")
    assert memory.choose_omp_wait("passive", busy=lambda: 1.0) is None
    assert os.environ[memory.OMP_WAIT_ENV] == "ACTIVE"
    share = memory.cpu_busy_fraction(0.05)
    assert share is None or 0.0 <= share <= 1.0
