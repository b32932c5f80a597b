"""CPU decode kernels for packed GGUF weights.

A decode step multiplies one activation row by every weight: it is bound by the bytes of weight read, not by
arithmetic. A float32 copy of a 4-bit weight reads 8x the bytes, so on CPU the quantized linears use torch's
weight-only kernels instead:

* Q4_0, Q4_1 and Q4_K are exactly 4-bit levels with one scale and one offset per group of 32 values, which is
  what `torch._weight_int4pack_mm_for_cpu` computes: w = (q - 8) * scale + zero. The levels are repacked
  unchanged; only the scale and zero are rounded to bf16, and the activations to bf16 (llama.cpp rounds them to
  8 bits for its own dot products), so results are close to, not bit-equal with, the float path.
* every other type keeps a bf16 copy (half the bytes of float32; on AVX2 torch's int8 kernel wins nothing
  once the activations are bf16 anyway, and per-row int8 could not hold per-block scales exactly). Where the CPU
  has no bf16 dot products (AVX2), torch's bf16 GEMM is emulated: fine for a row or two (bound by the bytes
  read) but far below the float32 rate past a few rows, so larger inputs multiply the blocks in float32
  instead, dequantized a cache-sized slice at a time (exact; the form's `blocks`), through an opaque op in
  compiled steps so that the row count still compiles no second graph.

Where llama-cpp-python's libggml loads, the CPU default is neither: the "ggml" form keeps the blocks as they are
and multiplies them with libggml's own mul_mat (toolkit.ggml_matmul; llama.cpp's kernels, 8-bit activations),
through an opaque op (toolkit::ggml_linear) in compiled steps: for few rows, and for any number of rows where
llamafile's tiled GEMM takes the type (GGML_TILED); other prefill-sized inputs dequantize blocks. The forms
below are the "packed" mode's.

These kernels pay off for a few activation rows (decode, small batches) everywhere, and for prefill-sized inputs
too where the CPU has bf16 dot products; past max_rows() QuantLinear dequantizes blocks (exact float32).

Where the CPU has bf16 dot products (AVX512-BF16, AMX) a bf16 copy multiplies many rows at about twice the
float32 rate, while the int4 kernel stays at the float32 rate whatever the row count: the "bf16" weights mode
keeps such a copy for inputs of bf16_rows() rows or more (prefill, big batches), at 2 bytes a value. On such a CPU
the copies are kept in oneDNN's own blocked layout (prepacked once), so a GEMM does not repack its weight on every
call: the repacking of a cold weight was what made a plain bf16 copy only tie the int4 kernel at 16 rows. Inductor
cannot take a prepacked weight as a graph input, so a compiled step multiplies by one through an opaque op
(toolkit::prepacked_linear) that finds it by a number.
"""
from __future__ import annotations

import dataclasses
import itertools
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from .ggml_matmul import GgmlWeight
from .quants import dequantize_rows, f16_at, scale_min_k4

# Above this many activation rows the float matmul on dequantized blocks is faster than the int4 kernel
# (measured on AVX2 with 2 threads: int4 wins below ~16 rows, ties at 16-32, loses 2.5x at 512).
MAX_ROWS = 32
# The same on a CPU with bf16 dot products (AVX512-BF16), where the int4 kernel keeps its rate from 16 rows to
# 1024 and dequantizing blocks only catches up near 1024 (README, "Prefill through the kernels").
BF16_CPU_MAX_ROWS = 512
# From this many rows the bf16 copy beats the int4 kernel on a CPU with bf16 dot products, every layer's weight cold
# in cache as in a real step: a plain copy from ~24 rows, a prepacked one from ~8.
BF16_ROWS = 24
PREPACKED_BF16_ROWS = 8
# Without bf16 dot products, inputs of more rows than this leave a bf16 copy for its blocks, multiplied a slice at a
# time (QuantLinear.matmul_sliced; crossover measured on AVX2, a Q8_0 49152x576 head cold in cache: 2-4 rows).
EMULATED_BF16_MAX_ROWS = 3
# libggml's mul_mat past this many rows is a dot product per (weight row, input row) for most types, which the float
# GEMM on dequantized blocks beats (measured on AVX2, 2 threads, Q4_1: 0.46-0.66x at 256 rows, about even at 16-64);
# the types llamafile's tiled GEMM takes on x86 (GGML_TILED) stay on libggml at any row count (1.05-1.4x at 256).
GGML_MAX_ROWS = 32
GGML_TILED = (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL)
GROUP = 32
INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)
_int4_mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_int4_pack = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)


