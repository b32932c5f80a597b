"""llama.cpp's own codec on the CPU: libggml's `to_float` and `ggml_quantize_chunk`, called through ctypes on the
libggml-base that llama-cpp-python ships (an optional dependency: `pip install toolkit[ggml]`).

toolkit.quants hands CPU tensors of the block types here when the library is found; the torch codec in quants
(bit-identical, checked against this library in the tests) does everything else: CUDA/MPS tensors, float types,
compiled graphs, machines without llama-cpp-python. Block types the torch codec lacks (IQ1-IQ3, TQ1_0/TQ2_0,
MXFP4, NVFP4, Q1_0) are read and written here only, on the CPU, whatever the setting and device. The C loops
make one pass over the output where eager torch makes several (README, "llama.cpp's codec on the CPU", has the
figures).

Which codec runs is one setting: `TOOLKIT_CODEC` = `auto` (default: libggml where it loads), `torch`, or
`ggml` (libggml or a clear error); `set_codec()` changes it in-process. The package is located, never imported
(importing llama_cpp loads libllama too). A library whose type table disagrees with gguf-py's block sizes is
not used.

Large tensors are cut into row ranges run on a thread pool (as many parts as torch's thread count): ctypes
releases the GIL for the call, so the parts run in parallel.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from .errors import ToolkitError
from .gguf_io import FLOAT_TYPES

__all__ = ["CODECS", "available", "codec", "dequantize", "handles", "quantize", "quantize_problem",
           "reads", "set_codec", "unavailable_reason"]

CODECS = ("auto", "torch", "ggml")
MIN_PART = 1 << 18  # values per thread: below this a hand-off costs more than the second core saves
# quantizing costs tens of times more per value than dequantizing (the K- and i-quants search scales), so it
# shares out smaller pieces, several per thread, taken in turn: rows differ in cost, and fixed halves left one
# core idle at the end of each tensor
QUANT_COST = 64
PIECES_PER_THREAD = 4
_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def _check(name: str) -> str:
    if name not in CODECS:
        raise ToolkitError(f"TOOLKIT_CODEC={name!r}: expected one of {', '.join(CODECS)}")
    return name


_setting = os.environ.get("TOOLKIT_CODEC", "auto").strip().lower() or "auto"


def codec() -> str:
    """The current setting: auto, torch or ggml."""
    return _check(_setting)


def set_codec(name: str) -> str:
    """Choose the CPU codec for this process; returns the previous setting. `ggml` fails here if libggml does
    not load."""
    global _setting
    prev, _setting = _setting, _check(name)
    if name == "ggml" and not available():
        _setting = prev
        raise ToolkitError(f"codec ggml: {unavailable_reason()}")
    return prev


def _lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise OSError("llama-cpp-python is not installed (pip install llama-cpp-python)")
    return Path(spec.origin).parent / "lib"


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(libggml-base, None), or (None, why not): tried once per process (a missing package is the common case)."""
    try:
        d = _lib_dir()
    except OSError as e:
        return None, str(e)
    for stem in ("libggml-base", "ggml-base", "libggml", "ggml"):
        for ext in (".so", ".dylib", ".dll"):
            path = d / f"{stem}{ext}"
            if not path.exists():
                continue
            try:
                lib = ctypes.CDLL(str(path), mode=getattr(os, "RTLD_GLOBAL", 0))
            except OSError as e:
                return None, f"{path}: {e}"
            if not hasattr(lib, "ggml_quantize_chunk"):
                continue
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            # the pointer-returning getter (ggml since late 2024); the older ggml_internal_get_type_traits returned
            # a differently laid out struct by value, which these declarations must never be applied to
            getter = getattr(lib, "ggml_get_type_traits", None)
            if getter is None:
                continue
            getter.restype = ctypes.POINTER(_TypeTraits)
            getter.argtypes = [ctypes.c_int]
            return lib, None
    return None, f"no libggml with ggml_quantize_chunk and ggml_get_type_traits under {d} (llama-cpp-python >= 0.3)"


def library() -> ctypes.CDLL:
    """libggml-base (libggml in older builds): the library exporting ggml_quantize_chunk and the type traits."""
    lib, why = _load()
    if lib is None:
        raise OSError(why)
    return lib


def unavailable_reason() -> str | None:
    """Why libggml cannot be used, or None when it can."""
    return _load()[1]


def available() -> bool:
    return unavailable_reason() is None


@functools.cache
def _traits(qtype: int) -> _TypeTraits | None:
    """The library's traits for a block type, None where its block sizes differ from gguf-py's (another ABI)."""
    traits = library().ggml_get_type_traits(int(qtype)).contents
    bv, bb = GGML_QUANT_SIZES[Q(qtype)]
    if traits.blck_size != bv or traits.type_size != bb:
        return None
    return traits


@functools.cache
def to_float(qtype: int):
    """libggml's to_float(blocks, out, n) for a block type, or None."""
    t = _traits(int(qtype))
    return _TO_FLOAT(t.to_float) if t is not None and t.to_float else None


