"""GGUF quantization in torch: quantize / dequantize every common GGML type, bit-exact with llama.cpp.

- `dequantize(raw, qtype, shape)`: uint8 blocks -> float32, identical to ggml's `to_float` (the
  `dequantize_row_*` functions of ggml-quants.c), vectorised over blocks, CPU or CUDA.
- `quantize(x, qtype)`: float rows -> uint8 [rows, row_bytes], identical to `ggml_quantize_chunk` without an
  importance matrix (the `quantize_row_*_ref` reference quantizers), K-quants' iterative searches included.
- `QuantLinear` / `QuantEmbedding`: frozen layers that keep the GGUF blocks packed and dequantize on the fly.

Exactness notes: every float32 operation is done in the order the C code does it, one rounding per C
operation (torch runs each elementwise op as its own kernel, so nothing is fused into an FMA; the
x86-64 baseline build of ggml-base has no FMA contraction either). Where C works in int (nearest_int's
magic-number trick, the (int8_t) truncations) we work in int too.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ToolkitError
from .gguf_io import QType, as_qtype, row_bytes

Q = GGMLQuantizationType
QK_K = 256

__all__ = [
    "quantize", "dequantize", "QuantLinear", "QuantEmbedding", "DEQUANT_TYPES", "QUANT_TYPES",
    "block_size", "row_bytes",
]

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def block_size(qtype: QType) -> tuple[int, int]:
    """(values per block, bytes per block)."""
    return GGML_QUANT_SIZES[as_qtype(qtype)]


# ----------------------------------------------------------------------------------------------- helpers

def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The fp16 stored at byte `off` of every block -> float32 [nb] (exact)."""
    return b[:, off:off + 2].contiguous().view(torch.float16).to(torch.float32).squeeze(-1)


