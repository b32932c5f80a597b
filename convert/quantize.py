"""`toolkit quantize in.gguf out.gguf TYPE [--pure]`: llama.cpp's `llama-quantize`, in torch.

The per-tensor type choices follow llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the mixes
we can produce (Q4_0 .. Q8_0, Q2_K .. Q6_K and their _S/_M/_L mixes, F16, BF16, F32; with llama-cpp-python
installed also IQ4_NL, IQ4_XS, IQ3_S and IQ3_M, the i-quants that need no importance matrix): attn_v / ffn_down get
more bits in some layers, output.weight (or a tied token_embd) gets Q6_K, rows not divisible by the block
fall back to a 32-wide type, 1-D tensors and norms stay as they are. Non-F32 sources are dequantized first,
as llama.cpp does; a tensor already in its target type is copied byte for byte. With `--pure` every 2-D
weight gets TYPE (still with the shape fallback), and each tensor is byte-identical to llama.cpp's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as FT

from toolkit.config import arg, parse_config
from toolkit.errors import ToolkitError
from toolkit.gguf_io import FLOAT_TYPES, GGUFFile, TensorInfo, TensorSpec, copy_metadata, open_gguf, write_gguf
from toolkit.quants import dequant_problem, encode, quantize_problem, tensor_float

# llama.cpp's type names (llama-quantize's list) -> (file type, default tensor type)
FTYPES: dict[str, tuple[FT, Q]] = {
    "Q4_0": (FT.MOSTLY_Q4_0, Q.Q4_0), "Q4_1": (FT.MOSTLY_Q4_1, Q.Q4_1),
    "Q5_0": (FT.MOSTLY_Q5_0, Q.Q5_0), "Q5_1": (FT.MOSTLY_Q5_1, Q.Q5_1), "Q8_0": (FT.MOSTLY_Q8_0, Q.Q8_0),
    "Q2_K": (FT.MOSTLY_Q2_K, Q.Q2_K),
    "Q3_K_S": (FT.MOSTLY_Q3_K_S, Q.Q3_K), "Q3_K_M": (FT.MOSTLY_Q3_K_M, Q.Q3_K), "Q3_K_L": (FT.MOSTLY_Q3_K_L, Q.Q3_K),
    "Q4_K_S": (FT.MOSTLY_Q4_K_S, Q.Q4_K), "Q4_K_M": (FT.MOSTLY_Q4_K_M, Q.Q4_K),
    "Q5_K_S": (FT.MOSTLY_Q5_K_S, Q.Q5_K), "Q5_K_M": (FT.MOSTLY_Q5_K_M, Q.Q5_K),
    "Q6_K": (FT.MOSTLY_Q6_K, Q.Q6_K),
    "F16": (FT.MOSTLY_F16, Q.F16), "BF16": (FT.MOSTLY_BF16, Q.BF16), "F32": (FT.ALL_F32, Q.F32),
    # written by llama.cpp's libggml (llama-cpp-python): the i-quants that need no importance matrix
    "IQ4_NL": (FT.MOSTLY_IQ4_NL, Q.IQ4_NL), "IQ4_XS": (FT.MOSTLY_IQ4_XS, Q.IQ4_XS),
    "IQ3_S": (FT.MOSTLY_IQ3_S, Q.IQ3_S), "IQ3_M": (FT.MOSTLY_IQ3_M, Q.IQ3_S),
}
_IQ4 = (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS)
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize accepts them
QNT_VERSION = 2  # GGML_QNT_VERSION, written as general.quantization_version


def parse_ftype(name: str) -> tuple[FT, Q]:
    key = name.upper()
    key = ALIASES.get(key, key)
    if key not in FTYPES:
        raise ToolkitError(f"unknown quantization type '{name}' (choose from {', '.join(FTYPES)})")
    return FTYPES[key]


# ------------------------------------------------------------------------------------------ categories

def category(name: str) -> str:
    """tensor_get_category: broad roles by name, not per-arch names."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


_NO_QUANT = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
             "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
             "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", ".rel_pos", ".patch_embd",
             "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
             "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
             "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
             "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight")


def allows_quantization(name: str, ndim: int) -> bool:
    """tensor_allows_quantization: 2-D/3-D weights, not norms, gates of experts, position embeddings..."""
    if ndim < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(k in name for k in _NO_QUANT)


def fallback(ncols: int, qtype: Q) -> Q:
    """tensor_type_fallback: rows that do not split into the type's blocks get a 32-wide type (or F16)."""
    from gguf import GGML_QUANT_SIZES

    if ncols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    alt = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
           Q.IQ4_XS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL}.get(qtype)
    if alt is None:
        raise ToolkitError(f"no tensor type fallback is defined for type {qtype.name} (row of {ncols})")
    return alt if ncols % GGML_QUANT_SIZES[alt][0] == 0 else Q.F16