@dataclass
class PackedWeight:
    """One linear's weight in kernel form: int4 (packed levels + [in/32, out, 2] scale/zero), a bf16 copy, or the
    GGUF blocks themselves multiplied by libggml (ggml)."""
    kind: str  # "int4" | "bf16" | "ggml"
    weight: torch.Tensor
    scale_zero: torch.Tensor | None = None
    out_features: int = 0
    number: int = 0  # how compiled steps name a form they call through an opaque op (registered), 0: traced
    blocks: Callable[[torch.Tensor], torch.Tensor] | None = None  # x -> x @ W.T from the blocks (emulated bf16)
    ggml: GgmlWeight | None = None  # kind "ggml": libggml's product over the blocks in `weight`

    @property
    def prepacked(self) -> bool:
        return self.weight.is_mkldnn


def int4_groups(qweight: torch.Tensor, qtype: Q, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 blocks [out, row_bytes] -> (levels int32 [out, in] in 0..15, scale [out, in/32], zero [out, in/32])
    such that w = (levels - 8) * scale + zero, the dequantized value up to float32 rounding."""
    out_f = qweight.shape[0]
    bv, bb = GGML_QUANT_SIZES[qtype]
    b = qweight.reshape(-1, bb)
    if qtype == Q.Q4_K:
        sc, mn = scale_min_k4(b[:, 4:16])
        scale = f16_at(b, 0)[:, None] * sc  # [nb, 8]: one group per 32 values
        minus = f16_at(b, 2)[:, None] * mn
        qs = b[:, 16:144].reshape(-1, 4, 32)
        levels = torch.stack((qs & 0xF, qs >> 4), dim=2)  # [nb, 4, 2, 32]: sub-blocks 2c (low), 2c+1 (high)
        zero = 8 * scale - minus
    else:
        qs = b[:, bb - 16:]  # both keep 16 bytes of nibbles last: values 0..15 low, 16..31 high
        levels = torch.stack((qs & 0xF, qs >> 4), dim=1)  # [nb, 2, 16]
        scale = f16_at(b, 0)[:, None]
        zero = torch.zeros_like(scale) if qtype == Q.Q4_0 else f16_at(b, 2)[:, None] + 8 * scale
    groups = in_features // GROUP
    return (levels.reshape(out_f, in_features).to(torch.int32), scale.reshape(out_f, groups),
            zero.reshape(out_f, groups))


def kind(qtype: Q, in_features: int) -> str:
    """The kernel form pack() gives a weight of this type and width: "int4" or "bf16"."""
    return "int4" if qtype in INT4_TYPES and _int4_mm is not None and in_features % GROUP == 0 else "bf16"


def pack(qweight: torch.Tensor, qtype: Q, in_features: int) -> PackedWeight:
    """The kernel form of a quantized weight (CPU)."""
    out_f = qweight.shape[0]
    if kind(qtype, in_features) == "int4":
        levels, scale, zero = int4_groups(qweight, qtype, in_features)
        packed = _int4_pack(levels, 1)
        scale_zero = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()  # [in/32, out, 2]
        return PackedWeight("int4", packed, scale_zero, out_f)
    return bf16_copy(qweight, qtype, in_features)


def bf16_copy(qweight: torch.Tensor, qtype: Q, in_features: int) -> PackedWeight:
    """The weight as a bf16 copy (the "bf16" weights mode's form for many rows)."""
    return bf16_form(dequantize_rows(qweight, qtype, in_features).to(torch.bfloat16))


def bf16_form(w: torch.Tensor) -> PackedWeight:
    """A bf16 weight [out, in] as a kernel form: prepacked for oneDNN where that is on, else as it is."""
    if not (prepacking() and w.device.type == "cpu"):
        return PackedWeight("bf16", w, None, w.shape[0])
    return _register(PackedWeight("bf16", torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PREPACK_ROWS_HINT),
                                  None, w.shape[0]))


def ggml_form(qweight: torch.Tensor, qtype: Q, in_features: int) -> PackedWeight:
    """The blocks as they are, multiplied by libggml's mul_mat (any row count; compiled steps call it through an
    opaque op, as it runs outside torch)."""
    gw = GgmlWeight(qweight, qtype, in_features, qweight.shape[0])
    return _register(PackedWeight("ggml", gw.raw, None, gw.out_features, ggml=gw))


def with_blocks(pw: PackedWeight, blocks: Callable[[torch.Tensor], torch.Tensor]) -> PackedWeight:
    """pw, given the exact float32 product of the blocks it was made from (x -> x @ W.T) for many-row inputs, where
    its bf16 copy would run an emulated GEMM (no bf16 dot products here)."""
    if pw.kind == "bf16" and not _NATIVE_BF16 and not pw.prepacked:
        pw.blocks = blocks
        _register(pw)
    return pw


def copy_only(pw: PackedWeight) -> PackedWeight:
    """The form's bf16 copy without the blocks (the "bf16" weights mode asks for the copy whatever the rows)."""
    return pw if pw.blocks is None else dataclasses.replace(pw, number=0, blocks=None)


def _register(pw: PackedWeight) -> PackedWeight:
    pw.number = next(_numbers)
    _registered[pw.number] = pw
    return pw


_numbers = itertools.count(1)
_registered: weakref.WeakValueDictionary[int, PackedWeight] = weakref.WeakValueDictionary()  # number -> form


@torch.library.custom_op("toolkit::prepacked_linear", mutates_args=())
def _prepacked_linear(x: torch.Tensor, number: int, out_features: int) -> torch.Tensor:
    """x [M, in] bf16 @ prepacked weight `number`.T -> [M, out] bf16 (one opaque call in a compiled graph)."""
    return torch.ops.mkldnn._linear_pointwise(x, _registered[number].weight, None, "none", [], "")


@_prepacked_linear.register_fake
def _(x: torch.Tensor, number: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("toolkit::copy_or_blocks", mutates_args=())
def _copy_or_blocks_op(x: torch.Tensor, number: int, out_features: int) -> torch.Tensor:
    """x [M, in] @ form `number`.T -> [M, out] in x's dtype, by the rows (opaque in a compiled graph)."""
    return _copy_or_blocks(x, _registered[number])


@_copy_or_blocks_op.register_fake
def _(x: torch.Tensor, number: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("toolkit::ggml_linear", mutates_args=())
def _ggml_linear_op(x: torch.Tensor, number: int, out_features: int) -> torch.Tensor:
    """x [M, in] float32 @ form `number`.T -> [M, out] float32 through libggml (opaque in a compiled graph)."""
    return _registered[number].ggml(x)


@_ggml_linear_op.register_fake
def _(x: torch.Tensor, number: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


def _copy_or_blocks(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    if x.shape[0] > EMULATED_BF16_MAX_ROWS:
        return pw.blocks(x).to(x.dtype)
    return F.linear(x.to(torch.bfloat16), pw.weight).to(x.dtype)


def dense(pw: PackedWeight) -> torch.Tensor:
    """The kernel form's bf16 weight [out, in] as a plain tensor (a prepacked one is unpacked)."""
    return pw.weight.to_dense() if pw.weight.is_mkldnn else pw.weight


PREPACK_ROWS_HINT = 16  # the row count oneDNN picks its blocked layout for (decode batches)
_prepack = {"on": None}  # None: decided on first use (bf16 dot products and oneDNN present)


def prepacking() -> bool:
    """Whether bf16 copies are made prepacked (oneDNN's layout): on a CPU with bf16 dot products, until
    set_prepacking(False)."""
    if _prepack["on"] is None:
        _prepack["on"] = _NATIVE_BF16 and torch.backends.mkldnn.is_available() and \
            hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    return bool(_prepack["on"])


def set_prepacking(on: bool) -> None:
    """Prepack bf16 copies made from now on (True: only where the CPU supports it), or never (False). Forms
    already made stay as they are (linear_group.drop_weight_forms forgets them)."""
    _prepack["on"] = None if on else False


def bf16_rows() -> int:
    """Rows from which the "bf16" weights mode multiplies through its bf16 copy."""
    return PREPACKED_BF16_ROWS if prepacking() else BF16_ROWS


def max_rows() -> int:
    """Inputs of up to this many rows go through the kernel forms (use_kernels); more dequantize blocks."""
    return BF16_CPU_MAX_ROWS if _NATIVE_BF16 else MAX_ROWS


def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX; read from Linux's cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_NATIVE_BF16 = native_bf16()  # read once: kernel_form asks for every linear of every step, compiled ones too


def matmul(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """x [..., in] (any float dtype) -> [..., out] in x's dtype, through the kernel form."""
    if pw.ggml is not None:  # float32 in and out (a decode step is bound by per-op overhead: no needless casts)
        x2 = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            y = torch.ops.toolkit.ggml_linear(x2.float(), pw.number, pw.out_features)
        else:
            y = pw.ggml(x2)
        y = y if x.dtype == torch.float32 else y.to(x.dtype)
        return y.view(*x.shape[:-1], pw.out_features)
    if pw.blocks is not None:
        x2 = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            y = torch.ops.toolkit.copy_or_blocks(x2, pw.number, pw.out_features)
        else:
            y = _copy_or_blocks(x2, pw)
        return y.reshape(*x.shape[:-1], pw.out_features)
    xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # [M, in]
    if pw.kind == "int4":
        y = _int4_mm(xb, pw.weight, GROUP, pw.scale_zero)
    elif pw.prepacked and torch.compiler.is_compiling():
        y = torch.ops.toolkit.prepacked_linear(xb, pw.number, pw.out_features)
    elif pw.prepacked:
        y = torch.ops.mkldnn._linear_pointwise(xb, pw.weight, None, "none", [], "")
    else:
        y = F.linear(xb, pw.weight)
    return y.to(x.dtype).reshape(*x.shape[:-1], pw.out_features)