def _u8_to_i(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32)


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


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for j = 0..7: the 12 packed bytes [nb, 12] -> (scales, mins) uint8 [nb, 8]."""
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


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:18]).reshape(-1, 32).to(torch.int8) - 8
    return q * d[:, None]


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:20]).reshape(-1, 32)
    return q * d[:, None] + m[:, None]


def _q5_high(qh4: torch.Tensor) -> torch.Tensor:
    """4 bytes of qh (little-endian uint32) -> uint8 [nb, 32] holding bit e of qh at 0x10."""
    sh = _lut("sh8", qh4.device, lambda: torch.arange(8, dtype=torch.uint8))
    bits = (qh4[:, :, None] >> sh) & 1  # [nb, 4, 8]: byte k bit i = element 8k + i
    return bits.reshape(-1, 32) << 4


def _dq_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = (_nibbles(b[:, 6:22]).reshape(-1, 32) | _q5_high(b[:, 2:6])).to(torch.int8) - 16
    return q * d[:, None]


def _dq_q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 8:24]).reshape(-1, 32) | _q5_high(b[:, 4:8])
    return q * d[:, None] + m[:, None]


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return b[:, 2:34].view(torch.int8) * d[:, None]


def _dq_q2_k(b: torch.Tensor) -> torch.Tensor:
    # block_q2_K: scales[16], qs[64], d, dmin
    sc = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = d[:, None] * (sc & 0xF)  # [nb, 16]
    ml = dmin[:, None] * (sc >> 4)
    qs = b[:, 16:80].reshape(-1, 2, 1, 2, 16)  # (c, -, h, l)
    sh = _lut("sh2x4", b.device, lambda: (torch.arange(4, dtype=torch.uint8) * 2).reshape(1, 1, 4, 1, 1))
    q = (qs >> sh) & 3  # [nb, c, j, h, l]; scale index 8c + 2j + h
    y = dl.reshape(-1, 2, 4, 2, 1) * q - ml.reshape(-1, 2, 4, 2, 1)
    return y.reshape(-1, QK_K)


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """The 12 packed bytes of block_q3_K -> int32 [nb, 16] signed scales (already minus 32)."""
    lo = torch.cat((s[:, 0:8] & 0xF, s[:, 0:8] >> 4), dim=-1)  # [nb, 16]
    sh = _lut("sh2x4c", s.device, lambda: (torch.arange(4, dtype=torch.uint8) * 2).reshape(1, 4, 1))
    hi = ((s[:, None, 8:12] >> sh) & 3).reshape(-1, 16)  # is = 4*(is//4) + is%4
    return (lo | (hi << 4)).to(torch.int32) - 32


def _dq_q3_k(b: torch.Tensor) -> torch.Tensor:
    # block_q3_K: hmask[32], qs[64], scales[12], d
    d = _f16(b, 108)
    dl = d[:, None] * _q3_scales(b[:, 96:108])  # [nb, 16]
    hm = b[:, 0:32].reshape(-1, 1, 1, 2, 16)  # (-, -, h, l)
    qs = b[:, 32:96].reshape(-1, 2, 1, 2, 16)  # (c, -, h, l)
    sh = _lut("sh2x4", b.device, lambda: (torch.arange(4, dtype=torch.uint8) * 2).reshape(1, 1, 4, 1, 1))
    hsh = _lut("sh8q3", b.device, lambda: torch.arange(8, dtype=torch.uint8).reshape(1, 2, 4, 1, 1))
    q = ((qs >> sh) & 3).to(torch.int8)  # [nb, c, j, h, l]
    h = ((hm >> hsh) & 1).to(torch.int8)  # bit 4c + j
    q = q - 4 + h * 4  # q - (hbit ? 0 : 4)
    y = dl.reshape(-1, 2, 4, 2, 1) * q
    return y.reshape(-1, QK_K)


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    # block_q4_K: d, dmin, scales[12], qs[128]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _scale_min_k4(b[:, 4:16])
    d1 = d[:, None] * sc  # [nb, 8]
    m1 = dmin[:, None] * m
    q = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    y = d1[:, :, None] * q - m1[:, :, None]
    return y.reshape(-1, QK_K)


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:
    # block_q5_K: d, dmin, scales[12], qh[32], qs[128]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _scale_min_k4(b[:, 4:16])
    d1 = d[:, None] * sc
    m1 = dmin[:, None] * m
    sh = _lut("sh8c", b.device, lambda: torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1))
    hi = ((b[:, None, 16:48] >> sh) & 1) << 4  # [nb, 8, 32]
    q = _nibbles(b[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32) | hi
    y = d1[:, :, None] * q - m1[:, :, None]
    return y.reshape(-1, QK_K)


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:
    # block_q6_K: ql[128], qh[64], scales[16] (int8), d
    d = _f16(b, 208)
    sc = b[:, 192:208].view(torch.int8)
    ds = (d[:, None] * sc).reshape(-1, 2, 4, 2, 1)  # (c, quarter, l//16)
    ql = _nibbles(b[:, 0:128].reshape(-1, 2, 64)).reshape(-1, 2, 4, 32)  # (c, 2*nibble + k, l)
    sh = _lut("sh2x4q6", b.device, lambda: (torch.arange(4, dtype=torch.uint8) * 2).reshape(1, 1, 4, 1))
    qh = (b[:, 128:192].reshape(-1, 2, 1, 32) >> sh) & 3
    q = (ql | (qh << 4)).to(torch.int8) - 32
    y = ds * q.reshape(-1, 2, 4, 2, 16)
    return y.reshape(-1, QK_K)


def _kvalues(device: torch.device) -> torch.Tensor:
    return _lut("iq4nl", device, lambda: torch.tensor(KVALUES_IQ4NL, dtype=torch.float32))


def _dq_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    idx = _nibbles(b[:, 2:18]).reshape(-1, 32).long()
    return d[:, None] * _kvalues(b.device)[idx]


def _dq_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    # block_iq4_xs: d, scales_h (uint16), scales_l[4], qs[128]
    d = _f16(b, 0)
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
DEQUANT_TYPES = tuple(_DEQUANT)


def _as_blocks(raw: torch.Tensor, qtype: Q, n: int) -> torch.Tensor:
    bv, bb = GGML_QUANT_SIZES[qtype]
    if n % bv:
        raise ToolkitError(f"{n} values are not a whole number of {qtype.name} blocks of {bv}")
    if raw.dtype != torch.uint8:
        if qtype in (Q.F32, Q.F16, Q.BF16) and raw.is_floating_point():
            raw = raw.contiguous().reshape(-1).view(torch.uint8)
        else:
            raise ToolkitError(f"dequantize expects uint8 blocks, got {raw.dtype}")
    nb = n // bv
    if raw.numel() != nb * bb:
        raise ToolkitError(f"{qtype.name}: {raw.numel()} bytes given, {nb * bb} expected for {n} values")
    if not raw.is_contiguous():
        raw = raw.contiguous()
    return raw.reshape(nb, bb)


def dequantize(raw: torch.Tensor, qtype: QType, shape: Sequence[int] | int) -> torch.Tensor:
    """uint8 GGUF blocks ([rows, row_bytes] or flat) -> float32 tensor of `shape`, on raw's device.

    Identical to ggml's `to_float` for the type (dequantize_row_* in ggml-quants.c).
    """
    qtype = as_qtype(qtype)
    fn = _DEQUANT.get(qtype)
    if fn is None:
        raise ToolkitError(f"dequantizing {qtype.name} is not supported")
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=torch.float32, device=raw.device)
    return fn(_as_blocks(raw, qtype, n)).reshape(shape)


def _dequantize_rows(raw: torch.Tensor, qtype: Q, cols: int) -> torch.Tensor:
    """uint8 [rows, row_bytes] -> float32 [rows, cols]."""
    return _DEQUANT[qtype](_as_blocks(raw, qtype, raw.shape[0] * cols)).reshape(raw.shape[0], cols)


# --------------------------------------------------------------------------------------------- quantize

def _fp32_to_fp16_bits(x: torch.Tensor) -> torch.Tensor:
    """ggml's GGML_FP32_TO_FP16 (round to nearest even; NaN -> 0x7E00 | sign) -> int16 bits."""
    h = x.to(torch.float16).view(torch.int16)
    nan = torch.isnan(x)
    if bool(nan.any()):
        sign = (x.view(torch.int32) >> 16) & -32768  # 0x8000 as int16-compatible
        h = torch.where(nan, (sign | 0x7E00).to(torch.int16), h)
    return h


