"""A GGUF-native transformer (gpt-fast style): hyper-parameters from GGUF metadata, modules named as GGUF tensors.

`model.get_submodule("blk.3.attn_q")` is the linear that the GGUF tensor `blk.3.attn_q.weight` fills, so GGUF
LoRA adapters map without renaming. Quantized weights stay packed (toolkit.qlinear.QuantLinear; set_weight_mode
picks how they compute); F32/F16/BF16 weights are zero-copy views on the memory-mapped file where the dtype allows.

Semantics follow llama.cpp's graph for each architecture (llama-model.cpp), not transformers':
  * RoPE: llama uses ggml's "normal" mode (adjacent pairs: the converter permuted Q/K rows for it); qwen2,
    qwen3, phi3 and gemma use "neox" (halves). Llama 3 frequency factors come from `rope_freqs.weight`.
  * gemma norms: llama.cpp's converter already stored w + 1, so every RMSNorm here is plain x * w.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ggml_matmul
from .config import WEIGHT_MODES
from .errors import ToolkitError
from .gguf_io import FLOAT_TYPES, GGUFFile, TensorInfo, open_gguf
from .linear_group import RowAdapters, drop_plans, drop_weight_forms, group_forward
from .lora import AdapterHost, LoRAEmbedding
from .qlinear import QuantEmbedding, QuantLinear
from .quants import dequant_problem, tensor_float
from .trainops import swiglu

# llama.cpp's rope type per architecture (LLAMA_ROPE_TYPE_NORM = adjacent pairs, NEOX = two halves)
ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(neox=False),
    "mistral": dict(neox=False),
    "qwen2": dict(neox=True),
    "qwen3": dict(neox=True, qk_norm=True),
    "phi3": dict(neox=True, fused_qkv=True, fused_up=True),
    "gemma2": dict(neox=True, gemma=True, post_norms=True, swa_pattern=2),
    "gemma3": dict(neox=True, gemma=True, post_norms=True, qk_norm=True, swa_pattern=6),
}


@dataclass
class ModelArgs:
    arch: str = "llama"
    n_layer: int = 2
    dim: int = 64
    n_head: int = 4
    n_kv_head: int = 4
    head_dim: int = 16  # attention.key_length (gemma/qwen3 may differ from dim / n_head)
    ffn_dim: int = 128
    vocab_size: int = 32000
    ctx_len: int = 2048  # context_length of training
    norm_eps: float = 1e-5
    rope_dim: int = 16  # n_rot: rotated dims per head (the rest pass through)
    rope_base: float = 10000.0
    rope_scale: float = 1.0  # llama.cpp's freq_scale = 1 / rope.scaling.factor (linear scaling)
    rope_base_swa: float = 10000.0  # gemma3: local (sliding) layers use their own base, unscaled
    neox: bool = False
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    attn_softcap: float = 0.0  # gemma2: scores = cap * tanh(scores / cap)
    final_softcap: float = 0.0  # gemma2: logits soft-cap
    sliding_window: int = 0
    swa_layers: tuple[bool, ...] = ()  # per layer: uses the sliding window
    gemma: bool = False  # embeddings * sqrt(dim), GELU(tanh) FFN
    qk_norm: bool = False
    post_norms: bool = False
    fused_qkv: bool = False
    fused_up: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_gguf(cls, g: GGUFFile, **overrides: Any) -> "ModelArgs":
        """Everything from metadata (and tensor shapes where metadata is silent). overrides: field -> value
        (None values are ignored), e.g. rope_base / rope_scale / norm_eps from finetune's flags."""
        try:
            return cls._from_gguf(g, **overrides)
        except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:  # a value of the wrong type or 0
            raise ToolkitError(f"invalid model metadata ({type(e).__name__}: {str(e)[:120]})", g.path) from None

    @classmethod
    def _from_gguf(cls, g: GGUFFile, **overrides: Any) -> "ModelArgs":
        arch = g.arch
        if arch not in ARCHS:
            raise ToolkitError(f"unsupported architecture '{arch}' (supported: {', '.join(sorted(ARCHS))})", g.path)
        spec = ARCHS[arch]

        def need(key: str) -> Any:
            v = g.arch_get(key)
            if v is None:
                raise ToolkitError(f"missing metadata key '{arch}.{key}'", g.path)
            return v

        n_layer = int(need("block_count"))
        if not 0 <= n_layer <= len(g.tensors):  # every block has tensors; a corrupt count must not loop for hours
            raise ToolkitError(f"block_count {n_layer} does not fit the file's {len(g.tensors)} tensors", g.path)
        dim = int(need("embedding_length"))
        n_head = int(need("attention.head_count"))
        n_kv = g.arch_get("attention.head_count_kv", n_head)
        if isinstance(n_kv, list):  # per-layer counts: only uniform ones are supported
            if len(set(n_kv)) != 1:
                raise ToolkitError("per-layer head_count_kv is not supported", g.path)
            n_kv = n_kv[0]
        head_dim = int(g.arch_get("attention.key_length", dim // n_head))
        ffn = need("feed_forward_length")
        ffn = int(ffn[0] if isinstance(ffn, list) else ffn)
        emb = g.tensors.get("token_embd.weight")
        vocab = int(g.arch_get("vocab_size", emb.shape[0] if emb is not None else len(g.get("tokenizer.ggml.tokens", []))))
        eps = float(g.arch_get("attention.layer_norm_rms_epsilon", 1e-5))
        scale_type = g.arch_get("rope.scaling.type", "none")
        factor = float(g.arch_get("rope.scaling.factor", 0.0) or 0.0)
        rope_scale = 1.0
        if scale_type == "linear" and factor > 0:
            rope_scale = 1.0 / factor
        elif g.arch_get("rope.scale_linear"):
            rope_scale = 1.0 / float(g.arch_get("rope.scale_linear"))
        elif scale_type not in ("none", "linear", None):
            raise ToolkitError(f"rope scaling type '{scale_type}' is not supported", g.path)
        window = int(g.arch_get("attention.sliding_window", 0) or 0)
        pattern = spec.get("swa_pattern", 0)
        # llama.cpp: layer il uses the window when il % pattern < pattern - 1 (gemma2: even layers)
        swa = tuple(bool(window and pattern and (i % pattern) < pattern - 1) for i in range(n_layer))
        attn_scale = None
        if spec.get("gemma"):
            # llama.cpp: 27B models scale by 1/sqrt(n_embd / n_head), the others by 1/sqrt(head_dim)
            attn_scale = 1.0 / math.sqrt(dim / n_head if n_layer in (46, 62) else head_dim)
        elif g.arch_get("attention.scale"):
            attn_scale = float(g.arch_get("attention.scale"))
        args = cls(
            arch=arch, n_layer=n_layer, dim=dim, n_head=n_head, n_kv_head=int(n_kv), head_dim=head_dim,
            ffn_dim=ffn, vocab_size=vocab, ctx_len=int(g.arch_get("context_length", 2048)), norm_eps=eps,
            rope_dim=int(g.arch_get("rope.dimension_count", head_dim)),
            rope_base=float(g.arch_get("rope.freq_base", 10000.0)), rope_scale=rope_scale,
            rope_base_swa=float(g.arch_get("rope.freq_base_swa", 10000.0)), neox=spec["neox"],
            attn_scale=attn_scale, attn_softcap=float(g.arch_get("attn_logit_softcapping", 0.0) or 0.0),
            final_softcap=float(g.arch_get("final_logit_softcapping", 0.0) or 0.0),
            sliding_window=window if any(swa) else 0, swa_layers=swa, gemma=bool(spec.get("gemma")),
            qk_norm=bool(spec.get("qk_norm")), post_norms=bool(spec.get("post_norms")),
            fused_qkv=bool(spec.get("fused_qkv")), fused_up=bool(spec.get("fused_up")),
        )
        return args.override(**overrides)

    def override(self, **kw: Any) -> "ModelArgs":
        kw = {k: v for k, v in kw.items() if v is not None}
        unknown = set(kw) - set(self.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown ModelArgs fields: {sorted(unknown)}")
        return replace(self, **kw)


# --- layers ------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """llama.cpp's rms_norm then multiply by weight (gemma's +1 is already in the stored weight)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        # on CPU F.rms_norm is a composite of more ops than this (measured slower for decode); float32 casts are no-ops
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(args: ModelArgs, base: float, scale: float, n_pos: int, freq_factors: Tensor | None,
                device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin [n_pos, rope_dim // 2]: theta_i(p) = p * scale * base^(-2i / n_rot) / factor_i (ggml_rope_ext)."""
    half = args.rope_dim // 2
    inv = base ** (-torch.arange(0, half, dtype=torch.float64, device=device) * 2 / args.rope_dim)
    if freq_factors is not None:
        inv = inv / freq_factors.to(device=device, dtype=torch.float64)
    pos = torch.arange(n_pos, dtype=torch.float64, device=device) * scale
    ang = pos[:, None] * inv[None, :]  # [n_pos, half]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, neox: bool, n_rot: int, cis: Tensor | None = None) -> Tensor:
    """x [B, H, T, hd]; cos/sin [T, n_rot/2]. neox rotates (x[i], x[i + n_rot/2]); normal rotates (x[2i], x[2i+1])."""
    rot, rest = x[..., :n_rot], x[..., n_rot:]
    xf = rot.float()
    if neox:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    elif torch.compiler.is_compiling():  # real arithmetic fuses into one kernel; complex views would not
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:  # adjacent pairs are complex numbers: one complex multiply (fewest eager ops)
        rot_c = torch.view_as_complex(xf.reshape(*xf.shape[:-1], -1, 2).contiguous())
        out = torch.view_as_real(rot_c * (cis if cis is not None else torch.complex(cos, sin))).flatten(-2)
    out = out.to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class KVCache:
    """Static cache [B, n_kv, T_max, hd] written in place at the given positions. Not a module: its tensors are
    per-generation state, never saved or moved with the model (and so torch.compile treats T_max as dynamic).
    Batched steps (toolkit.infer.batch) treat the B rows as slots, each with its own positions."""

    def __init__(self, batch: int, n_kv: int, t_max: int, head_dim: int, dtype: torch.dtype, device: Any):
        shape = (batch, n_kv, t_max, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v

    def update_rows(self, rows: "SlotRows", pos: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Per-row positions: row b of k/v [B, n_kv, T, hd] goes to cache row rows.index[b] at positions pos[b]
        [B, T]. Returns those rows' first kv_len positions [B, n_kv, kv_len, hd] (a view when they are
        consecutive, else a copy)."""
        self.k[rows.index, :, pos] = k.transpose(1, 2).to(self.k.dtype)  # [B, T, n_kv, hd] at (slot, position)
        self.v[rows.index, :, pos] = v.transpose(1, 2).to(self.v.dtype)
        if rows.first is not None:
            B = pos.shape[0]
            return self.k[rows.first:rows.first + B, :, :kv_len], self.v[rows.first:rows.first + B, :, :kv_len]
        index = rows.index[:, 0]
        return self.k[:, :, :kv_len].index_select(0, index), self.v[:, :, :kv_len].index_select(0, index)


class SlotRows(NamedTuple):
    """A batched step's cache rows and masks, made once per step for every layer (Transformer._forward)."""
    index: Tensor  # [B, 1]: the cache row of each batch row
    first: int | None  # the first of them when they are consecutive (the cache is then read as a view)
    mask: Tensor  # [B, T, S] key k visible to the query at p: k <= p
    mask_swa: Tensor | None  # the same inside the sliding window: 0 <= p - k < window


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float, rep: int,
            causal: bool = True) -> Tensor:
    """Plain attention with GQA by reshaping the query heads (no copies of K/V): q [B, H, T, hd],
    k/v [B, Hkv, S, hd], mask [T, S] or per row [B, T, S] bool (True = attend), or None for causal."""
    B, H, T, hd = q.shape
    S = k.shape[2]
    qg = q.reshape(B, H // rep, rep * T, hd)  # heads of one group share K/V  -> [B, Hkv, rep*T, hd]
    s = (qg.float() @ k.float().transpose(-1, -2)) * scale  # [B, Hkv, rep*T, S]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is None and causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        mask = mask[:, None, None] if mask.dim() == 3 else mask  # per row: [B, 1, 1, T, S]
        s = s.view(B, H // rep, rep, T, S).masked_fill(~mask, float("-inf")).view(B, H // rep, rep * T, S)
    y = s.softmax(-1) @ v.float()  # [B, Hkv, rep*T, hd_v]
    return y.view(B, H, T, -1).to(q.dtype)


def _attend_one(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float, rep: int,
                mask: Tensor | None = None) -> Tensor:
    """Attention of one new token over the whole filled cache, as products and sums: under torch.compile these
    fuse into a few small loops, where SDPA (which inductor also substitutes for a matmul-softmax-matmul chain) is
    one library call per layer with its own setup (measured: ~70 us of a CPU step's 30 such calls).
    q [B, H, 1, hd], k/v [B, Hkv, S, hd], mask [B, 1, S] (rows of a batched step: True = attend) or None."""
    B, H, _, hd = q.shape
    qg = q.reshape(B, H // rep, rep, 1, hd).float()  # heads of one group share K/V  -> [B, Hkv, rep, 1, hd]
    s = (qg * k.float()[:, :, None]).sum(-1) * scale  # [B, Hkv, rep, S]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask[:, None], float("-inf"))  # [B, 1, 1, S]
    y = (s.softmax(-1)[..., None] * v.float()[:, :, None]).sum(-2)  # [B, Hkv, rep, hd_v]
    return y.reshape(B, H, 1, -1).to(q.dtype)


class Block(nn.Module):
    """One decoder layer; attribute names are the GGUF leaf names (attn_q, ffn_gate, ...)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.args, self.layer = args, layer
        self.swa = bool(args.swa_layers[layer]) if args.swa_layers else False
        self.kv_cache: KVCache | None = None
        # linears and norms are assigned by the loader (see build), so nothing is allocated twice

    def _apply(self, fn, recurse=True):  # .to(device) and friends: stacked group weights are rebuilt lazily
        drop_plans(self)
        return super()._apply(fn, recurse)

    def _lin(self, name: str, x: Tensor, rows: RowAdapters | None = None) -> Tensor:
        return group_forward(self, (name,), x, rows)[0]  # a group of one: its adapters' scales live in the plan

    def attention(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None,
                  cis: Tensor | None = None, kv_len: int = 0, slots: SlotRows | None = None,
                  rows: RowAdapters | None = None) -> Tensor:
        a = self.args
        B, T, _ = x.shape
        if a.fused_qkv:
            qkv = self._lin("attn_qkv", x, rows)
            q, k, v = qkv.split([a.n_head * a.head_dim, a.n_kv_head * a.head_dim, a.n_kv_head * a.head_dim], -1)
        else:
            q, k, v = group_forward(self, ("attn_q", "attn_k", "attn_v"), x, rows)
        q = q.view(B, T, a.n_head, a.head_dim)
        k = k.view(B, T, a.n_kv_head, a.head_dim)
        v = v.view(B, T, a.n_kv_head, -1)
        if a.qk_norm:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        if T == 1:  # decoding: one rotation over q and k's heads together (the step is bound by op count)
            q, k = apply_rope(torch.cat((q, k), 1), cos, sin, a.neox, a.rope_dim, cis).split(
                [a.n_head, a.n_kv_head], 1)
        else:
            q = apply_rope(q, cos, sin, a.neox, a.rope_dim, cis)
            k = apply_rope(k, cos, sin, a.neox, a.rope_dim, cis)
        scale = a.attn_scale if a.attn_scale is not None else 1.0 / math.sqrt(a.head_dim)
        rep = a.n_head // a.n_kv_head
        if input_pos is not None and input_pos.dim() == 2:  # batched step: each row its own slot and positions
            k, v = self.kv_cache.update_rows(slots, input_pos, k, v, kv_len)
            mask = slots.mask_swa if self.swa and a.sliding_window else slots.mask
            if T == 1 and torch.compiler.is_compiling():
                y = _attend_one(q, k, v, scale, a.attn_softcap, rep, mask)
            elif T > 1 and not a.attn_softcap and q.dtype == k.dtype:  # a prefill chunk: one fused op
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=rep > 1)
            else:  # one token a row: CPU SDPA with a mask was ~10x slower here (1 ms a layer for 16 rows)
                y = _attend(q, k, v, mask, scale, a.attn_softcap, rep)
            return self._lin("attn_output", y.transpose(1, 2).reshape(B, T, -1), rows)
        if input_pos is not None and self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # attend only over the filled part of the cache
            q_pos = input_pos
        else:
            q_pos = input_pos if input_pos is not None else torch.arange(T, device=x.device)
        mask = None
        causal_simple = (input_pos is None or self.kv_cache is None) and not (self.swa and a.sliding_window)
        all_visible = T == 1 and not (self.swa and a.sliding_window) and self.kv_cache is not None \
            and input_pos is not None  # one new token sees the whole filled cache: no mask at all
        if not causal_simple and not all_visible:
            k_pos = torch.arange(k.shape[2], device=x.device) if input_pos is not None and self.kv_cache is not None \
                else q_pos
            mask = k_pos[None, :] <= q_pos[:, None]  # [T, S]
            if self.swa and a.sliding_window:
                mask = mask & (q_pos[:, None] - k_pos[None, :] < a.sliding_window)
        if all_visible and torch.compiler.is_compiling():  # all_visible: one new token
            y = _attend_one(q, k, v, scale, a.attn_softcap, rep)
        elif all_visible and not a.attn_softcap and q.dtype == k.dtype:  # one fused op for the decode step
            y = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=rep > 1)
        elif all_visible:
            y = _attend(q, k, v, None, scale, a.attn_softcap, rep, causal=False)
        elif mask is None and not a.attn_softcap:  # training / scoring: fused causal SDPA
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale, enable_gqa=rep > 1)
        else:  # decoding (CPU SDPA with a mask is slow for one query) and gemma2's soft-capped scores
            y = _attend(q, k, v, mask, scale, a.attn_softcap, rep)
        y = y.transpose(1, 2).reshape(B, T, -1)  # [B, T, H * hd_v]
        return self._lin("attn_output", y)

    def ffn(self, x: Tensor, rows: RowAdapters | None = None) -> Tensor:
        a = self.args
        if a.fused_up:  # phi3: ffn_up holds [gate; up]
            gate, up = self._lin("ffn_up", x, rows).chunk(2, dim=-1)
        else:
            gate, up = group_forward(self, ("ffn_gate", "ffn_up"), x, rows)
        if a.gemma:
            return self._lin("ffn_down", F.gelu(gate, approximate="tanh") * up, rows)
        return self._lin("ffn_down", swiglu(gate, up), rows)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None,
                cis: Tensor | None = None, kv_len: int = 0, slots: SlotRows | None = None,
                rows: RowAdapters | None = None) -> Tensor:
        """kv_len: with a KV cache, the number of filled positions (max(input_pos) + 1). Batched steps give
        input_pos [B, T], slots (the cache rows) and rows (each row's adapters): see Transformer.forward."""
        h = self.attention(self.attn_norm(x), cos, sin, input_pos, cis, kv_len, slots, rows)
        if self.args.post_norms:
            h = self.post_attention_norm(h)
        x = x + h
        h = self.ffn(self.ffn_norm(x), rows)
        if self.args.post_norms:
            h = self.post_ffw_norm(h)
        return x + h


def _reset_decoder(model: nn.Module) -> None:
    decoder = model.__dict__.get("_decoder")
    if decoder is not None:  # weights changed form: the next cached step runs eager first (toolkit.compiled)
        decoder.reset()


def _slot_rows(slots: Tensor | list[int] | None, n_rows: int, device: torch.device) -> Tensor | int:
    """A batched step's cache rows: an int when they are consecutive (the cache is then read as a view), else [B]."""
    if slots is None:
        return 0
    rows = slots.tolist() if isinstance(slots, Tensor) else [int(s) for s in slots]
    if len(rows) != n_rows:
        raise ValueError(f"{len(rows)} slots for {n_rows} rows")
    if rows == list(range(rows[0], rows[0] + n_rows)):
        return rows[0]
    return slots.to(device) if isinstance(slots, Tensor) else torch.tensor(rows, dtype=torch.long, device=device)


_cache_epochs = itertools.count(1)  # a new number for every set of KV caches, unique across models


class Transformer(AdapterHost, nn.Module):
    """Decoder-only transformer over GGUF tensors. forward(tokens [B, T], input_pos=None) -> logits [B, T, V] f32.

    input_pos None: no cache, full causal attention over the T tokens (training, scoring).
    input_pos [T] with setup_caches(): incremental decoding through the static KV cache.
    input_pos [B, T] with slots [B]: a batched step (toolkit.infer.batch), row b at its own positions in cache
    row slots[b]; adapters (linear_group.RowAdapters) then give each row its own adapter set.
    """

    _cache_epoch = 0  # which set of KV caches is current (setup_caches / clear_caches take a new number)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.blk = nn.ModuleList(Block(args, i) for i in range(args.n_layer))
        self.gradient_checkpointing = False
        self.gguf: GGUFFile | None = None
        self.freq_factors: Tensor | None = None
        self._rope: dict[tuple[bool, str, int], tuple[Tensor, Tensor]] = {}
        self._rope_keys = sorted({self._rope_key(b) for b in self.blk})

    # -- GGUF names -> modules
    def lora_targets(self) -> dict[str, nn.Module]:
        """GGUF weight name -> the module whose output LoRA adds to (linears and the token embedding)."""
        out: dict[str, nn.Module] = {"token_embd.weight": self.token_embd}
        names = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        for i, b in enumerate(self.blk):
            for n in names:
                m = getattr(b, n, None)
                if isinstance(m, nn.Module):
                    out[f"blk.{i}.{n}.weight"] = m
        out["output.weight"] = self.output
        return out

    # -- caches
    def setup_caches(self, batch: int, t_max: int, dtype: torch.dtype | None = None) -> None:
        a = self.args
        ref = self.output_norm.weight
        dtype = dtype or self.compute_dtype
        if self.__dict__.get("_decoder") is not None:
            t_max += 1  # a spare slot: the filled part is then always a strict slice (a full one compiles anew)
        for b in self.blk:
            b.kv_cache = KVCache(batch, a.n_kv_head, t_max, a.head_dim, dtype, ref.device)
        self.max_seq_len = t_max
        self._cache_epoch = next(_cache_epochs)

    def install_caches(self, caches: list[KVCache]) -> None:
        """Put back caches made by an earlier setup_caches (a batch engine's, after another generation)."""
        for b, c in zip(self.blk, caches):
            b.kv_cache = c
        self._cache_epoch = next(_cache_epochs)

    def clear_caches(self) -> None:
        for b in self.blk:
            b.kv_cache = None
        self._cache_epoch = next(_cache_epochs)

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(self, "_compute_dtype", torch.float32)

    def _rope_for(self, local: bool, device: torch.device, n_pos: int) -> tuple[Tensor, Tensor]:
        a = self.args
        key = (local, str(device), 0)
        cached = self._rope.get(key)
        if cached is None or cached[0].shape[0] < n_pos:
            size = max(n_pos, 2 * (cached[0].shape[0] if cached else 0), 1024)
            if local:  # gemma3 local layers: their own base, no scaling
                cached = rope_tables(a, a.rope_base_swa, 1.0, size, None, device)
            else:
                cached = rope_tables(a, a.rope_base, a.rope_scale, size, self.freq_factors, device)
            self._rope[key] = cached
        return cached

    def compile_decode(self, warmup: bool = True, **options: Any) -> None:
        """Run decode steps (one token a row through the KV cache, no autograd) through torch.compile from now
        on: toolkit.compiled says how and why. options: passed to torch.compile; warmup: compile now."""
        from .compiled import compile_decode

        compile_decode(self, warmup, **options)

    def _apply(self, fn, recurse=True):  # .to(device): the compiled step must see the rebuilt weight forms first
        _reset_decoder(self)
        drop_plans(self)
        return super()._apply(fn, recurse)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, last_only: bool = False,
                slots: Tensor | list[int] | None = None, adapters: RowAdapters | None = None) -> Tensor:
        """last_only: logits of the last position only ([B, 1, V]); a prompt's prefill needs no more, and the
        vocabulary head is the largest matmul of a small model. A long tensor [B] instead: each row's logits at
        its own index (a batch of prompts of different lengths, padded at the end).
        Batched steps: input_pos [B, T] (each row's positions), slots [B] (each row's cache row; default the
        rows 0..B-1), adapters (each row's adapter set, replacing the active one; None: the active set)."""
        T = tokens.shape[1]
        pos = input_pos if input_pos is not None else torch.arange(T, device=tokens.device)
        if pos.dim() == 2:
            slots = _slot_rows(slots, tokens.shape[0], tokens.device)
        n_pos = int(pos.max()) + 1  # the step's one host sync: rope table size, filled length of the KV cache
        ropes = {key: self._rope_for(key, tokens.device, n_pos) for key in self._rope_keys}
        decoder = self.__dict__.get("_decoder")  # compile_decode: toolkit.compiled runs the steps it compiles
        if decoder is not None:
            out = decoder.step(tokens, pos, input_pos, n_pos, ropes, last_only, slots, adapters)
            if out is not None:
                return out
        return self._forward(tokens, pos, input_pos, n_pos, ropes, last_only, slots, adapters)

    def _rope_key(self, blk: Block) -> bool:
        return blk.swa and self.args.gemma and self.args.arch == "gemma3"  # gemma3's local layers: own table

    def _forward(self, tokens: Tensor, pos: Tensor, input_pos: Tensor | None, n_pos: int,
                 ropes: dict[bool, tuple[Tensor, Tensor]], last_only: bool, slots: Tensor | int | None = None,
                 rows: RowAdapters | None = None) -> Tensor:
        """forward's body, free of host syncs and Python-side caches so that torch.compile can trace it."""
        return self.head(self._hidden(tokens, pos, input_pos, n_pos, ropes, last_only, slots, rows), rows)

    def _hidden(self, tokens: Tensor, pos: Tensor, input_pos: Tensor | None, n_pos: int,
                ropes: dict[bool, tuple[Tensor, Tensor]], last_only: bool = False,
                slots: Tensor | int | None = None, rows: RowAdapters | None = None) -> Tensor:
        a = self.args
        B = tokens.shape[0]
        x = self.token_embd(tokens, rows) if rows is not None and isinstance(self.token_embd, LoRAEmbedding) \
            else self.token_embd(tokens)  # [B, T, dim]
        if a.gemma:
            x = x * math.sqrt(a.dim)
        x = x.to(self.compute_dtype)
        if pos.dim() == 2:  # a batched step: each row's cache row and what it may see, once for every layer
            first = slots if isinstance(slots, int) else None
            index = torch.arange(first, first + B, device=pos.device) if first is not None else slots
            # what a row's slot holds past its own position (stale, or an earlier sequence's) is never visible
            behind = pos[..., None] - torch.arange(n_pos, device=pos.device)  # [B, T, S]: p - k
            mask = behind >= 0
            swa = mask & (behind < a.sliding_window) if a.sliding_window else None
            slots = SlotRows(index[:, None], first, mask, swa)
        tables = {}
        for blk in self.blk:
            key = self._rope_key(blk)
            if key not in tables:
                cos, sin = ropes[key]
                cos, sin = cos[pos], sin[pos]
                if pos.dim() == 2:  # per-row positions [B, T, n_rot/2] -> [B, 1 (heads), T, n_rot/2]
                    cos, sin = cos[:, None], sin[:, None]
                tables[key] = (cos, sin, None if a.neox else torch.complex(cos, sin))
            cos, sin, cis = tables[key]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(blk, x, cos, sin, input_pos, cis, n_pos, use_reentrant=False)
            else:
                x = blk(x, cos, sin, input_pos, cis, n_pos, slots, rows)
        if isinstance(last_only, Tensor):  # each row's own last position [B] (rows of different lengths)
            x = x[torch.arange(B, device=x.device), last_only][:, None]
        elif last_only:
            x = x[:, -1:]
        return self.output_norm(x)

    def hidden(self, tokens: Tensor) -> Tensor:
        """The final-norm hidden states [B, T, dim] of a cache-free pass (training, scoring): what `head` maps to
        logits. A loss that never materializes the [B, T, vocab] logits (toolkit.train.loss) starts here."""
        T = tokens.shape[1]
        ropes = {key: self._rope_for(key, tokens.device, T) for key in self._rope_keys}
        return self._hidden(tokens, torch.arange(T, device=tokens.device), None, T, ropes)

    def head(self, h: Tensor, rows: RowAdapters | None = None) -> Tensor:
        """Logits [..., vocab] (float32) of final-norm hidden states h [..., dim]; rows: per-row adapters."""
        logits = group_forward(self, ("output",), h, rows)[0].float()
        cap = self.args.final_softcap
        return cap * torch.tanh(logits / cap) if cap else logits


# --- loading -----------------------------------------------------------------------------------------------



def set_weight_mode(model: nn.Module, mode: str, device: torch.device) -> None:
    """How quantized linears compute (QuantLinear's switches):
    float:  a dequantized float copy per weight, made on first use: exact, 4-8x the memory.
    packed: blocks stay packed; on CPU, few-row inputs (decoding) use torch's int4 / bf16 weight-only kernels
            (toolkit.qkernels: bf16 activations, so close to but not bit-equal with float), larger inputs
            dequantize blocks on the fly; other devices dequantize on every call.
    ggml:   packed, and on CPU inputs multiply through libggml's own mul_mat over the GGUF blocks
            (toolkit.ggml_matmul: llama.cpp's kernels and numerics, activations rounded to 8 bits per block):
            up to qkernels.GGML_MAX_ROWS rows, or any size for the types of qkernels.GGML_TILED; larger inputs
            of other types dequantize blocks. Needs llama-cpp-python's libggml. Float elsewhere, as auto.
    auto:   on CPU ggml where libggml loads (and TOOLKIT_CODEC is not torch), else packed (decode speed is bound
            by the bytes of weight read); float elsewhere.
    bf16:   packed, and on CPU inputs of qkernels.bf16_rows() rows or more (prefill, big batches) use a bf16
            copy of each weight: about twice float32's rate where the CPU has bf16 instructions (AVX512-BF16,
            AMX), for 2 bytes a weight more memory; on a CPU without them (AVX2) torch emulates bf16 and the copy
            is slower than the packed mode past a few rows. Float elsewhere, as auto.
    train:  blocks stay packed and dequantize block rows on every use, forward and backward, in float: exact, as
            the exported adapter assumes, and the base costs its GGUF bytes (build()'s state; finetune's default).
            finetune --cache-base takes "float" instead."""
    if mode not in WEIGHT_MODES:
        raise ToolkitError(f"unknown weights mode '{mode}' (use {', '.join(WEIGHT_MODES)})")
    packed = mode in ("packed", "train") or (mode in ("auto", "bf16", "ggml") and device.type == "cpu")
    ggml = device.type == "cpu" and (mode == "ggml" or (mode == "auto" and ggml_matmul.available()))
    if ggml and not ggml_matmul.available():
        raise ToolkitError(f"--weights ggml: {ggml_matmul.unavailable_reason()}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.use_kernels = packed and mode != "train" and device.type == "cpu"
            m.use_bf16_copy = mode == "bf16" and m.use_kernels
            m.use_ggml = ggml
            m.cache_weights = not packed
    drop_weight_forms(model)
    _reset_decoder(model)


def _linear(t: TensorInfo, dtype: torch.dtype, bias: TensorInfo | None = None) -> nn.Module:
    out_f, in_f = t.shape
    b = tensor_float(bias, torch.float32).reshape(-1) if bias is not None else None
    if t.qtype in FLOAT_TYPES:
        lin = nn.Linear(in_f, out_f, bias=b is not None, device="meta")
        lin.weight = nn.Parameter(tensor_float(t, dtype), requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b.to(dtype), requires_grad=False)
        return lin
    return QuantLinear(t.raw(), t.qtype, in_f, out_f, bias=b)


def _embedding(t: TensorInfo, dtype: torch.dtype) -> nn.Module:
    n, d = t.shape
    if t.qtype in FLOAT_TYPES:
        # _weight: no init of a throwaway (on meta its normal_ imports torch._dynamo, longer than the whole load)
        return nn.Embedding(n, d, _weight=tensor_float(t, dtype), _freeze=True)
    return QuantEmbedding(t.raw(), t.qtype, n, d)


def _tied_output(emb: nn.Module, t: TensorInfo) -> nn.Module:
    """output shares token_embd's storage (no second copy of the vocabulary matrix)."""
    n, d = t.shape
    if isinstance(emb, nn.Embedding):
        lin = nn.Linear(d, n, bias=False, device="meta")
        lin.weight = emb.weight
        return lin
    return QuantLinear(emb.qweight, t.qtype, d, n)


def _norm(g: GGUFFile, name: str, dim: int, eps: float) -> RMSNorm:
    n = RMSNorm(dim, eps)
    n.weight = nn.Parameter(tensor_float(g.tensor(name), torch.float32).reshape(-1), requires_grad=False)
    if n.weight.numel() != dim:
        raise ToolkitError(f"tensor '{name}' has {n.weight.numel()} values, expected {dim}", g.path)
    return n


def _check_shapes(g: GGUFFile, args: ModelArgs) -> None:
    """Every weight has the shape the metadata implies (llama.cpp's create_tensor checks): a corrupt file is one
    clear line here instead of a shape error deep in a forward pass."""
    if min(args.n_head, args.n_kv_head, args.head_dim, args.dim, args.ffn_dim, args.vocab_size) <= 0 or \
            args.n_head % args.n_kv_head or args.rope_dim > args.head_dim or args.rope_dim % 2 or args.n_layer < 0:
        raise ToolkitError(f"inconsistent hyperparameters: {args.n_head} heads, {args.n_kv_head} KV heads, head size "
                           f"{args.head_dim}, rope dims {args.rope_dim}, width {args.dim}, ffn {args.ffn_dim}, "
                           f"vocabulary {args.vocab_size}", g.path)
    q, kv, d, f = args.n_head * args.head_dim, args.n_kv_head * args.head_dim, args.dim, args.ffn_dim
    want = {"token_embd.weight": (args.vocab_size, d), "output.weight": (args.vocab_size, d)}
    for i in range(args.n_layer):
        p = f"blk.{i}."
        want.update({p + "attn_q.weight": (q, d), p + "attn_k.weight": (kv, d), p + "attn_v.weight": (kv, d),
                     p + "attn_qkv.weight": (q + 2 * kv, d), p + "attn_output.weight": (d, q),
                     p + "ffn_gate.weight": (f, d), p + "ffn_down.weight": (d, f),
                     p + "ffn_up.weight": (2 * f if args.fused_up else f, d)})
    for name, shape in want.items():
        t = g.tensors.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise ToolkitError(f"tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}", g.path)
        why = dequant_problem(t.qtype) if t is not None else None
        if why is not None:
            raise ToolkitError(f"tensor '{name}': {why}", g.path)
    for name, t in g.tensors.items():
        if name.endswith("norm.weight") and t.qtype not in FLOAT_TYPES:
            raise ToolkitError(f"tensor '{name}' has type {t.qtype.name}; norms are float", g.path)
    n_tokens = len(g.get("tokenizer.ggml.tokens") or [])
    if n_tokens > args.vocab_size:
        raise ToolkitError(f"{n_tokens} tokens in the vocabulary but token_embd has {args.vocab_size} rows", g.path)


def build(g: GGUFFile, dtype: torch.dtype = torch.float32, **overrides: Any) -> Transformer:
    """A Transformer over the tensors of an opened GGUF (on CPU, zero-copy where possible). Quantized linears
    start in set_weight_mode's "train" state (packed, dequantized on use); load() sets the mode it is asked for."""
    args = ModelArgs.from_gguf(g, **overrides)
    _check_shapes(g, args)
    model = Transformer(args)
    model._compute_dtype = dtype
    model.gguf = g
    te = g.tensor("token_embd.weight")
    model.token_embd = _embedding(te, dtype)
    for i, b in enumerate(model.blk):
        p = f"blk.{i}."
        b.attn_norm = _norm(g, p + "attn_norm.weight", args.dim, args.norm_eps)
        b.ffn_norm = _norm(g, p + "ffn_norm.weight", args.dim, args.norm_eps)
        lin = ["attn_output", "ffn_down"]
        lin += ["attn_qkv"] if args.fused_qkv else ["attn_q", "attn_k", "attn_v"]
        lin += ["ffn_up"] if args.fused_up else ["ffn_gate", "ffn_up"]
        for n in lin:
            setattr(b, n, _linear(g.tensor(p + n + ".weight"), dtype, g.tensors.get(p + n + ".bias")))
        if args.qk_norm:
            b.attn_q_norm = _norm(g, p + "attn_q_norm.weight", args.head_dim, args.norm_eps)
            b.attn_k_norm = _norm(g, p + "attn_k_norm.weight", args.head_dim, args.norm_eps)
        if args.post_norms:
            b.post_attention_norm = _norm(g, p + "post_attention_norm.weight", args.dim, args.norm_eps)
            b.post_ffw_norm = _norm(g, p + "post_ffw_norm.weight", args.dim, args.norm_eps)
    model.output_norm = _norm(g, "output_norm.weight", args.dim, args.norm_eps)
    out = g.tensors.get("output.weight")
    model.output = _linear(out, dtype) if out is not None else _tied_output(model.token_embd, te)
    model.tied = out is None
    if "rope_freqs.weight" in g.tensors:  # Llama 3 rope scaling: per-frequency divisors
        model.freq_factors = tensor_float(g.tensor("rope_freqs.weight"), torch.float32).reshape(-1).clone()
    return model


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ToolkitError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ToolkitError("--device mps: MPS is not available on this machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else (torch.bfloat16 if device.type == "cuda" else torch.float16)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"f32": torch.float32, "float32": torch.float32, "fp32": torch.float32, "f16": torch.float16,
             "float16": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if str(dtype).lower() not in names:
        raise ToolkitError(f"unknown dtype '{dtype}' (use f32, f16 or bf16)")
    return names[str(dtype).lower()]


def load(path: str | os.PathLike, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
         adapters: Iterable[tuple[str, float] | str] = (), weights: str = "auto", compile: bool = False,
         **overrides: Any):
    """(model, tokenizer) from a GGUF file. adapters: [(file, scale), ...] loaded unmerged via load_adapter.
    compile: decode steps through torch.compile (Transformer.compile_decode), compiled here, after the adapters.
    weights: how quantized weights compute, see set_weight_mode ("float" for results exact to the dequantized
    weights, as the oracle tests use). overrides: ModelArgs fields (rope_base, rope_scale, norm_eps) as finetune's
    flags set them."""
    from .tokenizer import Tokenizer

    g = open_gguf(path)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    model = build(g, dt, **overrides)
    if dev.type != "cpu":
        model = model.to(dev)
    set_weight_mode(model, weights, dev)
    model.eval()
    tok = Tokenizer.from_gguf(g)
    for item in adapters:
        file, scale = (item, 1.0) if isinstance(item, (str, Path)) else item
        name = model.load_adapter(str(file), scale=float(scale))
        tok.add_tokens(model.adapters[name].source.added_tokens)  # modules_to_save grew the vocabulary
    if compile:
        model.compile_decode()
    return model, tok
