"""Random packed GGUF blocks for codec and layer tests."""
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