def _fp32_to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN made quiet (bits | 64) -> int16 bits."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    r = torch.where(nan, (u >> 16) | 64, r) & 0xFFFF
    return r.to(torch.int32).to(torch.int16)  # wraps to the same 16 bits


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [nb] -> uint8 [nb, 2] (fp16, little-endian) the way ggml stores block scales."""
    return _fp32_to_fp16_bits(x).contiguous().view(torch.uint8).reshape(-1, 2)


def _trunc_i8(v: torch.Tensor) -> torch.Tensor:
    """C's (int8_t)(float): truncate toward zero (values in range here), as int32."""
    return v.trunc().to(torch.int32)


def _q_q4_0(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, 32)
    ax = x.abs()
    # first index reaching the absolute max (C keeps the first on ties: `amax < fabsf(v)`)
    i = ax.argmax(dim=1, keepdim=True)
    mx = x.gather(1, i).squeeze(1)
    d = mx / -8
    idv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    xi = _trunc_i8(x * idv[:, None] + 8.5).clamp_max(15).to(torch.uint8)
    qs = xi[:, :16] | (xi[:, 16:] << 4)
    return torch.cat((_f16_bytes(d), qs), dim=1)


def _q_q4_1(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, 32)
    mn = x.amin(dim=1)
    mx = x.amax(dim=1)
    d = (mx - mn) / 15
    idv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    xi = _trunc_i8((x - mn[:, None]) * idv[:, None] + 0.5).clamp_max(15).to(torch.uint8)
    qs = xi[:, :16] | (xi[:, 16:] << 4)
    return torch.cat((_f16_bytes(d), _f16_bytes(mn), qs), dim=1)


