"""Process settings for CPU training: torch's transparent huge pages (finetune --huge-pages), glibc's mmap
threshold (--mmap-threshold-mb) and OpenMP's wait policy (--omp-wait). This module does not load torch: the
huge-page switch and the wait policy have to be set before it is.

OpenMP's wait policy: between two parallel ops libgomp's idle threads spin for a while, then sleep. On CPUs of
one's own that is the fast choice (SmolLM2 finetune, 2 threads: 159-163 tok/s against 107-115 with sleeping
threads, README); when other processes keep the CPUs busy, the spinning threads fight them for every core and
the same run fell to 23-39 tok/s against 61-65 with OMP_WAIT_POLICY=PASSIVE. "auto" samples how busy the CPUs
are before torch starts and picks.

Huge pages: when THP_MEM_ALLOC_ENABLE is set at torch's first allocation (it reads the variable once), its CPU
allocator aligns buffers to pages and asks the kernel for transparent huge pages (madvise) on those of 2 MiB and
more. With large activations (batch 8 at ctx 256) that measured fewer page faults, a faster step and a lower peak
(glibc's heap fragments less); with small passes (batch 1 of a small model, whose large buffers are a few
dequantized weights) the peak grew a little and the speed did not move, hence "auto" (README, issue 19).

The mmap threshold:

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
import os
import sys

HUGE_PAGE_ENV = "THP_MEM_ALLOC_ENABLE"
HUGE_PAGE_TOKENS = 1024  # "auto": huge pages from this many tokens per forward/backward pass (batch 4 at ctx 256)
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



def wants_huge_pages(setting: str, tokens_per_pass: int) -> bool:
    """--huge-pages on | off | auto (on from HUGE_PAGE_TOKENS tokens a pass)."""
    return setting == "on" or (setting == "auto" and tokens_per_pass >= HUGE_PAGE_TOKENS)


def request_huge_pages(setting: str, tokens_per_pass: int) -> str | None:
    """Set THP_MEM_ALLOC_ENABLE for torch's allocator if the setting wants it and torch is not loaded yet (a value
    the user set is kept). Returns a line to tell when an explicit "on" cannot take effect, else None."""
    if not wants_huge_pages(setting, tokens_per_pass) or HUGE_PAGE_ENV in os.environ:
        return None
    if "torch" in sys.modules:
        return (f"--huge-pages on has no effect: torch is already loaded (set {HUGE_PAGE_ENV}=1 before it starts)"
                if setting == "on" else None)
    os.environ[HUGE_PAGE_ENV] = "1"
    return None


OMP_WAIT_ENV = "OMP_WAIT_POLICY"
BUSY_FRACTION = 0.5  # "auto": passive waits when other processes use at least this share of the CPUs at start


def cpu_busy_fraction(seconds: float = 0.25) -> float | None:
    """The share of all CPUs' time spent running something (steal included) over `seconds`, from /proc/stat
    (Linux), while this process sleeps; elsewhere the 1-minute load average per CPU, capped at 1; None if
    neither exists."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v[:8]) - idle, sum(v[:8])
    try:
        b0, t0 = sample()
        import time

        time.sleep(seconds)
        b1, t1 = sample()
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        return min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except (OSError, AttributeError):
        return None


def choose_omp_wait(setting: str, busy=None, processes: int = 1) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE for --omp-wait passive, or for auto when `busy()` (the CPUs' busy share) is at
    least BUSY_FRACTION or `processes` (training processes on this machine) is more than one; leave libgomp's
    default otherwise. A value the user set (or a launcher's PASSIVE, which its
    processes inherit) is kept, and nothing is changed once torch is loaded. Returns a line to tell, or None."""
    if OMP_WAIT_ENV in os.environ or setting == "spin":
        return None
    if "torch" in sys.modules:
        return "--omp-wait passive has no effect: torch is already loaded" if setting == "passive" else None
    if setting == "passive":
        os.environ[OMP_WAIT_ENV] = "PASSIVE"
        return None
    if processes > 1:  # several training processes on this machine: each one's siblings are the other jobs
        os.environ[OMP_WAIT_ENV] = "PASSIVE"
        return None
    share = (busy or cpu_busy_fraction)()
    if share is not None and share >= BUSY_FRACTION:
        os.environ[OMP_WAIT_ENV] = "PASSIVE"
        return (f"other processes keep {share:.0%} of the CPUs busy: OpenMP threads will sleep between ops "
                "(--omp-wait spin to keep them spinning)")
    return None
