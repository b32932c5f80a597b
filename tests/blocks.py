"""Codec and layer test inputs: random packed GGUF blocks, float inputs for the quantizers, a bitwise compare."""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random packed blocks [rows, row_bytes] (every bit pattern, NaN/inf scales included)."""
    rng = np.random.default_rng(seed)
    bv, bb = GGML_QUANT_SIZES[qtype]
    if qtype == Q.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    return rng.integers(0, 256, size=(rows, cols // bv * bb), dtype=np.uint8)


# byte offsets of the fp16 scales (d, dmin) inside each block
SCALE_OFFSETS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
    Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}


def finite_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random blocks whose fp16 scales are small finite numbers (a plausible weight)."""
    raw = random_blocks(qtype, rows, cols, seed)
    if qtype in (Q.F32, Q.F16):
        return raw
    bb = GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(-1, bb)
    rng = np.random.default_rng(seed + 1)
    for off in SCALE_OFFSETS[qtype]:
        d = (rng.random(len(blocks)) * 1e-2).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw


def distributions(rows: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 [rows, n] inputs that exercise every branch of the reference quantizers."""
    rng = np.random.default_rng(seed)

    def normal() -> np.ndarray:
        return rng.standard_normal((rows, n)).astype(np.float32)

    d: dict[str, np.ndarray] = {"normal": normal()}
    x = normal()
    x[rng.random(x.shape) < 0.01] *= 1e4
    d["outliers"] = x
    x = normal()
    m = rng.random(x.shape) < 0.005
    x[m] = rng.choice(np.array([3e38, -3e38, 1e30, -1e37], np.float32), int(m.sum()))
    d["huge"] = x  # x*x overflows to inf inside the searches
    d["zeros"] = np.zeros((rows, n), np.float32)
    x = np.zeros((rows, n), np.float32)
    x[:, ::7] = -0.0
    x[1::3, 5::11] = 1e-3
    d["signed_zeros"] = x
    d["subnormal"] = (rng.standard_normal((rows, n)) * 1e-39).astype(np.float32)
    d["tiny"] = (rng.standard_normal((rows, n)) * 1e-30).astype(np.float32)
    x = normal()
    x[rows // 2] = 0.37  # one constant row among normal ones
    d["constant_row"] = x
    d["negative"] = -np.abs(normal())
    d["positive"] = np.abs(normal())
    d["ties"] = (rng.integers(-64, 64, (rows, n)) / 8).astype(np.float32)  # exact halves, +a/-a ties
    d["sparse"] = (rng.standard_normal((rows, n)) * (rng.random((rows, n)) < 0.1)).astype(np.float32)
    d["fp16_overflow"] = (rng.standard_normal((rows, n)) * 1e6).astype(np.float32)  # block scales -> inf
    with np.errstate(over="ignore"):
        d["log_scale"] = (rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-44, 38, (rows, 1))).astype(np.float32)
    return d


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equal floats, except that any NaN equals any NaN."""
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))