def _pack_q5_high(xi: torch.Tensor) -> torch.Tensor:
    """uint8 [nb, 32] 5-bit values -> qh uint8 [nb, 4] (bit e = bit 4 of element e, little-endian)."""
    bits = ((xi >> 4) & 1).reshape(-1, 4, 8)
    w = _lut("pow2_8", xi.device, lambda: (1 << torch.arange(8, dtype=torch.int32)))
    return (bits.to(torch.int32) * w).sum(-1).to(torch.uint8)


def _q_q5_0(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, 32)
    i = x.abs().argmax(dim=1, keepdim=True)
    mx = x.gather(1, i).squeeze(1)
    d = mx / -16
    idv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    xi = _trunc_i8(x * idv[:, None] + 16.5).clamp_max(31).to(torch.uint8)
    qs = (xi[:, :16] & 0xF) | ((xi[:, 16:] & 0xF) << 4)
    return torch.cat((_f16_bytes(d), _pack_q5_high(xi), qs), dim=1)


def _q_q5_1(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, 32)
    mn = x.amin(dim=1)
    mx = x.amax(dim=1)
    d = (mx - mn) / 31
    idv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    xi = _trunc_i8((x - mn[:, None]) * idv[:, None] + 0.5).to(torch.uint8)
    qs = (xi[:, :16] & 0xF) | ((xi[:, 16:] & 0xF) << 4)
    return torch.cat((_f16_bytes(d), _f16_bytes(mn), _pack_q5_high(xi), qs), dim=1)


