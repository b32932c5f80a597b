"""GGUF quantization in torch: quantize / dequantize every common GGML type, bit-exact with llama.cpp.

- `dequantize(raw, qtype, shape)`: uint8 blocks -> float32, identical to ggml's `to_float` (the
  `dequantize_row_*` functions of ggml-quants.c), vectorised over blocks, CPU or CUDA.
- `quantize(x, qtype)`: float rows -> uint8 [rows, row_bytes], identical to `ggml_quantize_chunk` without an
  importance matrix (the `quantize_row_*_ref` reference quantizers), K-quants' iterative searches included.
- On the CPU, both hand the block types to llama.cpp's own C codec when llama-cpp-python is installed
  (toolkit.ggml_codec; TOOLKIT_CODEC=torch keeps this module's): same bytes, fewer passes over memory.
- `tensor_float(t)`: any GGUF tensor (TensorInfo) as torch values; `encode(w, qtype)`: float values -> the data
  `write_gguf` stores for `qtype`. Every reader and writer of GGUF tensor values goes through these two.

The packed layers built on this codec (QuantLinear / QuantEmbedding) live in toolkit.qlinear.

Exactness notes: every float32 operation is done in the order the C code does it, one rounding per C
operation (torch runs each elementwise op as its own kernel, so nothing is fused into an FMA; the
x86-64 baseline build of ggml-base has no FMA contraction either). Where C works in int (nearest_int's
magic-number trick, the (int8_t) truncations) we work in int too.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import ggml_codec
from .errors import ToolkitError
from .gguf_io import FLOAT_TYPES, QType, TensorInfo, as_qtype, row_bytes

Q = GGMLQuantizationType
QK_K = 256

__all__ = [
    "DEQUANT_TYPES",
    "QUANT_TYPES",
    "block_size",
    "dequant_problem",
    "dequantize",
    "dequantize_rows",
    "dequantizer",
    "encode",
    "f16_at",
    "quantize",
    "quantize_problem",
    "row_bytes",
    "scale_min_k4",
    "tensor_float",
]

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def block_size(qtype: QType) -> tuple[int, int]:
    """(values per block, bytes per block)."""
    return GGML_QUANT_SIZES[as_qtype(qtype)]


# ----------------------------------------------------------------------------------------------- helpers

def f16_at(b: torch.Tensor, off: int, n: int = 1) -> torch.Tensor:
    """The fp16 stored at byte `off` of every block -> float32 [nb] (exact); n > 1: n of them in a row,
    [nb, n]. Read in place as a strided fp16 view where the byte layout allows (every block size is even)."""
    s = b[:, off:off + 2 * n]
    if s.stride(0) % 2 or s.storage_offset() % 2 or s.stride(-1) != 1:
        s = s.contiguous()
    v = s.view(torch.float16).to(torch.float32)
    return v.squeeze(-1) if n == 1 else v


_LUT_CACHE: dict[tuple, torch.Tensor] = {}


def _lut(name: str, device: torch.device, make) -> torch.Tensor:
    key = (name, device.type, device.index)
    t = _LUT_CACHE.get(key)
    if t is None:
        t = make().to(device)
        _LUT_CACHE[key] = t
    return t


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> uint8 [..., 2, n]: low nibbles, then high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _block_nibbles(b: torch.Tensor, lo: int, hi: int, minus: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes [lo, hi) of every block split into (low nibbles, high nibbles), [nb, hi - lo] each (strided views;
    uint8, or int8 less `minus`). The ops run over the whole contiguous block buffer, headers included: one long
    loop each, where an op on the [nb, n] slice pays its per-row overhead on every block."""
    flat = b.reshape(-1)
    nb, bb = b.shape
    parts = [flat & 0x0F, flat >> 4]
    if minus:
        parts = [p.view(torch.int8).sub_(minus) for p in parts]
    return parts[0].view(nb, bb)[:, lo:hi], parts[1].view(nb, bb)[:, lo:hi]


def scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """getscale_min_k4 for j = 0..7: the 12 packed bytes [nb, 12] -> (scales, mins) uint8 [nb, 8]."""
    if sc.stride(0) % 4 == 0 and sc.storage_offset() % 4 == 0 and sc.stride(1) == 1:
        # the same bit moves on each block's three 32-bit words, four bytes per lane at once (few, cheap ops
        # on [nb] words instead of many on [nb, 4] strided bytes)
        w = sc.view(torch.int32)  # [nb, 3]: bytes 0-3 (q0), 4-7 (q4), 8-11 (q8)
        lo = w[:, 0:2] & 0x3F3F3F3F  # q0 & 63, q4 & 63
        shift = _lut("sh04", sc.device, lambda: torch.tensor([0, 4], dtype=torch.int32))
        hi = ((w[:, 2:3] >> shift) & 0x0F0F0F0F) | ((w[:, 0:2] >> 2) & 0x30303030)  # q8 nibble | (q >> 6) << 4
        dm = torch.stack((lo, hi), dim=2).view(torch.uint8)  # [nb, 2 (scales, mins), 8]
        return dm[:, 0], dm[:, 1]
    q0, q4, q8 = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    d = torch.cat((q0 & 63, (q8 & 0xF) | ((q0 >> 6) << 4)), dim=-1)
    m = torch.cat((q4 & 63, (q8 >> 4) | ((q4 >> 6) << 4)), dim=-1)
    return d, m


# ------------------------------------------------------------------------------------------- dequantize
# Each takes blocks uint8 [nb, block_bytes] and returns float32 [nb, block_values].

def _dq_f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32).clone() if b.dtype == torch.uint8 else b.float()


def _dq_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def _dq_bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).to(torch.float32)


