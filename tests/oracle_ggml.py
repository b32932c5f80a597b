"""llama.cpp's own quantizer and dequantizer, called through ctypes on the libggml that llama-cpp-python built.

- `ggml_quantize(x, qtype) -> bytes`: `ggml_quantize_chunk(type, x, dst, 0, rows, n_per_row, imatrix=NULL)`,
  i.e. the `quantize_row_*_ref` reference quantizers.
- `ggml_dequantize(raw, qtype, n) -> np.float32[n]`: the type traits' `to_float` (`ggml_get_type_traits`,
  in libggml-base; older builds keep it in libggml / `ggml_internal_get_type_traits`).
- `available()`: whether llama_cpp and its libggml could be loaded (tests skip otherwise).

Both release the GIL (ctypes), so callers may run row chunks in threads.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def _lib_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise OSError("llama_cpp (llama-cpp-python) is not installed")
    return Path(spec.origin).parent / "lib"


def _find(names: tuple[str, ...]) -> str | None:
    d = _lib_dir()
    for n in names:
        for ext in (".so", ".dylib", ".dll"):
            p = d / f"{n}{ext}"
            if p.exists():
                return str(p)
    return None


@functools.cache
def _lib() -> ctypes.CDLL:
    """The library that exports ggml_quantize_chunk (libggml-base in current builds, libggml before)."""
    mode = getattr(os, "RTLD_GLOBAL", 0)
    for names in (("libggml-base", "ggml-base"), ("libggml", "ggml")):
        path = _find(names)
        if path is None:
            continue
        lib = ctypes.CDLL(path, mode=mode)
        if hasattr(lib, "ggml_quantize_chunk"):
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            return lib
    raise OSError(f"no libggml exporting ggml_quantize_chunk under {_lib_dir()}")


@functools.cache
def _to_float(qtype: int):
    lib = _lib()
    getter = getattr(lib, "ggml_get_type_traits", None) or getattr(lib, "ggml_internal_get_type_traits", None)
    if getter is None:
        raise OSError("libggml exports no ggml_get_type_traits")
    getter.restype = ctypes.POINTER(_TypeTraits)
    getter.argtypes = [ctypes.c_int]
    traits = getter(int(qtype)).contents
    if not traits.to_float:
        raise ValueError(f"ggml has no to_float for {GGMLQuantizationType(qtype).name}")
    return _TO_FLOAT(traits.to_float)


def available() -> bool:
    try:
        _lib()
        return True
    except OSError:
        return False


def ggml_quantize(x: np.ndarray, qtype: GGMLQuantizationType | str) -> bytes:
    """float32 [rows, n_per_row] -> the bytes ggml_quantize_chunk writes (no importance matrix)."""
    qtype = GGMLQuantizationType[qtype] if isinstance(qtype, str) else GGMLQuantizationType(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    rows, n = x.shape
    bv, bb = GGML_QUANT_SIZES[qtype]
    assert n % bv == 0
    out = np.zeros(rows * (n // bv) * bb, dtype=np.uint8)
    written = _lib().ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    assert written == out.nbytes, (written, out.nbytes)
    return out.tobytes()


def ggml_dequantize(raw: bytes | np.ndarray, qtype: GGMLQuantizationType | str, n: int,
                    out: np.ndarray | None = None) -> np.ndarray:
    """n values' packed blocks -> float32 [n] through ggml's to_float (written into `out`, a C-contiguous
    float32 array of n values, when given)."""
    qtype = GGMLQuantizationType[qtype] if isinstance(qtype, str) else GGMLQuantizationType(qtype)
    buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray)) else np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    bv, bb = GGML_QUANT_SIZES[qtype]
    assert buf.size == n // bv * bb, (buf.size, n // bv * bb)
    buf = np.ascontiguousarray(buf)
    if out is None:
        out = np.empty(n, dtype=np.float32)
    assert out.dtype == np.float32 and out.size == n and out.flags.c_contiguous
    if qtype == GGMLQuantizationType.F32:  # ggml has no to_float for F32: the bytes are the values
        out.reshape(-1)[:] = buf.view(np.float32)
        return out
    _to_float(int(qtype))(buf.ctypes.data, out.ctypes.data, n)
    return out