def _q_q8_0(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, 32)
    amax = x.abs().amax(dim=1)
    d = amax / 127
    idv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = _roundf(x * idv[:, None]).to(torch.int8)
    return torch.cat((_f16_bytes(d), q.view(torch.uint8)), dim=1)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero (torch.round is half to even)."""
    a = torch.floor(v.abs() + 0.5)
    return torch.where(v < 0, -a, a)


def _q_f32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def _q_f16(x: torch.Tensor) -> torch.Tensor:
    return _fp32_to_fp16_bits(x).view(torch.uint8)


def _q_bf16(x: torch.Tensor) -> torch.Tensor:
    return _fp32_to_bf16_bits(x).contiguous().view(torch.uint8)


_QUANT = {
    Q.F32: _q_f32, Q.F16: _q_f16, Q.BF16: _q_bf16,
    Q.Q4_0: _q_q4_0, Q.Q4_1: _q_q4_1, Q.Q5_0: _q_q5_0, Q.Q5_1: _q_q5_1, Q.Q8_0: _q_q8_0,
}
QUANT_TYPES = tuple(_QUANT)


def quantize(x: torch.Tensor, qtype: QType) -> torch.Tensor:
    """float rows [rows, n_per_row] (a 1-D tensor is one row) -> uint8 [rows, row_bytes], on x's device.

    Bytes identical to llama.cpp's `ggml_quantize_chunk` with no importance matrix.
    """
    qtype = as_qtype(qtype)
    fn = _QUANT.get(qtype)
    if fn is None:
        raise ToolkitError(f"quantizing to {qtype.name} is not supported")
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2:
        raise ToolkitError(f"quantize expects [rows, n_per_row], got shape {tuple(x.shape)}")
    rows, n = x.shape
    rb = row_bytes(qtype, n)
    if rows == 0:
        return torch.empty((0, rb), dtype=torch.uint8, device=x.device)
    x = x.detach().to(torch.float32).contiguous()
    return fn(x).reshape(rows, rb)


# ------------------------------------------------------------------------------------------------ layers

CHUNK_ELEMENTS = 1 << 24  # at most this many dequantized values alive at once per layer (64 MiB fp32)


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized chunk by chunk; backward gives grad x only (W is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        layer: QuantLinear = ctx.layer
        return layer._matmul_t(gy), None


class QuantLinear(torch.nn.Module):
    """A frozen linear layer over packed GGUF blocks (`qweight`: uint8 [out_features, row_bytes]).

    `forward(x)` dequantizes chunks of output rows on the fly (peak extra memory: CHUNK_ELEMENTS values) and
    computes in x's dtype; gradients flow to x, never to the weight.
    """

    def __init__(self, raw: torch.Tensor, qtype: QType, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.qtype = as_qtype(qtype)
        if self.qtype not in _DEQUANT:
            raise ToolkitError(f"no dequantizer for {self.qtype.name}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        rb = row_bytes(self.qtype, self.in_features)
        if raw.dtype != torch.uint8:
            raw = raw.contiguous().reshape(-1).view(torch.uint8)
        if raw.numel() != rb * self.out_features:
            raise ToolkitError(f"{self.qtype.name} weight [{out_features}, {in_features}] needs "
                               f"{rb * self.out_features} bytes, got {raw.numel()}")
        self.register_buffer("qweight", raw.reshape(self.out_features, rb))
        if bias is not None:
            self.register_buffer("bias", bias.detach())
        else:
            self.bias = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, qtype: QType, bias: torch.Tensor | None = None) -> "QuantLinear":
        out_f, in_f = weight.shape
        return cls(quantize(weight, qtype), qtype, in_f, out_f, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] (float32). A fresh tensor each time: prefer weight_float()."""
        return self.weight_float()

    def weight_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = _dequantize_rows(self.qweight, self.qtype, self.in_features)
        return w if dtype == torch.float32 else w.to(dtype)

    def _chunk(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        w = _dequantize_rows(self.qweight[r0:r1], self.qtype, self.in_features)
        return w if dtype == torch.float32 else w.to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        chunks = _row_chunks(self.out_features, self.in_features)
        if len(chunks) == 1:
            return torch.matmul(x, self._chunk(0, self.out_features, x.dtype).t())
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for r0, r1 in chunks:
            out[..., r0:r1] = torch.matmul(x, self._chunk(r0, r1, x.dtype).t())
        return out

    def _matmul_t(self, gy: torch.Tensor) -> torch.Tensor:
        gx = None
        for r0, r1 in _row_chunks(self.out_features, self.in_features):
            part = torch.matmul(gy[..., r0:r1], self._chunk(r0, r1, gy.dtype))
            gx = part if gx is None else gx.add_(part)
        return gx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            y = _QuantMatmul.apply(x, self)
        else:
            y = self._matmul(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


class QuantEmbedding(torch.nn.Module):
    """A frozen embedding table over packed GGUF blocks; forward dequantizes only the gathered rows."""

    def __init__(self, raw: torch.Tensor, qtype: QType, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.qtype = as_qtype(qtype)
        if self.qtype not in _DEQUANT:
            raise ToolkitError(f"no dequantizer for {self.qtype.name}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        rb = row_bytes(self.qtype, self.embedding_dim)
        if raw.dtype != torch.uint8:
            raw = raw.contiguous().reshape(-1).view(torch.uint8)
        if raw.numel() != rb * self.num_embeddings:
            raise ToolkitError(f"{self.qtype.name} embedding [{num_embeddings}, {embedding_dim}] needs "
                               f"{rb * self.num_embeddings} bytes, got {raw.numel()}")
        self.register_buffer("qweight", raw.reshape(self.num_embeddings, rb))

    @classmethod
    def from_float(cls, weight: torch.Tensor, qtype: QType) -> "QuantEmbedding":
        n, dim = weight.shape
        return cls(quantize(weight, qtype), qtype, n, dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_float()

    def weight_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = _dequantize_rows(self.qweight, self.qtype, self.embedding_dim)
        return w if dtype == torch.float32 else w.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.index_select(0, ids.reshape(-1).to(self.qweight.device))
        return _dequantize_rows(rows, self.qtype, self.embedding_dim).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"
