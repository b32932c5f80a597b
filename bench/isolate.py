"""Run one benchmark engine in a fresh process."""
from __future__ import annotations


def isolated(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh spawned process: one engine's thread pools (llama.cpp's OpenMP workers keep
    spinning after it returns) must not slow the next one (measured: toolkit --compile lost ~15% after
    llama.cpp in the same process). fn must be importable from its module (defined at top level)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()
