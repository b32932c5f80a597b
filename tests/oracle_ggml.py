"""llama.cpp's own quantizer and dequantizer, called through ctypes on the libggml that llama-cpp-python built.

- `ggml_quantize(x, qtype) -> bytes`: `ggml_quantize_chunk(type, x, dst, 0, rows, n_per_row, imatrix=NULL)`,
  i.e. the `quantize_row_*_ref` reference quantizers.
- `ggml_dequantize(raw, qtype, n) -> np.float32[n]`: the type traits' `to_float` (`ggml_get_type_traits`,
  in libggml-base).
- `available()`: whether llama_cpp and its libggml could be loaded (tests skip otherwise).

Both release the GIL (ctypes), so callers may run row chunks in threads. The library is found and loaded by
toolkit.ggml_codec (the toolkit's CPU codec when llama-cpp-python is installed), so the tests of the torch codec
against this oracle set the torch codec first.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from toolkit import ggml_codec  # the ctypes loading only; these wrappers are numpy-in, numpy-out


def _lib():
    return ggml_codec.library()


def _to_float(qtype: int):
    fn = ggml_codec.to_float(int(qtype))
    if fn is None:
        raise ValueError(f"ggml has no to_float for {GGMLQuantizationType(qtype).name}")
    return fn


def available() -> bool:
    return ggml_codec.available()


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
