"""Tiny GGUF models made in code: real tokenizer metadata (borrowed from the SmolLM2 GGUF), random weights.

llama.cpp loads these, so they serve as oracles' inputs too. Other architectures: pass `arch` and the
tensor/metadata differences through `extra_meta` / `tensors` (see the model tests).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.gguf_io import TensorSpec, open_gguf, write_gguf
from gguf import GGMLQuantizationType as Q

TOKENIZER_KEYS = ("tokenizer.ggml.", "tokenizer.chat_template")


def tokenizer_metadata() -> dict[str, Any]:
    from conftest import smollm2_gguf

    src = open_gguf(smollm2_gguf())
    return {k: v for k, v in src.types.items() if k.startswith(TOKENIZER_KEYS)}


def llama_tensors(n_layer: int, dim: int, n_head: int, n_kv: int, ffn: int, vocab: int, tied: bool,
                  seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hd = dim // n_head

    def w(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    t: dict[str, torch.Tensor] = {"token_embd.weight": w(vocab, dim, std=0.5)}
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = 1 + w(dim, std=0.1)
        t[p + "attn_q.weight"] = w(n_head * hd, dim)
        t[p + "attn_k.weight"] = w(n_kv * hd, dim)
        t[p + "attn_v.weight"] = w(n_kv * hd, dim)
        t[p + "attn_output.weight"] = w(dim, n_head * hd)
        t[p + "ffn_norm.weight"] = 1 + w(dim, std=0.1)
        t[p + "ffn_gate.weight"] = w(ffn, dim)
        t[p + "ffn_up.weight"] = w(ffn, dim)
        t[p + "ffn_down.weight"] = w(dim, ffn)
    t["output_norm.weight"] = 1 + w(dim, std=0.1)
    if not tied:
        t["output.weight"] = w(vocab, dim)
    return t


def make_tiny_gguf(path: str | Path, n_layer: int = 2, dim: int = 64, n_head: int = 4, n_kv: int = 2,
                   ffn: int = 128, qtype: str = "F32", tied: bool = True, seed: int = 0,
                   ctx: int = 256) -> Path:
    """Write a tiny llama GGUF. 2-D weights in `qtype` (F32/F16/BF16 or any quant type whose block divides
    `dim` and `ffn`), norms F32. Returns the path."""
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "tiny-llama",
        "llama.block_count": n_layer,
        "llama.context_length": ctx,
        "llama.embedding_length": dim,
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_kv,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": dim // n_head,
        "general.file_type": 0,
    }
    meta.update(tokenizer_metadata())
    vocab = len(meta["tokenizer.ggml.tokens"].value)
    meta["llama.vocab_size"] = vocab
    tensors = llama_tensors(n_layer, dim, n_head, n_kv, ffn, vocab, tied, seed)
    q = Q[qtype.upper()]
    if q not in (Q.F32, Q.F16):
        from toolkit.quants import quantize  # only quantized tiny models need it
    specs = []
    for name, t in tensors.items():
        tq = q if t.ndim == 2 else Q.F32
        data = t if tq in (Q.F32, Q.F16) else quantize(t.reshape(-1, t.shape[-1]), tq)
        specs.append(TensorSpec(name, tq, tuple(t.shape), data))
    path = Path(path)
    write_gguf(path, meta, specs)
    return path