# ------------------------------------------------------------------------------------------ the mixes

@dataclass
class MixState:
    """quantize_state_impl: model facts plus the running layer counters the mixes depend on."""

    arch: str
    n_layer: int
    n_gqa: int
    n_expert: int
    is_70b: bool
    tied: bool
    n_attention_wv: int
    counters: dict[str, int] = field(default_factory=lambda: {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0})

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "MixState":
        def hp(key: str, default: int = 0) -> int:
            v = g.arch_get(key, default)
            return int(max(v) if isinstance(v, list) else v)

        names = list(g.tensors)
        n_layer, n_head, n_kv = hp("block_count"), hp("attention.head_count"), hp("attention.head_count_kv")
        n_kv = n_kv or n_head
        return cls(
            arch=g.arch, n_layer=n_layer, n_gqa=n_head // n_kv if n_kv else 0, n_expert=hp("expert_count"),
            is_70b=g.arch == "llama" and n_layer == 80 and n_head != n_kv,
            tied="output.weight" not in g.tensors,
            n_attention_wv=sum(category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n in names),
        )

    def layer(self, cat: str, name: str) -> int:
        if self.n_expert > 1:  # experts are not consecutive: parse the layer from the name
            m = re.match(r"blk\.(\d+)\.", name)
            if not m:
                raise ToolkitError(f"failed to determine layer for tensor {name}")
            return int(m.group(1))
        return self.counters[cat]


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(qs: MixState, qtype: Q, name: str, ncols: int, ndim3: int, ftype: FT) -> Q:
    """llama_tensor_get_type_impl for the K-quant and legacy mixes and IQ4_NL/IQ4_XS/IQ3_S/IQ3_M (no imatrix)."""
    from gguf import GGML_QUANT_SIZES

    cat = category(name)
    falcon = qs.arch == "falcon"
    if cat == "output" or (qs.tied and cat == "token_embd"):
        if falcon or ncols % GGML_QUANT_SIZES[qtype][0]:
            return Q.Q8_0
        return qtype if qtype == Q.Q8_0 else Q.Q6_K
    if cat == "token_embd":
        return qtype
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        i, n = qs.counters["attn_v"], qs.n_attention_wv
        if ftype == FT.MOSTLY_Q2_K:
            qtype = Q.Q4_K if qs.n_gqa >= 4 else Q.Q3_K
        elif ftype == FT.MOSTLY_IQ3_S and qs.n_gqa >= 4:
            qtype = Q.Q4_K
        elif ftype == FT.MOSTLY_IQ3_M:
            qtype = Q.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_M:
            qtype = Q.Q5_K if i < 2 else Q.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_L:
            qtype = Q.Q5_K
        elif ftype in _IQ4 and qs.n_gqa >= 4:
            qtype = Q.Q5_K
        elif ftype in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(i, n):
            qtype = Q.Q6_K
        elif ftype == FT.MOSTLY_Q4_K_S and i < 4:
            qtype = Q.Q5_K
        if qs.is_70b and qtype in (Q.Q3_K, Q.Q4_K):
            qtype = Q.Q5_K
        if qs.n_expert == 8:
            qtype = Q.Q8_0
        qs.counters["attn_v"] += 1
        # llama.cpp's category chain: attn_qkv lands in the attn_v branch, the qkv-specific one is unreachable
        return qtype
    if cat == "attn_k":
        return Q.Q8_0 if qs.n_expert == 8 else qtype
    if cat == "ffn_down":
        i, n = qs.layer("ffn_down", name), qs.n_layer
        if ftype == FT.MOSTLY_Q2_K:
            qtype = Q.Q3_K
        elif ftype == FT.MOSTLY_Q3_K_M:
            qtype = Q.Q5_K if i < n // 16 else Q.Q4_K if (not falcon or _use_more_bits(i, n)) else Q.Q3_K
        elif ftype == FT.MOSTLY_IQ3_M and (i < n // 8 or (qs.n_expert == 8 and _use_more_bits(i, n))):
            qtype = Q.Q4_K
        elif ftype == FT.MOSTLY_Q3_K_L:
            qtype = Q.Q4_K if falcon else Q.Q5_K
        elif ftype == FT.MOSTLY_Q4_K_M:
            if falcon:
                qtype = Q.Q6_K if i < n // 16 else Q.Q5_K if _use_more_bits(i, n) else Q.Q4_K
            elif _use_more_bits(i, n):
                qtype = Q.Q6_K
        elif ftype in _IQ4 and i < n // 8:  # (without an importance matrix)
            qtype = Q.Q5_K
        elif ftype == FT.MOSTLY_Q5_K_M and _use_more_bits(i, n):
            qtype = Q.Q6_K
        elif ftype == FT.MOSTLY_Q4_K_S and not falcon and i < n // 8:
            qtype = Q.Q5_K
        qs.counters["ffn_down"] += 1
        return qtype
    if cat == "attn_output":
        if not falcon:
            if qs.n_expert == 8:
                if ftype in (FT.MOSTLY_Q2_K, FT.MOSTLY_Q3_K_S, FT.MOSTLY_Q3_K_M, FT.MOSTLY_Q4_K_S, FT.MOSTLY_Q4_K_M,
                             FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS, FT.MOSTLY_IQ3_S, FT.MOSTLY_IQ3_M):
                    qtype = Q.Q5_K
            else:
                qtype = {FT.MOSTLY_Q2_K: Q.Q3_K, FT.MOSTLY_Q3_K_M: Q.Q4_K, FT.MOSTLY_Q3_K_L: Q.Q5_K,
                         FT.MOSTLY_IQ3_M: Q.Q4_K}.get(ftype, qtype)
        elif ftype == FT.MOSTLY_Q3_K_L:
            qtype = Q.Q4_K
        return qtype
    if cat in ("ffn_gate", "ffn_up"):
        qs.counters[cat] += 1  # only IQ3_XS changes these
    return qtype


def plan_types(g: GGUFFile, ftype: FT, default: Q, pure: bool = False) -> dict[str, Q]:
    """Target type of every tensor, in llama.cpp's processing order (layer, then name)."""
    qs = MixState.from_gguf(g)
    quantized_default = default not in FLOAT_TYPES
    out: dict[str, Q] = {}
    for name in llama_order(g.tensors):
        ti = g.tensors[name]
        if not allows_quantization(name, len(ti.shape)):
            out[name] = ti.qtype
            continue
        qtype = default
        if quantized_default:
            if not pure:
                qtype = mix_type(qs, qtype, name, ti.shape[-1], len(ti.shape), ftype)
            qtype = fallback(ti.shape[-1], qtype)
        out[name] = qtype
    return out


def llama_order(names) -> list[str]:
    """llama_model_loader's weights_map order: by layer number (non-layer tensors first), then by name."""
    def key(n: str) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n)

    return sorted(names, key=key)


