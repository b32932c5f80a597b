"""Hugging Face <-> GGUF tensor names per architecture, and the Q/K RoPE row permutation.

GGUF names are the canonical ones inside toolkit (`blk.3.attn_q.weight`); Hugging Face names
(`model.layers.3.self_attn.q_proj.weight`) exist only at the edges (PEFT adapters, HF model dirs).
The tables follow llama.cpp's convert_hf_to_gguf.py for each supported architecture (gguf-py's TensorNameMap
is the source of the GGUF side), so the model converter can reuse them for whole models: weights and biases.

Value transforms that are not renames live with their users, except the Q/K permutation, which both the
adapter and model converters need: llama.cpp's converter permutes the rows of q/k weights (and biases) of
llama-type models from HF's "rotate half" RoPE layout to GGML's interleaved one.
"""
from __future__ import annotations

import re

import torch

from .errors import ToolkitError

# GGUF architecture -> HF `model_type` values that convert to it
HF_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "llama": ("llama", "mistral"),
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3",),
    "phi3": ("phi3",),
    "gemma2": ("gemma2",),
    "gemma3": ("gemma3", "gemma3_text"),
}

# architectures whose q/k rows llama.cpp permutes on conversion (LlamaModel.permute)
PERMUTES_QK = frozenset({"llama"})

_ATTN = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output"}
_MLP = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LLAMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GEMMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}

# per-layer module: HF suffix (after model.layers.N.) -> GGUF suffix (after blk.N.)
LAYER_MODULES: dict[str, dict[str, str]] = {
    "llama": {**_ATTN, **_MLP, **_LLAMA_NORMS},
    "qwen2": {**_ATTN, **_MLP, **_LLAMA_NORMS},
    "qwen3": {**_ATTN, **_MLP, **_LLAMA_NORMS, **_QK_NORMS},
    "phi3": {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down", **_LLAMA_NORMS},
    "gemma2": {**_ATTN, **_MLP, **_GEMMA_NORMS},
    "gemma3": {**_ATTN, **_MLP, **_GEMMA_NORMS, **_QK_NORMS},
}

# whole-model modules
GLOBAL_MODULES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

# prefixes a HF checkpoint may put before `model.` (multimodal wrappers) -> dropped
_HF_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BLK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def check_arch(arch: str, path: str | None = None) -> str:
    if arch not in LAYER_MODULES:
        raise ToolkitError(f"architecture '{arch}' is not supported (supported: {', '.join(LAYER_MODULES)})", path)
    return arch


def arch_from_hf_model_type(model_type: str, path: str | None = None) -> str:
    for arch, types in HF_MODEL_TYPES.items():
        if model_type in types:
            return arch
    raise ToolkitError(f"model_type '{model_type}' is not supported", path)


def _split_suffix(name: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', '.weight'); names without .weight/.bias -> (name, '')."""
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def normalize_hf_module(module: str) -> str:
    """Strip multimodal wrapper prefixes: 'model.language_model.layers.0...' -> 'model.layers.0...'."""
    for prefix in _HF_PREFIXES:
        if module.startswith(prefix):
            rest = module[len(prefix):]
            return rest if rest.startswith(("model.", "lm_head")) else "model." + rest
    return module


def hf_module_to_gguf(arch: str, module: str) -> str | None:
    """HF module path -> GGUF module name ('model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q'); None if unknown."""
    module = normalize_hf_module(module)
    if module in GLOBAL_MODULES:
        return GLOBAL_MODULES[module]
    m = _LAYER_RE.match(module)
    if m is None:
        return None
    sub = LAYER_MODULES[check_arch(arch)].get(m.group(2))
    return None if sub is None else f"blk.{m.group(1)}.{sub}"


def gguf_module_to_hf(arch: str, module: str) -> str | None:
    """GGUF module name -> HF module path ('blk.3.attn_q' -> 'model.layers.3.self_attn.q_proj'); None if unknown."""
    for hf, gg in GLOBAL_MODULES.items():
        if module == gg:
            return hf
    m = _BLK_RE.match(module)
    if m is None:
        return None
    for hf, gg in LAYER_MODULES[check_arch(arch)].items():
        if gg == m.group(2):
            return f"model.layers.{m.group(1)}.{hf}"
    return None


def hf_to_gguf(arch: str, name: str) -> str | None:
    """HF tensor name -> GGUF tensor name, weights and biases ('...q_proj.bias' -> 'blk.N.attn_q.bias')."""
    module, suffix = _split_suffix(name)
    gg = hf_module_to_gguf(arch, module)
    return None if gg is None else gg + suffix


def gguf_to_hf(arch: str, name: str) -> str | None:
    module, suffix = _split_suffix(name)
    hf = gguf_module_to_hf(arch, module)
    return None if hf is None else hf + suffix


def hf_leaf(module: str) -> str:
    """Last path component, the form PEFT's target_modules lists: '...self_attn.q_proj' -> 'q_proj'."""
    return module.rsplit(".", 1)[-1]


# --- Q/K RoPE permutation ----------------------------------------------------------------------------------

def qk_heads(name: str, n_head: int, n_head_kv: int) -> int | None:
    """Heads to permute over for GGUF tensor `name` (q: n_head, k: n_head_kv), None if not q/k."""
    module = _split_suffix(name)[0]
    if module.endswith(".attn_q"):
        return n_head
    if module.endswith(".attn_k"):
        return n_head_kv
    return None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> GGML interleaved (llama.cpp's LlamaModel.permute). w: [rows, ...] or [rows]."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ToolkitError(f"cannot permute {rows} rows over {n_head} heads")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of permute_rows: GGML interleaved -> HF rotate-half."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ToolkitError(f"cannot permute {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