def handles(qtype: Q, op: str, device: torch.device) -> bool:
    """Whether `op` ("dequantize" / "quantize") of `qtype` on `device` goes to libggml under the current setting."""
    setting = codec()
    if setting == "torch" or device.type != "cpu" or qtype in FLOAT_TYPES or torch.compiler.is_compiling():
        return False
    if not available():
        if setting == "ggml":
            raise ToolkitError(f"TOOLKIT_CODEC=ggml: {unavailable_reason()}")
        return False
    if _traits(int(qtype)) is None:
        return False
    return op == "quantize" or to_float(int(qtype)) is not None


_pool_lock = threading.Lock()
_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:  # one pool per process (a forked child makes its own) and size
        if _pool is None or _pool[0] != os.getpid() or _pool[1] < workers:
            if _pool is not None and _pool[0] == os.getpid():
                _pool[2].shutdown(wait=False)  # outgrown (torch's thread count went up)
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="ggml-codec"))
        return _pool[2]


def reads(qtype: Q) -> bool:
    """Whether the library is found and has a to_float for the block type (whatever the codec setting)."""
    return available() and qtype not in FLOAT_TYPES and _traits(int(qtype)) is not None \
        and to_float(int(qtype)) is not None


@functools.cache
def _needs_imatrix(qtype: int) -> bool:
    f = getattr(library(), "ggml_quantize_requires_imatrix", None)
    if f is None:
        return False
    f.restype, f.argtypes = ctypes.c_bool, [ctypes.c_int]
    return bool(f(int(qtype)))


def quantize_problem(qtype: Q) -> str | None:
    """Why the library cannot quantize to `qtype` here (a line), or None. ggml_quantize_chunk aborts the process
    on a type it has no quantizer for, or on one that needs an importance matrix: both are refused here first."""
    if not available():
        return unavailable_reason()
    if not reads(qtype):
        return f"libggml has no codec for {qtype.name}"
    if _needs_imatrix(int(qtype)):
        return f"{qtype.name} needs an importance matrix (llama.cpp's llama-quantize --imatrix)"
    return None


def _run_parts(rows: int, values_per_row: int, one, cost: int = 1, pieces: int = 1) -> None:
    """one(r0, r1) over row ranges, on up to torch's thread count of threads (this one and the pool's), each
    taking the next range until none is left; `cost`: work per value relative to dequantizing (more threads
    for smaller tensors), `pieces`: ranges per thread."""
    threads = max(1, min(torch.get_num_threads(), rows, rows * values_per_row * cost // MIN_PART))
    parts = min(rows, threads * pieces if threads > 1 else 1)
    cuts = [rows * i // parts for i in range(parts + 1)]
    ranges = iter(list(zip(cuts[:-1], cuts[1:])))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                rr = next(ranges, None)
            if rr is None:
                return
            one(*rr)

    pool = _executor(threads - 1) if threads > 1 else None
    futures = [pool.submit(work) for _ in range(threads - 1)] if pool is not None else []
    work()
    for f in futures:
        f.result()


def dequantize(blocks: torch.Tensor, qtype: Q, out: torch.Tensor | None = None, spread: bool = True) -> torch.Tensor:
    """uint8 blocks [nb, block_bytes] (CPU) -> float32 [nb, block_values], libggml's to_float (into `out`, a
    contiguous float32 tensor of that many values, when given); spread=False: on this thread only."""
    bv, bb = GGML_QUANT_SIZES[qtype]
    blocks = blocks.contiguous()
    nb = blocks.shape[0]
    if out is None:
        out = torch.empty((nb, bv), dtype=torch.float32)
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != nb * bv:
        raise ValueError(f"dequantize: out must be contiguous float32 of {nb * bv} values")
    out = out.view(nb, bv)
    fn, src, dst = to_float(int(qtype)), blocks.data_ptr(), out.data_ptr()

    def one(b0: int, b1: int) -> None:
        fn(src + b0 * bb, dst + b0 * bv * 4, (b1 - b0) * bv)

    if spread:
        _run_parts(nb, bv, one)
    else:
        one(0, nb)
    return out


def quantize(x: torch.Tensor, qtype: Q, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 rows [rows, n] (CPU, n a whole number of blocks) -> uint8 [rows, row_bytes], ggml_quantize_chunk
    without an importance matrix (the reference quantizers); written into `out` (contiguous uint8 [rows,
    row_bytes]) when given."""
    bv, bb = GGML_QUANT_SIZES[qtype]
    x = x.detach().to(torch.float32).contiguous()
    rows, n = x.shape
    rb = n // bv * bb
    if out is None:
        out = torch.empty((rows, rb), dtype=torch.uint8)
    if out.dtype != torch.uint8 or not out.is_contiguous() or out.shape != (rows, rb):
        raise ValueError(f"quantize: out must be contiguous uint8 [{rows}, {rb}]")
    lib, src, dst = library(), x.data_ptr(), out.data_ptr()

    def one(r0: int, r1: int) -> None:
        written = lib.ggml_quantize_chunk(int(qtype), src + r0 * n * 4, dst + r0 * rb, 0, r1 - r0, n, None)
        if written != (r1 - r0) * rb:
            raise ToolkitError(f"libggml wrote {written} bytes quantizing to {qtype.name}, expected {(r1 - r0) * rb}")

    _run_parts(rows, n, one, QUANT_COST, PIECES_PER_THREAD)
    return out