# ------------------------------------------------------------------------------------------ the work

def requantize(ti: TensorInfo, qtype: Q) -> torch.Tensor | np.ndarray:
    """One tensor in `qtype`: raw bytes copied when the type is unchanged, else dequantize -> quantize."""
    if ti.qtype == qtype:
        return ti.raw()
    return encode(tensor_float(ti), qtype)  # ggml's to_float values, then quantize_row_*_ref / fp32_to_fp16


def quantize_model(src: str | Path, out: str | Path, qtype: str, pure: bool = False,
                   threads: int | None = None, progress: bool = True) -> dict[str, Q]:
    """Quantize the GGUF `src` into `out` with llama.cpp's mix for `qtype`; returns the type per tensor."""
    ftype, default = parse_ftype(qtype)
    if threads:
        torch.set_num_threads(threads)
    g = open_gguf(src)
    if Path(out).resolve() == Path(src).resolve():
        raise ToolkitError("output would overwrite the input", str(out))
    types = plan_types(g, ftype, default, pure)
    for n, q in types.items():  # before the output is started
        ti = g.tensors[n]
        why = None if q == ti.qtype else dequant_problem(ti.qtype) or quantize_problem(q)  # (same type: copied)
        if why is not None:
            raise ToolkitError(f"tensor '{n}' ({ti.qtype.name} -> {q.name}): {why}", str(src))
    meta = copy_metadata(g, skip=("split.no", "split.count", "split.tensors.count"))
    meta["general.quantization_version"] = QNT_VERSION
    meta["general.file_type"] = int(ftype)
    specs = [TensorSpec(n, types[n], g.tensors[n].shape, lambda ti=g.tensors[n], q=types[n]: requantize(ti, q))
             for n in types]
    write_gguf(out, meta, specs, progress=progress)
    return types


@dataclass
class QuantizeConfig:
    input: str = arg(None, "input", help="GGUF model to quantize")
    output: str = arg(None, "output", help="GGUF file to write")
    type: str = arg(None, "type", help="llama.cpp type name: " + ", ".join(FTYPES))
    pure: bool = arg(False, help="every 2-D weight in TYPE (no per-tensor mix); byte-identical to llama.cpp --pure")
    threads: int = arg(None, "-t", "--threads", help="CPU threads (default: torch's)")
    progress: bool = arg(True, help="show a progress bar")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(QuantizeConfig, argv, prog="toolkit quantize",
                       description="quantize a GGUF model with llama.cpp's per-tensor type choices")
    types = quantize_model(cfg.input, cfg.output, cfg.type, cfg.pure, cfg.threads, cfg.progress)
    counts: dict[str, int] = {}
    for q in types.values():
        counts[q.name] = counts.get(q.name, 0) + 1
    print(f"wrote {cfg.output}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return 0