def _empty_f32(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A new float32 tensor for a result. A large one on the CPU comes from numpy's allocator, which asks the
    kernel for transparent huge pages on blocks of 4 MiB and more (madvise; torch's allocator does not unless
    THP_MEM_ALLOC_ENABLE was set before it started): a large fresh result then costs far fewer first-touch
    page faults."""
    if device.type == "cpu" and not torch.compiler.is_compiling() and math.prod(shape) >= 1 << 20:
        return torch.from_numpy(np.empty(shape, np.float32))
    return torch.empty(shape, dtype=torch.float32, device=device)


def _new_out(nb: int, *shape: int, like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 result [nb, *shape]: a view of `out` (flat, preallocated by the caller) or a new tensor."""
    if out is not None:
        return out.view(nb, *shape)
    return _empty_f32((nb, *shape), like.device)


# The integer part is built in bytes (cheap passes), converted to float in one contiguous pass, then scaled in
# place: the float output is written as few times as eager torch allows.

def _dq_q4_0(b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    nb = b.shape[0]
    lo, hi = _block_nibbles(b, 2, 18, minus=8)
    out = _new_out(nb, 2, 16, like=b, out=out)
    out[:, 0] = lo
    out[:, 1] = hi
    return out.view(nb, 32).mul_(f16_at(b, 0)[:, None])


def _dq_q4_1(b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    nb = b.shape[0]
    lo, hi = _block_nibbles(b, 4, 20)
    out = _new_out(nb, 2, 16, like=b, out=out)
    out[:, 0] = lo
    out[:, 1] = hi
    return out.view(nb, 32).mul_(f16_at(b, 0)[:, None]).add_(f16_at(b, 2)[:, None])


def _q5_high(qh4: torch.Tensor) -> torch.Tensor:
    """4 bytes of qh (little-endian uint32) -> uint8 [nb, 32] holding bit e of qh at 0x10."""
    sh = _lut("sh8", qh4.device, lambda: torch.arange(8, dtype=torch.uint8))
    bits = (qh4[:, :, None] >> sh) & 1  # [nb, 4, 8]: byte k bit i = element 8k + i
    return bits.reshape(-1, 32) << 4


def _dq_q5_0(b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    nb = b.shape[0]
    q = (_nibbles(b[:, 6:22]).reshape(nb, 32) | _q5_high(b[:, 2:6])).view(torch.int8) - 16
    out = _new_out(nb, 32, like=b, out=out)
    out.copy_(q)
    return out.mul_(f16_at(b, 0)[:, None])


def _dq_q5_1(b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    nb = b.shape[0]
    out = _new_out(nb, 32, like=b, out=out)
    out.copy_(_nibbles(b[:, 8:24]).reshape(nb, 32) | _q5_high(b[:, 4:8]))
    return out.mul_(f16_at(b, 0)[:, None]).add_(f16_at(b, 2)[:, None])


def _dq_q8_0(b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _new_out(b.shape[0], 32, like=b, out=out)
    out.copy_(b[:, 2:34].view(torch.int8))
    return out.mul_(f16_at(b, 0)[:, None])


def _dq_q2_k(b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # block_q2_K: scales[16], qs[64], d, dmin
    nb, sc = b.shape[0], b[:, 0:16]
    d, dmin = f16_at(b, 80), f16_at(b, 82)
    dl = (d[:, None] * (sc & 0xF)).view(nb, 2, 4, 2, 1)  # scale index 8c + 2j + h
    ml = (dmin[:, None] * (sc >> 4)).view(nb, 2, 4, 2, 1)
    qs = b[:, 16:80].reshape(nb, 2, 1, 2, 16)  # (c, -, h, l)
    sh = _lut("sh2x4", b.device, lambda: (torch.arange(4, dtype=torch.uint8) * 2).reshape(1, 1, 4, 1, 1))
    out = _new_out(nb, 2, 4, 2, 16, like=b, out=out)
    out.copy_((qs >> sh) & 3)  # [nb, c, j, h, l]
    return out.mul_(dl).sub_(ml).view(nb, QK_K)


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """The 12 packed bytes of block_q3_K -> int32 [nb, 16] signed scales (already minus 32)."""
    lo = torch.cat((s[:, 0:8] & 0xF, s[:, 0:8] >> 4), dim=-1)  # [nb, 16]
    sh = _lut("sh2x4c", s.device, lambda: (torch.arange(4, dtype=torch.uint8) * 2).reshape(1, 4, 1))
    hi = ((s[:, None, 8:12] >> sh) & 3).reshape(-1, 16)  # is = 4*(is//4) + is%4
    return (lo | (hi << 4)).to(torch.int32) - 32


def _dq_q3_k(b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # block_q3_K: hmask[32], qs[64], scales[12], d
    nb = b.shape[0]
    dl = (f16_at(b, 108)[:, None] * _q3_scales(b[:, 96:108])).view(nb, 2, 4, 2, 1)
    hm = b[:, 0:32].reshape(nb, 1, 1, 2, 16)  # (-, -, h, l)
    qs = b[:, 32:96].reshape(nb, 2, 1, 2, 16)  # (c, -, h, l)
    sh = _lut("sh2x4", b.device, lambda: (torch.arange(4, dtype=torch.uint8) * 2).reshape(1, 1, 4, 1, 1))
    hsh = _lut("sh8q3", b.device, lambda: torch.arange(8, dtype=torch.uint8).reshape(1, 2, 4, 1, 1))
    q = ((qs >> sh) & 3) | (((hm >> hsh) & 1) << 2)  # 3-bit value with the high bit (bit 4c + j)
    out = _new_out(nb, 2, 4, 2, 16, like=b, out=out)
    out.copy_(q.view(torch.int8) - 4)  # q - (hbit ? 0 : 4)
    return out.mul_(dl).view(nb, QK_K)


# The K-quants' per-sub-block float scales, (d * scale, ...) float32 [nb, n] each: _run_dequant makes them for
# all blocks at once and hands each piece its rows (per-op overhead is paid once, not per piece).

def _k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: (d * scale, dmin * min) [nb, 8]."""
    sc, m = scale_min_k4(b[:, 4:16])
    return f16_at(b, 0)[:, None] * sc, f16_at(b, 2)[:, None] * m


def _q6_scales(b: torch.Tensor) -> tuple[torch.Tensor]:
    """Q6_K: d * scale [nb, 16] (the scales are int8)."""
    return (f16_at(b, 208)[:, None] * b[:, 192:208].view(torch.int8),)


def _dq_q4_k(b: torch.Tensor, out: torch.Tensor | None = None, scales: tuple | None = None) -> torch.Tensor:
    # block_q4_K: d, dmin, scales[12], qs[128]
    nb = b.shape[0]
    d1, m1 = scales if scales is not None else _k4_scales(b)
    d1, m1 = d1.view(nb, 4, 2, 1), m1.view(nb, 4, 2, 1)
    qs = b[:, 16:144].view(nb, 4, 32)
    out = _new_out(nb, 4, 2, 32, like=b, out=out)
    out[:, :, 0] = qs & 0xF
    out[:, :, 1] = qs >> 4
    return out.mul_(d1).sub_(m1).view(nb, QK_K)


def _dq_q5_k(b: torch.Tensor, out: torch.Tensor | None = None, scales: tuple | None = None) -> torch.Tensor:
    # block_q5_K: d, dmin, scales[12], qh[32], qs[128]
    nb = b.shape[0]
    d1, m1 = scales if scales is not None else _k4_scales(b)
    d1, m1 = d1.view(nb, 8, 1), m1.view(nb, 8, 1)
    sh = _lut("sh8c", b.device, lambda: torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1))
    hi = ((b[:, None, 16:48] >> sh) & 1) << 4  # [nb, 8, 32]
    out = _new_out(nb, 8, 32, like=b, out=out)
    out.copy_(_nibbles(b[:, 48:176].reshape(nb, 4, 32)).reshape(nb, 8, 32) | hi)
    return out.mul_(d1).sub_(m1).view(nb, QK_K)


def _dq_q6_k(b: torch.Tensor, out: torch.Tensor | None = None, scales: tuple | None = None) -> torch.Tensor:
    # block_q6_K: ql[128], qh[64], scales[16] (int8), d
    nb = b.shape[0]
    ds = (scales or _q6_scales(b))[0].view(nb, 2, 4, 2, 1)  # (c, quarter, l//16)
    ql = b[:, 0:128].reshape(nb, 2, 2, 32)  # (c, 32-byte half, l)
    lo, hi = ql & 0x0F, ql >> 4
    # quarter k's two high bits are bits 2k, 2k+1 of qh[c, l]: moved to 0x30 on the contiguous qh bytes (long
    # loops; a shift by a broadcast tensor of amounts has no fast path)
    qh = b[:, 128:192].contiguous().view(nb, 2, 32)
    h = ((qh << 4) & 0x30, (qh << 2) & 0x30, qh & 0x30, (qh >> 2) & 0x30)
    q = torch.stack((lo[:, :, 0] | h[0], lo[:, :, 1] | h[1], hi[:, :, 0] | h[2], hi[:, :, 1] | h[3]), dim=2)
    out = _new_out(nb, 2, 4, 2, 16, like=b, out=out)
    out.copy_(q.view(torch.int8).sub_(32).view(nb, 2, 4, 2, 16))  # [nb, c, quarter, l//16, l%16]
    return out.mul_(ds).view(nb, QK_K)


def _kvalues(device: torch.device) -> torch.Tensor:
    return _lut("iq4nl", device, lambda: torch.tensor(KVALUES_IQ4NL, dtype=torch.float32))


def _dq_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d = f16_at(b, 0)
    idx = _nibbles(b[:, 2:18]).reshape(-1, 32).long()
    return d[:, None] * _kvalues(b.device)[idx]


def _dq_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    # block_iq4_xs: d, scales_h (uint16), scales_l[4], qs[128]
    d = f16_at(b, 0)
    sh_h = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32)  # [nb, 1]
    shifts = _lut("sh16", b.device, lambda: torch.arange(8, dtype=torch.int32) * 2)
    hi = (sh_h >> shifts) & 3  # [nb, 8]
    sl = b[:, 4:8]
    lo = torch.stack((sl & 0xF, sl >> 4), dim=-1).reshape(-1, 8).to(torch.int32)
    dl = d[:, None] * ((lo | (hi << 4)) - 32)  # [nb, 8]
    idx = _nibbles(b[:, 8:136].reshape(-1, 8, 16)).reshape(-1, 8, 32).long()
    y = dl[:, :, None] * _kvalues(b.device)[idx]
    return y.reshape(-1, QK_K)


_DEQUANT = {
    Q.F32: _dq_f32, Q.F16: _dq_f16, Q.BF16: _dq_bf16,
    Q.Q4_0: _dq_q4_0, Q.Q4_1: _dq_q4_1, Q.Q5_0: _dq_q5_0, Q.Q5_1: _dq_q5_1, Q.Q8_0: _dq_q8_0,
    Q.Q2_K: _dq_q2_k, Q.Q3_K: _dq_q3_k, Q.Q4_K: _dq_q4_k, Q.Q5_K: _dq_q5_k, Q.Q6_K: _dq_q6_k,
    Q.IQ4_NL: _dq_iq4_nl, Q.IQ4_XS: _dq_iq4_xs,
}
DEQUANT_TYPES = tuple(_DEQUANT)  # the torch codec's; dequant_problem() tells about the others


def _not_blocks(qtype: Q) -> str:
    return f"{qtype.name} holds integers, not float values" if qtype.name.startswith("I") else \
        f"{qtype.name} is not supported"


def dequant_problem(qtype: QType) -> str | None:
    """Why values stored as `qtype` cannot be read here (a line), or None: the torch codec's types always can,
    the block types only libggml reads (IQ1-IQ3, TQ*, MXFP4, NVFP4, Q1_0) where llama-cpp-python is installed,
    integer types never."""
    qtype = as_qtype(qtype)
    if qtype in _DEQUANT or ggml_codec.reads(qtype):
        return None
    if qtype not in GGML_QUANT_SIZES or GGML_QUANT_SIZES[qtype][0] == 1:
        return _not_blocks(qtype)
    why = ggml_codec.unavailable_reason()
    if why is None:
        return f"no dequantizer for {qtype.name}"
    return f"{qtype.name} blocks are read by llama.cpp's libggml, which is not usable here: {why}"



def _as_blocks(raw: torch.Tensor, qtype: Q, n: int) -> torch.Tensor:
    bv, bb = GGML_QUANT_SIZES[qtype]
    if n % bv:
        raise ToolkitError(f"{n} values are not a whole number of {qtype.name} blocks of {bv}")
    if raw.dtype != torch.uint8:
        if qtype in FLOAT_TYPES and raw.is_floating_point():
            raw = raw.contiguous().reshape(-1).view(torch.uint8)
        else:
            raise ToolkitError(f"dequantize expects uint8 blocks, got {raw.dtype}")
    nb = n // bv
    if raw.numel() != nb * bb:
        raise ToolkitError(f"{qtype.name}: {raw.numel()} bytes given, {nb * bb} expected for {n} values")
    if not raw.is_contiguous():
        raw = raw.contiguous()
    return raw.reshape(nb, bb)


# On CPU, dequantize works through the blocks in pieces of about this many values: it bounds the byte-sized
# temporaries for huge tensors, and a piece's float result (4 MiB) stays in the last-level cache between the
# passes over it (convert, scale, shift); smaller pieces measured slower: per-op overhead dominates.
DEQUANT_CHUNK = 1 << 20
_SCALES = {Q.Q4_K: _k4_scales, Q.Q5_K: _k4_scales, Q.Q6_K: _q6_scales}
_WRITES_OUT = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


def dequantizer(qtype: QType, device: torch.device) -> str:
    """Which codec dequantizes `qtype` blocks on `device`: "libggml" where toolkit.ggml_codec takes the type (and
    for the types only libggml reads, on any device: through a CPU copy), else "torch"."""
    qtype = as_qtype(qtype)
    return "libggml" if qtype not in _DEQUANT or ggml_codec.handles(qtype, "dequantize", device) else "torch"


def _run_dequant(qtype: Q, blocks: torch.Tensor, out: torch.Tensor | None = None, spread: bool = True) -> torch.Tensor:
    """blocks [nb, block_bytes] -> float32 [nb, block_values]: libggml's to_float where dequantizer() says so, else
    the torch codec (chunked on CPU). `out`: a contiguous float32 buffer of that size the result may be written
    into (use the returned tensor); spread=False keeps libggml's work on this thread."""
    bv = GGML_QUANT_SIZES[qtype][0]
    if qtype not in _DEQUANT and blocks.device.type != "cpu":  # a type only libggml reads: on the CPU, moved back
        return _run_dequant(qtype, blocks.cpu()).to(blocks.device)  # (a C call: dynamo breaks the graph here)
    if dequantizer(qtype, blocks.device) == "libggml":
        if out is None:
            out = _empty_f32((blocks.shape[0], bv), blocks.device)
        return ggml_codec.dequantize(blocks, qtype, out, spread)
    fn = _DEQUANT[qtype]
    nb = blocks.shape[0]
    step = max(1, DEQUANT_CHUNK // bv)
    if blocks.is_cuda or nb <= step or qtype not in _WRITES_OUT:
        return fn(blocks)
    if out is None:
        out = _empty_f32((nb, bv), blocks.device)
    out = out.view(nb, bv)
    prep = _SCALES.get(qtype)
    scales = prep(blocks) if prep is not None else None
    for i in range(0, nb, step):
        j = min(nb, i + step)
        if scales is None:
            fn(blocks[i:j], out=out[i:j])
        else:
            fn(blocks[i:j], out=out[i:j], scales=tuple(s[i:j] for s in scales))
    return out


def dequantize(raw: torch.Tensor, qtype: QType, shape: Sequence[int] | int) -> torch.Tensor:
    """uint8 GGUF blocks ([rows, row_bytes] or flat) -> float32 tensor of `shape`, on raw's device.

    Identical to ggml's `to_float` for the type (dequantize_row_* in ggml-quants.c).
    """
    qtype = as_qtype(qtype)
    why = dequant_problem(qtype)
    if why is not None:
        raise ToolkitError(f"cannot dequantize: {why}")
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8))
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=torch.float32, device=raw.device)
    return _run_dequant(qtype, _as_blocks(raw, qtype, n)).reshape(shape)


def dequantize_rows(raw: torch.Tensor, qtype: Q, cols: int, out: torch.Tensor | None = None,
                    spread: bool = True) -> torch.Tensor:
    """uint8 [rows, row_bytes] -> float32 [rows, cols] (a layer's packed weight, or a slice of its rows); `out`
    and `spread` as _run_dequant's."""
    blocks = _as_blocks(raw, qtype, raw.shape[0] * cols)
    return _run_dequant(qtype, blocks, out, spread).reshape(raw.shape[0], cols)


def tensor_float(t: TensorInfo, dtype: torch.dtype | None = torch.float32, copy: bool = False) -> torch.Tensor:
    """A GGUF tensor's values in torch shape: the one way the toolkit reads tensor values from a file.

    F32/F16/BF16 are zero-copy views of the file when `dtype` is their own (None keeps the stored float type);
    other types dequantize to float32 (ggml's to_float), then convert to `dtype`. `copy=True` returns memory of
    its own (never a view of the file's mapping).
    """
    if t.qtype in FLOAT_TYPES:
        flat = torch.from_numpy(np.ascontiguousarray(t.data).reshape(-1).view(np.uint8))
        w = flat.view({Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[t.qtype]).reshape(t.shape)
    else:
        w = dequantize(t.raw(), t.qtype, t.shape or (1,)).reshape(t.shape)
        copy = False  # already fresh
    if dtype is not None and w.dtype != dtype:
        return w.to(dtype)
    return w.clone() if copy else w



# --------------------------------------------------------------------------------------------- quantize
# Conventions: every C float operation is one torch op on float32 tensors, in the C order; division by a
# constant is torch.div by a tensor (CUDA would turn `t / python_float` into a multiply by the reciprocal);
# sums that C accumulates in a loop are accumulated element by element in the same order (_seqsum);
# float -> int conversions follow x86 (_cvt_i32); int stores into uint8/int8 wrap (& 0xFF).

_F32 = torch.float32
_MAGIC = 12582912.0  # 1.5 * 2^23, nearest_int's constant
GROUP_MAX_EPS = float(np.float32(1e-15))


def _f32(v: float) -> float:
    """A C float constant / float expression: the Python float holding the float32 value."""
    return float(np.float32(v))


def _cdiv(a, b) -> torch.Tensor:
    """IEEE float32 a / b, a or b possibly a Python number (never a reciprocal multiply)."""
    if not isinstance(a, torch.Tensor):
        a = torch.full((1,), _f32(a), dtype=_F32, device=b.device)
    if not isinstance(b, torch.Tensor):
        b = torch.full((1,), _f32(b), dtype=_F32, device=a.device)
    return torch.div(a, b)


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int(float) -> int32, bit for bit (also for |v| >= 2^22, NaN and inf)."""
    return ((v + _MAGIC).view(torch.int32) & 0x007FFFFF) - 0x00400000


def _seqsum(t: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """sum over dim 0 in order, one float32 rounding per element: `s = 0; for i: s += t[i]`."""
    acc = torch.zeros_like(t[:1]) if start is None else start[None].clone()
    return _seqsum_into(acc, t)[0]


def _seqsum_into(acc: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """acc [1, ...] += t[0], += t[1], ... in order. On the CPU that is one index_add_ with an all-zero
    index: it adds "in the order given in index" (an int32 index keeps it on the plain slice-by-slice
    loop); CUDA's index_add_ is atomic (unordered), so there it is a Python loop."""
    if t.device.type == "cpu":
        return acc.index_add_(0, _lut(f"zeros_i32_{t.shape[0]}", t.device,
                                      lambda: torch.zeros(t.shape[0], dtype=torch.int32)), t)
    for i in range(t.shape[0]):
        acc[0].add_(t[i])
    return acc


def _sqrtf(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt, as sqrtf / sqrtss give (torch's CPU sqrt may be 1 ulp off): round the
    float64 root to float32, then step to the neighbour when v lies past a midpoint (squares exact in f64)."""
    d = v.to(torch.float64)
    r = torch.sqrt(d).to(_F32)
    inf = torch.full_like(r, math.inf)
    up, dn = torch.nextafter(r, inf), torch.nextafter(r, torch.zeros_like(r))
    rd = r.to(torch.float64)
    hi = (rd + up.to(torch.float64)) * 0.5
    lo = (rd + dn.to(torch.float64)) * 0.5
    return torch.where(d > hi * hi, up, torch.where(d < lo * lo, dn, r))


def _first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C's `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from amax = max = 0, over dim 0."""
    ax = x.abs()
    ax = torch.where(torch.isnan(ax), torch.zeros_like(ax), ax)  # NaN never compares greater
    i = ax.argmax(dim=0, keepdim=True)  # the first index of the maximum
    amax = ax.gather(0, i)[0]
    mx = x.gather(0, i)[0]
    return amax, torch.where(amax > 0, mx, torch.zeros_like(mx))  # never updated: max stays +0


def _fp32_to_fp16_bits(x: torch.Tensor) -> torch.Tensor:
    """ggml's GGML_FP32_TO_FP16 (round to nearest even; NaN -> 0x7E00 | sign) -> int16 bits."""
    h = x.to(torch.float16).view(torch.int16)
    nan = torch.isnan(x)
    if bool(nan.any()):
        sign = ((x.view(torch.int32) >> 16) & 0x8000) | 0x7E00
        h = torch.where(nan, sign.to(torch.int32).to(torch.int16), h)
    return h


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))."""
    return x.to(torch.float16).to(_F32)


def _fp32_to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN made quiet (bits | 64) -> int16 bits."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    r = torch.where(nan, (u >> 16) | 64, r) & 0xFFFF
    r = torch.where(r >= 0x8000, r - 0x10000, r)
    return r.to(torch.int16)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [...] -> uint8 [..., 2]: the fp16 ggml stores (little-endian)."""
    return _fp32_to_fp16_bits(x.contiguous()).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _cvt_i32(v: torch.Tensor) -> torch.Tensor:
    """C's float -> int conversion as x86 does it (cvttss2si): truncate toward zero; NaN, inf and values
    out of int32 range give INT32_MIN. (CUDA would saturate instead, so the rule is spelled out.)"""
    ok = v.abs() < 2147483648.0  # False for NaN and inf
    return torch.where(ok, v, -2147483648.0).to(torch.int32)


def _as_i8(v: torch.Tensor) -> torch.Tensor:
    """int32 -> the value an int8_t store keeps (two's complement wrap), still int32."""
    return ((v + 128) & 0xFF) - 128


def _u8(v: torch.Tensor) -> torch.Tensor:
    """int -> uint8 store (wraps)."""
    return (v & 0xFF).to(torch.uint8)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero (torch.round is half to even). v - trunc(v) is exact."""
    a = v.trunc()
    return torch.where((v - a).abs() >= 0.5, a + torch.sign(v), a)


def _inv_or_zero(d: torch.Tensor) -> torch.Tensor:
    """`d ? 1.0f/d : 0.0f`."""
    return torch.where(d != 0, _cdiv(1.0, d), torch.zeros_like(d))


def _first_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C's `if (v < min) min = v; if (v > max) max = v;` over dim 1: the first of equal values (+0 / -0)."""
    mn = x.gather(1, x.argmin(dim=1, keepdim=True))[:, 0]
    mx = x.gather(1, x.argmax(dim=1, keepdim=True))[:, 0]
    return mn, mx


def _q_q4_0(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, 32)
    fin = _finite(x)
    _, mx = _absmax_fast(x.t()) if fin else _first_absmax(x.t())
    d = _cdiv(mx, -8.0)
    idv = _inv_or_zero(d)
    v = (x * idv[:, None]).add_(8.5)
    if fin and _finite(idv):  # v in [0, 17): the (int8_t) cast is a plain truncation
        xi = v.to(torch.uint8).clamp_max_(15)
    else:
        xi = _u8(torch.clamp_max(_as_i8(_cvt_i32(v)), 15))
    qs = xi[:, :16] | (xi[:, 16:] << 4)
    return torch.cat((_f16_bytes(d), qs), dim=1)


def _min_max_finite(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """_first_min_max over dim 1 when every block's range is finite, else None: one aminmax (it propagates NaN
    and inf, which then show in the range), and the first-of-equal rule only for blocks whose min or max is a
    zero (the one case where equal values differ in bits: -0 / +0)."""
    mn, mx = torch.aminmax(x, dim=1)
    if not bool(torch.isfinite(mx - mn).all()):
        return None
    zero = (mn == 0) | (mx == 0)
    if bool(zero.any()):
        idx = zero.nonzero()[:, 0]
        mn[idx], mx[idx] = _first_min_max(x[idx])
    return mn, mx


def _q_q4_1(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, 32)
    fast = _min_max_finite(x)
    mn, mx = fast if fast is not None else _first_min_max(x)
    d = _cdiv(mx - mn, 15.0)
    idv = _inv_or_zero(d)
    if fast is not None and bool(torch.isfinite(idv).all()):
        # (x - min) * id + 0.5 then lies in [0, ~15.5] (an id past FLT_MAX, from a tiny subnormal d, would not):
        # C's (int8_t) cast is a plain truncation there
        xi = (x - mn[:, None]).mul_(idv[:, None]).add_(0.5).to(torch.uint8).clamp_max_(15)
    else:
        xi = _u8(torch.clamp_max(_as_i8(_cvt_i32((x - mn[:, None]) * idv[:, None] + 0.5)), 15))
    qs = xi[:, :16] | (xi[:, 16:] << 4)
    return torch.cat((_f16_bytes(d), _f16_bytes(mn), qs), dim=1)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8/bool [..., 8k] of 0/1 -> uint8 [..., k], element 8j + i at bit i of byte j."""
    b = bits.to(torch.int32).reshape(*bits.shape[:-1], -1, 8)
    w = _lut("pow2_8", bits.device, lambda: (1 << torch.arange(8, dtype=torch.int32)))
    return (b * w).sum(-1).to(torch.uint8).reshape(bits.shape[0], -1)


def _q_q5_0(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, 32)
    _, mx = _absmax_fast(x.t()) if _finite(x) else _first_absmax(x.t())
    d = _cdiv(mx, -16.0)
    idv = _inv_or_zero(d)
    xi = _u8(torch.clamp_max(_as_i8(_cvt_i32(x * idv[:, None] + 16.5)), 31))
    qs = (xi[:, :16] & 0xF) | ((xi[:, 16:] & 0xF) << 4)
    return torch.cat((_f16_bytes(d), _pack_bits((xi >> 4) & 1), qs), dim=1)


def _q_q5_1(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, 32)
    fast = _min_max_finite(x)
    mn, mx = fast if fast is not None else _first_min_max(x)
    d = _cdiv(mx - mn, 31.0)
    idv = _inv_or_zero(d)
    if fast is not None and bool(torch.isfinite(idv).all()):  # in [0, ~31.5] (see _q_q4_1): the cast truncates
        xi = (x - mn[:, None]).mul_(idv[:, None]).add_(0.5).to(torch.uint8)
    else:
        xi = _u8(_cvt_i32((x - mn[:, None]) * idv[:, None] + 0.5))
    qs = (xi[:, :16] & 0xF) | ((xi[:, 16:] & 0xF) << 4)
    return torch.cat((_f16_bytes(d), _f16_bytes(mn), _pack_bits((xi >> 4) & 1), qs), dim=1)


_HALF_DOWN = float(np.nextafter(np.float32(0.5), np.float32(0)))  # 0.49999997f


def _q_q8_0(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, 32)
    if _finite(x):
        amax = torch.maximum(x.amax(dim=1), -x.amin(dim=1))
        amax = torch.where(amax > 0, amax, torch.zeros_like(amax))  # +0, as C's running MAX from 0
    else:  # C's `amax = MAX(amax, fabsf(v))`, NaN semantics included
        amax = torch.zeros_like(x[:, 0])
        for j in range(32):
            v = x[:, j].abs()
            amax = torch.where(amax > v, amax, v)
    d = _cdiv(amax, 127.0)
    idv = _inv_or_zero(d)
    v = x * idv[:, None]
    if _finite(idv) and _finite(amax):
        # |v| <= 127 and finite: roundf(v) == trunc(v + copysign(0.49999997f, v)) exactly
        half = torch.full_like(v, _HALF_DOWN).copysign_(v)
        q = v.add_(half).to(torch.int8).view(torch.uint8)
    else:
        q = _u8(_cvt_i32(_roundf(v)))
    return torch.cat((_f16_bytes(d), q), dim=1)


# ---- K-quants. Sub-blocks are laid out element-major, xt [n, S] (S sub-blocks), so C's inner loops over
# the n elements of a sub-block become n vector steps over all sub-blocks at once.
#
# nearest_int(v) is an integer-bit trick; for |v| < 2^22 it is exactly round-half-even (torch.round). The
# fast path is taken where a cheap per-sub-block
# bound proves |v| < 2^21; anything else (inf, NaN, overflowing ranges) goes through the bit trick itself.

_FAST_BOUND = float(1 << 21)


def _round_clamp(v: torch.Tensor, lo: int, hi: int, fast: bool) -> torch.Tensor:
    """float(MAX(lo, MIN(hi, nearest_int(v)))), written into v (float32) and returned."""
    if fast:  # round half to even == nearest_int below 2^22
        return v.round_().clamp_(lo, hi)
    return v.copy_(_nearest_int(v).clamp_(lo, hi))


def _bounded(bound: torch.Tensor) -> bool:
    """True when every entry is finite and below the fast-rounding bound."""
    return bool((bound < _FAST_BOUND).all())  # False for NaN / inf


def _absmax_fast(x: torch.Tensor, amax_abs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """_first_absmax for finite x over dim 0, from amax/amin; ties (+a and -a both present) resolved by
    looking at those sub-blocks only."""
    hi, lo = x.amax(dim=0), x.amin(dim=0)
    nlo = -lo
    amax = torch.maximum(hi, nlo)
    mx = torch.where(hi >= nlo, hi, lo)
    tie = (hi == nlo) & (hi > 0)
    idx = tie.nonzero()[:, 0]
    if idx.numel():
        _, m = _first_absmax(x[:, idx])
        mx[idx] = m
    mx = torch.where(amax > 0, mx, torch.zeros_like(mx))
    return amax, mx


def _make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool, finite: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants over x, w [n, S] -> (scale [S], the_min [S], L float [n, S]).
    Each try depends on the one before (through min), so the tries run one after the other over all
    sub-blocks; every try writes into the same preallocated buffers (no temporaries per try)."""
    n, S = x.shape
    mn = x.amin(dim=0)  # the sign of a zero min cannot change any byte here
    mx = x.amax(dim=0)
    xabs = torch.maximum(mx.abs(), mn.abs())
    sum_w = _seqsum(w[1:], w[0])
    sum_x = _seqsum(w[1:] * x[1:], w[0] * x[0])
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    iscale = _cdiv(float(nmax), mx - mn)
    scale = _cdiv(1.0, iscale)
    # lx[:, 0] holds a try's levels L, lx[:, 1] a copy of x: (w*L) * [L, x] is then one multiply.
    # terms[i] = (w*L, w*L*L, w*L*x) of element i, summed in order into sums [1, 3, S].
    lx = torch.empty((n, 2, S), dtype=_F32, device=x.device)
    lx[:, 1] = x
    lf = lx[:, 0]
    terms = torch.empty((n, 3, S), dtype=_F32, device=x.device)
    sums = torch.empty((1, 3, S), dtype=_F32, device=x.device)
    err = torch.empty_like(x)
    cur = torch.empty((1, S), dtype=_F32, device=x.device)

    def levels(isc: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        torch.sub(x, m, out=out).mul_(isc)
        return _round_clamp(out, 0, nmax, finite and _bounded(isc.abs() * (xabs + m.abs())))

    def error(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """sum of w * (sc*L + m - x)^2 (or |.|), in order."""
        torch.mul(lf, sc, out=err).add_(m).sub_(x)
        if use_mad:
            err.abs_()
        else:
            err.mul_(err)
        err.mul_(w)
        return _seqsum_into(cur.zero_(), err)[0]

    levels(iscale, mn, lf)
    best = error(scale, mn).clone()
    best_is, best_mn = iscale, mn
    for step in range(nstep + 1):
        c = _f32(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = _cdiv(c, mx - mn)
        levels(iscale, mn, lf)
        torch.mul(w, lf, out=terms[:, 0])
        torch.mul(terms[:, :1], lx, out=terms[:, 1:])
        sum_l, sum_l2, sum_xl = _seqsum_into(sums.zero_(), terms)[0]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        e = error(this_scale, this_min)
        upd = (D > 0) & (e < best)
        best = torch.where(upd, e, best)
        scale = torch.where(upd, this_scale, scale)
        best_is = torch.where(upd, iscale, best_is)
        best_mn = torch.where(upd, mn, best_mn)
        mn = torch.where(upd, this_min, mn)
    L = levels(best_is, best_mn, torch.empty_like(x))
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn, L


_QX_GROUP = 2  # elements per step of make_qx_quants' batched tries (measured best on a 2-core AMD EPYC)


def _qx_steps(nmax: int, device: torch.device) -> torch.Tensor:
    """make_qx_quants' numerators -(nmax + 0.1f*is): the first try (is = 0) then is = -9..9 without 0."""
    steps = [0] + [s for s in range(-9, 10) if s != 0]
    return _lut(f"qx_steps{nmax}", device, lambda: torch.tensor(
        [_f32(-(np.float32(nmax) + np.float32(0.1) * np.float32(s))) for s in steps], dtype=_F32))


def _make_qx_quants(x: torch.Tensor, nmax: int, finite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) over x [n, S] -> (scale [S], L float [n, S]).
    The 19 tries do not depend on each other's outcome, so they run as one batch [T, S], _QX_GROUP elements
    (steps of C's loop) at a time: a [g, T, S] working set stays in cache where a [T, n, S] one would not,
    and the sums accumulate in C's order."""
    n, S = x.shape
    amax, mx = _absmax_fast(x) if finite else _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)  # keeps the discarded all-zero sub-blocks finite
    w = x * x
    wx = torch.stack((w * x, w), dim=1)  # [n, 2, S]: the weights of sumlx's and suml2's terms
    iscale = _qx_steps(nmax, x.device)[:, None] / mx[None, :]  # [T, S]
    T = iscale.shape[0]
    g = min(n, _QX_GROUP)
    vg = torch.empty((g, T, S), dtype=_F32, device=x.device)
    tg = torch.empty((g, 2, T, S), dtype=_F32, device=x.device)
    sums = torch.zeros((1, 2, T, S), dtype=_F32, device=x.device)  # (sumlx, suml2)
    for i in range(0, n, g):
        k = min(g, n - i)
        v, terms = vg[:k], tg[:k]
        _round_clamp(torch.mul(iscale, x[i:i + k, None], out=v), -nmax, nmax - 1, finite)  # finite: |v| <= ~nmax
        torch.mul(wx[i:i + k, :, None], v[:, None], out=terms)  # w*x*l, w*l
        terms[:, 1].mul_(v)  # w*l*l
        _seqsum_into(sums, terms)
    sums = sums[0]
    v, terms = vg[0], tg[0]
    sumlx, suml2 = sums[0], sums[1]
    # C keeps the first try, then takes try t when `suml2 > 0 && sumlx*sumlx > best*suml2`, best = scale*sumlx.
    # Everything but the running best is computed for all tries at once (into the buffers the loop is done with).
    cand = torch.div(sumlx, suml2, out=terms[0])
    cand[0].masked_fill_(suml2[0] == 0, 0.0)
    cbest = torch.mul(cand, sumlx, out=terms[1])
    sq = torch.mul(sumlx, sumlx, out=v).masked_fill_((suml2 > 0).logical_not_(), -math.inf)  # never taken
    best = cbest[0].clone()
    prod = torch.empty_like(best)
    upd = torch.zeros((T, S), dtype=torch.bool, device=x.device)  # row t: try t replaced the best
    for t in range(1, T):
        torch.gt(sq[t], torch.mul(best, suml2[t], out=prod), out=upd[t])
        torch.where(upd[t], cbest[t], best, out=best)
    # the try kept is the last one that replaced the best (tries go in order): one reduction after the loop
    best_t = (upd * torch.arange(T, dtype=torch.uint8, device=x.device)[:, None]).amax(0).long()[None]
    scale = cand.gather(0, best_t)[0]
    isc = iscale.gather(0, best_t)[0]
    L = _round_clamp(x * isc, -nmax, nmax - 1, finite).add_(nmax).masked_fill_(zero, 0.0)
    return scale.masked_fill_(zero, 0.0), L


def _make_q3_quants(x: torch.Tensor, nmax: int, finite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) over x [n, S] -> (scale [S], L float [n, S]).
    After the first pass only the sub-blocks that changed something go on (C stops the others)."""
    amax, mx = _absmax_fast(x) if finite else _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = _cdiv(float(-nmax), mx)
    L = _round_clamp(x * iscale, -nmax, nmax - 1, finite)
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * L)
    suml2 = _seqsum((w * L).mul_(L))
    n = x.shape[0]
    idx = None  # the active sub-blocks (None: all)
    xs, ws, wxs, Ls, slxs, sl2s = x, w, wx, L, sumlx, suml2
    for _ in range(5):
        changed = torch.zeros(xs.shape[1], dtype=torch.bool, device=x.device)
        for i in range(n):
            xi, wi, wxi, li = xs[i], ws[i], wxs[i], Ls[i]
            slx = slxs - wxi * li
            sl2 = sl2s - (wi * li) * li
            new_l = _nearest_int((xi * sl2) / slx).clamp_(-nmax, nmax - 1).to(_F32)
            slx2 = slx + wxi * new_l
            sl22 = sl2 + (wi * new_l) * new_l
            acc = (slx > 0) & (new_l != li) & (sl22 > 0) & ((slx2 * slx2) * sl2s > (slxs * slxs) * sl22)
            Ls[i] = torch.where(acc, new_l, li)
            slxs = torch.where(acc, slx2, slxs)
            sl2s = torch.where(acc, sl22, sl2s)
            changed |= acc
        # write back, then keep only the sub-blocks that changed in this pass
        if idx is None:
            L, sumlx, suml2 = Ls, slxs, sl2s
        else:
            L[:, idx], sumlx[idx], suml2[idx] = Ls, slxs, sl2s
        keep = changed.nonzero()[:, 0]
        if keep.numel() == 0:
            break
        idx = keep if idx is None else idx[keep]
        xs, ws, wxs = x[:, idx], w[:, idx], wx[:, idx]
        Ls, slxs, sl2s = L[:, idx], sumlx[idx], suml2[idx]
    L = torch.where(zero, torch.zeros_like(L), L + nmax)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def _max_pos(v: torch.Tensor) -> torch.Tensor:
    """`m = 0; if (v > m) m = v;` over the last dim (a +0 when nothing is positive)."""
    m = torch.where(torch.isnan(v), torch.zeros_like(v), v).amax(dim=-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """L [nb, 256] values 0..3 -> qs [nb, 64]: qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | ... (j = 0, 128)."""
    q = L.to(torch.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _requant(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, lo: int, hi: int,
             off: int, finite: bool) -> torch.Tensor:
    """The final pass: `if (!d) continue; l = nearest_int((x + dm)/d)` (or x/d), clamped, + off.
    x, L [S, n] (L float); d, dm [S]."""
    num = x if dm is None else x + dm[:, None]
    ok = d != 0
    dsafe = torch.where(ok, d, torch.ones_like(d))
    bound = num.abs().amax(dim=1) / dsafe.abs() if finite else None
    fast = finite and _bounded(bound)
    l = _round_clamp(num / dsafe[:, None], lo, hi, fast).add_(off)
    return torch.where(ok[:, None], l, L)


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def _q_q2_k(x: torch.Tensor) -> torch.Tensor:
    fin = _finite(x)
    xs = x.reshape(-1, 16)  # sub-blocks of 16
    xt = xs.t().contiguous()
    scales, mins, L = _make_qkx2_quants(xt, xt.abs(), 3, -0.5, 0.1, 15, True, fin)
    scales, mins, L = scales.reshape(-1, 16), mins.reshape(-1, 16), L.t().reshape(-1, 16)
    max_scale, max_min = _max_pos(scales), _max_pos(mins)
    has_s, has_m = max_scale > 0, max_min > 0
    zero = torch.zeros_like(max_scale)
    sc = torch.where(has_s[:, None], _nearest_int(_cdiv(15.0, max_scale)[:, None] * scales) & 0xFF, 0)
    d = torch.where(has_s, _cdiv(max_scale, 15.0), zero)
    sc = torch.where(has_m[:, None], (sc | (_nearest_int(_cdiv(15.0, max_min)[:, None] * mins) << 4)) & 0xFF, sc)
    dmin = torch.where(has_m, _cdiv(max_min, 15.0), zero)
    dd = _fp16_round(d)[:, None] * (sc & 0xF).to(_F32)
    dm = _fp16_round(dmin)[:, None] * (sc >> 4).to(_F32)
    L = _requant(xs, L, dd.reshape(-1), dm.reshape(-1), 0, 3, 0, fin)
    qs = _pack_2bit(L.reshape(-1, 256))
    return torch.cat((sc.to(torch.uint8), qs, _f16_bytes(d), _f16_bytes(dmin)), dim=1)


def _q_q3_k(x: torch.Tensor) -> torch.Tensor:
    fin = _finite(x)
    xs = x.reshape(-1, 16)
    xt = xs.t().contiguous()
    scales, L = _make_q3_quants(xt, 4, fin)
    scales, L = scales.reshape(-1, 16), L.t().reshape(-1, 16)
    _, max_scale = _first_absmax(scales.t())
    has = max_scale != 0
    iscale = _cdiv(-32.0, max_scale)
    l = _as_i8(_nearest_int(iscale[:, None] * scales)).clamp_(-32, 31) + 32  # [nb, 16], 0..63
    l = torch.where(has[:, None], l, 0)
    lo = (l & 0xF).to(torch.uint8)
    hi = (l >> 4).to(torch.uint8).reshape(-1, 4, 4)  # (j/4, j%4)
    packed = torch.cat((lo[:, :8] | (lo[:, 8:] << 4),
                        hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)), dim=1)
    d = torch.where(has, _cdiv(1.0, iscale), torch.zeros_like(iscale))
    sc = torch.where(has[:, None], l - 32, -32)  # what the packed bytes decode to
    dd = _fp16_round(d)[:, None] * sc.to(_F32)
    L = _requant(xs, L, dd.reshape(-1), None, -4, 3, 4, fin).reshape(-1, 256)
    high = L > 3
    hmask = _pack_bits(high.reshape(-1, 8, 32).transpose(1, 2))  # bit j//32 of hmask[j % 32]
    L = torch.where(high, L - 4, L)
    return torch.cat((hmask, _pack_2bit(L), packed, _f16_bytes(d)), dim=1)


def _qk45(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """The shared part of Q4_K / Q5_K: scales and mins of 8 sub-blocks of 32, packed; final L [nb, 256]."""
    fin = _finite(x)
    xs = x.reshape(-1, 32)
    xt = xs.t().contiguous()
    av_x = _sqrtf(_cdiv(_seqsum(xt * xt), 32.0))
    w = xt.abs().add_(av_x)
    scales, mins, L = _make_qkx2_quants(xt, w, nmax, rmin, 0.1, nstep, False, fin)
    scales, mins, L = scales.reshape(-1, 8), mins.reshape(-1, 8), L.t().reshape(-1, 32)
    max_scale, max_min = _max_pos(scales), _max_pos(mins)
    zero = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, _cdiv(63.0, max_scale), zero)
    inv_min = torch.where(max_min > 0, _cdiv(63.0, max_min), zero)
    ls = (_nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
    lm = (_nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
    packed = torch.cat((ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                        (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)), dim=1).to(torch.uint8)
    d = _cdiv(max_scale, 63.0)
    dmin = _cdiv(max_min, 63.0)
    dd = _fp16_round(d)[:, None] * ls.to(_F32)
    dm = _fp16_round(dmin)[:, None] * lm.to(_F32)
    L = _requant(xs, L, dd.reshape(-1), dm.reshape(-1), 0, nmax, 0, fin).reshape(-1, 256)
    head = torch.cat((_f16_bytes(d), _f16_bytes(dmin), packed), dim=1)
    return head, L


def _q_q4_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _qk45(x, 15, -1.0, 20)
    q = L.to(torch.uint8).reshape(-1, 4, 2, 32)
    return torch.cat((head, (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)), dim=1)


def _q_q5_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _qk45(x, 31, -0.5, 15)
    q = L.to(torch.uint8).reshape(-1, 4, 2, 32)  # (n/64, half, j)
    hb = (q >> 4).reshape(-1, 8, 32)  # bit 2*(n/64) + half of qh[j]
    qh = _pack_bits(hb.transpose(1, 2))
    ql = (q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)
    return torch.cat((head, qh, ql.reshape(-1, 128)), dim=1)


def _q_q6_k(x: torch.Tensor) -> torch.Tensor:
    fin = _finite(x)
    xs = x.reshape(-1, 16)
    xt = xs.t().contiguous()
    scales, L = _make_qx_quants(xt, 32, fin)
    scales, L = scales.reshape(-1, 16), L.t().reshape(-1, 16)
    max_abs, max_scale = _first_absmax(scales.t())
    zero_blk = max_abs < GROUP_MAX_EPS
    iscale = _cdiv(-128.0, max_scale)
    d = _cdiv(1.0, iscale)
    sc = _as_i8(torch.clamp_max(_nearest_int(iscale[:, None] * scales), 127))
    dd = _fp16_round(d)[:, None] * sc.to(_F32)
    L = _requant(xs, L, dd.reshape(-1), None, -32, 31, 32, fin).reshape(-1, 2, 4, 32)  # (half, k, l)
    q = L.to(torch.uint8)
    lo = q & 0xF
    ql = torch.cat((lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)), dim=2).reshape(-1, 128)
    hb = q >> 4
    qh = (hb[:, :, 0] | (hb[:, :, 1] << 2) | (hb[:, :, 2] << 4) | (hb[:, :, 3] << 6)).reshape(-1, 64)
    out = torch.cat((ql, qh, _u8(sc), _f16_bytes(d)), dim=1)
    return out.masked_fill_(zero_blk[:, None], 0)


def _q_f32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def _q_f16(x: torch.Tensor) -> torch.Tensor:
    return _fp32_to_fp16_bits(x).view(torch.uint8)


def _q_bf16(x: torch.Tensor) -> torch.Tensor:
    return _fp32_to_bf16_bits(x).contiguous().view(torch.uint8)


_QUANT = {
    Q.F32: _q_f32, Q.F16: _q_f16, Q.BF16: _q_bf16,
    Q.Q4_0: _q_q4_0, Q.Q4_1: _q_q4_1, Q.Q5_0: _q_q5_0, Q.Q5_1: _q_q5_1, Q.Q8_0: _q_q8_0,
    Q.Q2_K: _q_q2_k, Q.Q3_K: _q_q3_k, Q.Q4_K: _q_q4_k, Q.Q5_K: _q_q5_k, Q.Q6_K: _q_q6_k,
}
QUANT_TYPES = tuple(_QUANT)

# rows are quantized in chunks of about this many values (bounds the temporaries of the K-quant searches, and
# keeps their repeated passes in cache)
QUANT_CHUNK = 1 << 18


def quantize_problem(qtype: QType) -> str | None:
    """Why values cannot be written as `qtype` here (a line), or None: the torch codec's types always can; the
    block types only libggml writes where llama-cpp-python is installed and the type needs no importance matrix."""
    qtype = as_qtype(qtype)
    if qtype in _QUANT:
        return None
    if qtype not in GGML_QUANT_SIZES or GGML_QUANT_SIZES[qtype][0] == 1:
        return _not_blocks(qtype)
    return ggml_codec.quantize_problem(qtype)


def quantize(x: torch.Tensor, qtype: QType) -> torch.Tensor:
    """float rows [rows, n_per_row] (a 1-D tensor is one row) -> uint8 [rows, row_bytes], on x's device.

    Bytes identical to llama.cpp's `ggml_quantize_chunk` with no importance matrix (types only libggml has are
    its own output; quantize_problem says which can be written here).
    """
    qtype = as_qtype(qtype)
    why = quantize_problem(qtype)
    if why is not None:
        raise ToolkitError(f"cannot quantize to {qtype.name}: {why}")
    fn = _QUANT.get(qtype)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2:
        raise ToolkitError(f"quantize expects [rows, n_per_row], got shape {tuple(x.shape)}")
    if fn is None and x.device.type != "cpu":  # a type only libggml writes: on the CPU, moved back
        return quantize(x.detach().cpu(), qtype).to(x.device)
    rows, n = x.shape
    rb = row_bytes(qtype, n)
    out = torch.empty((rows, rb), dtype=torch.uint8, device=x.device)
    if rows == 0 or n == 0:
        return out
    x = x.detach()
    if fn is None or ggml_codec.handles(qtype, "quantize", x.device):
        return ggml_codec.quantize(x, qtype, out)
    if qtype in FLOAT_TYPES:
        return fn(x.to(_F32).contiguous()).reshape(rows, rb)
    step = max(1, QUANT_CHUNK // n)
    with torch.no_grad():
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out[r0:r1] = fn(x[r0:r1].to(_F32).contiguous()).reshape(r1 - r0, rb)
    return out


def encode(w: torch.Tensor, qtype: QType) -> torch.Tensor | np.ndarray:
    """float values (torch shape, last dim the row) -> the data `write_gguf` stores as `qtype`: the one way the
    toolkit turns values into GGUF tensor data. F32 stays float, F16 rounds to nearest even like
    ggml_fp32_to_fp16_row, everything else (BF16 and the quant types) becomes raw blocks from `quantize`."""
    qtype = as_qtype(qtype)
    if qtype == Q.F32:
        return w.float() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float32)
    if qtype == Q.F16:
        arr = w.detach().float().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float32)
        return arr.astype(np.float16)
    x = w if isinstance(w, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    return quantize(x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1), qtype)
