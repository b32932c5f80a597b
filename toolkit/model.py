"""A GGUF-native transformer (gpt-fast style): hyper-parameters from GGUF metadata, modules named as GGUF tensors.

`model.get_submodule("blk.3.attn_q")` is the linear that the GGUF tensor `blk.3.attn_q.weight` fills, so GGUF
LoRA adapters map without renaming. Quantized weights stay packed (toolkit.qlinear.QuantLinear
with cache_weights on: a float copy is made on first use, for speed); F32/F16/BF16 weights are zero-copy views on the
memory-mapped file where the dtype allows.

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
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from gguf import GGMLQuantizationType as Q

from .config import WEIGHT_MODES
from .errors import ToolkitError
from .gguf_io import GGUFFile, TensorInfo, open_gguf
from .linear_group import drop_plans, group_forward, pack_plans
from .lora import AdapterHost, last_version
from .qlinear import QuantEmbedding, QuantLinear
from .quants import tensor_float
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
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


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
    per-generation state, never saved or moved with the model (and so torch.compile treats T_max as dynamic)."""

    def __init__(self, batch: int, n_kv: int, t_max: int, head_dim: int, dtype: torch.dtype, device: Any):
        shape = (batch, n_kv, t_max, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float, rep: int,
            causal: bool = True) -> Tensor:
    """Plain attention with GQA by reshaping the query heads (no copies of K/V): q [B, H, T, hd],
    k/v [B, Hkv, S, hd], mask [T, S] bool (True = attend) or None for causal."""
    B, H, T, hd = q.shape
    S = k.shape[2]
    qg = q.reshape(B, H // rep, rep * T, hd)  # heads of one group share K/V  -> [B, Hkv, rep*T, hd]
    s = (qg.float() @ k.float().transpose(-1, -2)) * scale  # [B, Hkv, rep*T, S]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is None and causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        s = s.view(B, H // rep, rep, T, S).masked_fill(~mask, float("-inf")).view(B, H // rep, rep * T, S)
    y = s.softmax(-1) @ v.float()  # [B, Hkv, rep*T, hd_v]
    return y.view(B, H, T, -1).to(q.dtype)


def _attend_one(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float, rep: int) -> Tensor:
    """Attention of one new token over the whole filled cache, as products and sums: under torch.compile these
    fuse into a few small loops, where SDPA (which inductor also substitutes for a matmul-softmax-matmul chain) is
    one library call per layer with its own setup (measured: ~70 us of a CPU step's 30 such calls).
    q [B, H, 1, hd], k/v [B, Hkv, S, hd]."""
    B, H, _, hd = q.shape
    qg = q.reshape(B, H // rep, rep, 1, hd).float()  # heads of one group share K/V  -> [B, Hkv, rep, 1, hd]
    s = (qg * k.float()[:, :, None]).sum(-1) * scale  # [B, Hkv, rep, S]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
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

    def _lin(self, name: str, x: Tensor) -> Tensor:
        return group_forward(self, (name,), x)[0]  # a group of one: its adapters' scales live in the plan

    def attention(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None,
                  cis: Tensor | None = None, kv_len: int = 0) -> Tensor:
        a = self.args
        B, T, _ = x.shape
        if a.fused_qkv:
            qkv = self._lin("attn_qkv", x)
            q, k, v = qkv.split([a.n_head * a.head_dim, a.n_kv_head * a.head_dim, a.n_kv_head * a.head_dim], -1)
        else:
            q, k, v = group_forward(self, ("attn_q", "attn_k", "attn_v"), x)
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
        scale = a.attn_scale if a.attn_scale is not None else 1.0 / math.sqrt(a.head_dim)
        rep = a.n_head // a.n_kv_head
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

    def ffn(self, x: Tensor) -> Tensor:
        a = self.args
        if a.fused_up:  # phi3: ffn_up holds [gate; up]
            gate, up = self._lin("ffn_up", x).chunk(2, dim=-1)
        else:
            gate, up = group_forward(self, ("ffn_gate", "ffn_up"), x)
        if a.gemma:
            return self._lin("ffn_down", F.gelu(gate, approximate="tanh") * up)
        return self._lin("ffn_down", swiglu(gate, up))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor | None,
                cis: Tensor | None = None, kv_len: int = 0) -> Tensor:
        """kv_len: with a KV cache, the number of filled positions (max(input_pos) + 1)."""
        h = self.attention(self.attn_norm(x), cos, sin, input_pos, cis, kv_len)
        if self.args.post_norms:
            h = self.post_attention_norm(h)
        x = x + h
        h = self.ffn(self.ffn_norm(x))
        if self.args.post_norms:
            h = self.post_ffw_norm(h)
        return x + h


_cache_epochs = itertools.count(1)  # a new number for every set of KV caches, unique across models


class Transformer(AdapterHost, nn.Module):
    """Decoder-only transformer over GGUF tensors. forward(tokens [B, T], input_pos=None) -> logits [B, T, V] f32.

    input_pos None: no cache, full causal attention over the T tokens (training, scoring).
    input_pos [T] with setup_caches(): incremental decoding through the static KV cache.
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
        if self.__dict__.get("_compiled") is not None:
            t_max += 1  # a spare slot: the filled part is then always a strict slice (a full one compiles anew)
        for b in self.blk:
            b.kv_cache = KVCache(batch, a.n_kv_head, t_max, a.head_dim, dtype, ref.device)
        self.max_seq_len = t_max
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
        """Run decode steps (one token through the KV cache, no autograd) through torch.compile from now on.

        A CPU decode step of a small model is as much per-op overhead as weight reading (~50 small ops per layer
        in eager mode); inductor fuses the elementwise work (norms, RoPE, SiLU, residuals) around the weight-only
        kernels. The first compiled step takes seconds to a minute (inductor caches its output on disk, so later
        processes take a few seconds). The cache length is dynamic, so a longer cache does not recompile, nor do new
        adapter scales; loading or unloading adapters, or other ranks, compiles once per new adapter layout.
        options: passed to torch.compile (e.g. mode="max-autotune-no-cudagraphs").
        warmup: compile now, on a throwaway two-token decode, rather than in the first generation."""
        import warnings

        if "mode" not in options:  # torch.compile takes a mode or inductor options, not both
            # inductor re-checks every input's sizes and strides in Python each step, ~800 of them here, which
            # dynamo's guards have already checked: measured 0.5-0.7 ms of a 16 ms step (2 threads)
            options["options"] = {"size_asserts": False, **options.get("options", {})}

        # inductor's note on its own bf16/f16 mix (the Q8_0 embedding's f16 scales), not the user's concern
        warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")
        # every adapter layout (which adapters are active, their ranks) is a graph of its own, and dynamo's
        # default of 8 graphs per function (shared by all models in the process) is soon reached by a server that
        # switches adapters; past the limit steps run eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled = torch.compile(self._forward, dynamic=True, **options)
        self.__dict__.pop("_steady_state", None)
        if warmup:
            dev = self.output_norm.weight.device
            with torch.inference_mode():
                self.setup_caches(1, 3)
                try:
                    for p in range(3):  # prefill, the eager step that makes the kernel weights, a compiled one
                        self(torch.zeros(1, 1, dtype=torch.long, device=dev), input_pos=torch.tensor([p], device=dev))
                finally:
                    self.clear_caches()

    def _apply(self, fn, recurse=True):  # .to(device): the compiled step must see the rebuilt weight forms first
        self.__dict__.pop("_decode_warm", None)
        drop_plans(self)
        return super()._apply(fn, recurse)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, last_only: bool = False) -> Tensor:
        """last_only: logits of the last position only ([B, 1, V]); a prompt's prefill needs no more, and the
        vocabulary head is the largest matmul of a small model."""
        T = tokens.shape[1]
        pos = input_pos if input_pos is not None else torch.arange(T, device=tokens.device)
        n_pos = int(pos.max()) + 1  # the step's one host sync: rope table size, filled length of the KV cache
        ropes = {key: self._rope_for(key, tokens.device, n_pos) for key in self._rope_keys}
        if self.__dict__.get("_compiled") is not None and T == 1 and input_pos is not None \
                and self.blk[0].kv_cache is not None and not torch.is_grad_enabled():
            if self.__dict__.get("_decode_warm"):
                # adapters changed, or the eager step made new plans: the compiled step reads them unchecked
                if self.__dict__.get("_plans_version") != last_version():
                    pack_plans([self, *self.blk], self.compute_dtype)
                    self.__dict__["_plans_version"] = last_version()
                return self._compiled_step(tokens, pos, input_pos, n_pos, ropes, last_only)
            # one eager step first makes every kernel weight and group plan the compiled step reads, and the next
            # compiled step checks all its guards (whatever reset this state, .to() or a weights mode, is new to them)
            self.__dict__["_decode_warm"] = True
            self.__dict__.pop("_steady_state", None)
            self.__dict__.pop("_plans_version", None)  # its plans are not packed yet
        return self._forward(tokens, pos, input_pos, n_pos, ropes, last_only)

    def _compiled_step(self, tokens: Tensor, pos: Tensor, input_pos: Tensor, n_pos: int,
                       ropes: dict[bool, tuple[Tensor, Tensor]], last_only: bool) -> Tensor:
        """One compiled decode step. dynamo checks ~5,000 guards over every weight, cache and plan before each call
        (0.5-1 ms of a CPU step); within one generation nothing they check changes from step to step except the
        position, which is dynamic. So once a step has passed the full check, the next steps with the same
        caches, adapters, rope tables and grad mode skip it (torch's skip_guard_eval_unsafe stance, meant for
        steady-state decoding; it still checks one guard per tensor read, which is why plans keep few tensors);
        any change in that state runs the full check again. The stance is process-wide while the step runs: run
        compiled functions from one thread at a time (toolkit serve's model thread does)."""
        state = (self._cache_epoch, self.__dict__.get("_plans_version"), tuple(id(t) for cs in ropes.values()
                 for t in cs), torch.is_inference_mode_enabled(), last_only, tokens.dtype, pos.dtype)
        if state == self.__dict__.get("_steady_state") and state != self.__dict__.get("_skip_refused"):
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._compiled(tokens, pos, input_pos, n_pos, ropes, last_only)
            except RuntimeError as e:  # raised before the step runs: no compiled graph fits it (dynamo's
                if "skip_guard_eval_unsafe" not in str(e):  # recompile limit was reached: it runs such steps eagerly)
                    raise
                self.__dict__["_skip_refused"] = state  # this state's steps take the full check
        out = self._compiled(tokens, pos, input_pos, n_pos, ropes, last_only)
        self.__dict__["_steady_state"] = state
        return out

    def _rope_key(self, blk: Block) -> bool:
        return blk.swa and self.args.gemma and self.args.arch == "gemma3"  # gemma3's local layers: own table

    def _forward(self, tokens: Tensor, pos: Tensor, input_pos: Tensor | None, n_pos: int,
                 ropes: dict[bool, tuple[Tensor, Tensor]], last_only: bool) -> Tensor:
        """forward's body, free of host syncs and Python-side caches so that torch.compile can trace it."""
        a = self.args
        x = self.token_embd(tokens)  # [B, T, dim]
        if a.gemma:
            x = x * math.sqrt(a.dim)
        x = x.to(self.compute_dtype)
        tables = {}
        for blk in self.blk:
            key = self._rope_key(blk)
            if key not in tables:
                cos, sin = ropes[key]
                cos, sin = cos[pos], sin[pos]
                tables[key] = (cos, sin, None if a.neox else torch.complex(cos, sin))
            cos, sin, cis = tables[key]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(blk, x, cos, sin, input_pos, cis, n_pos, use_reentrant=False)
            else:
                x = blk(x, cos, sin, input_pos, cis, n_pos)
        if last_only:
            x = x[:, -1:]
        x = self.output_norm(x)
        logits = group_forward(self, ("output",), x)[0].float()
        if a.final_softcap:
            logits = a.final_softcap * torch.tanh(logits / a.final_softcap)
        return logits


# --- loading -----------------------------------------------------------------------------------------------

def quant_linear(raw: Tensor, qtype: Q, in_f: int, out_f: int, bias: Tensor | None = None) -> nn.Module:
    lin = QuantLinear(raw, qtype, in_f, out_f, bias=bias)
    lin.cache_weights = True  # inference speed (load() picks the mode per device; finetune keeps blocks packed)
    return lin


def set_weight_mode(model: nn.Module, mode: str, device: torch.device) -> None:
    """How quantized linears compute (QuantLinear's switches):
    float:  a dequantized float copy per weight, made on first use: exact, 4-8x the memory.
    packed: blocks stay packed; on CPU, few-row inputs (decoding) use torch's int4 / bf16 weight-only kernels
            (toolkit.qkernels: bf16 activations, so close to but not bit-equal with float), larger inputs
            dequantize blocks on the fly; other devices dequantize on every call.
    auto:   packed on CPU (decode speed is bound by the bytes of weight read), float elsewhere."""
    if mode not in WEIGHT_MODES:
        raise ToolkitError(f"unknown weights mode '{mode}' (use {', '.join(WEIGHT_MODES)})")
    packed = mode == "packed" or (mode == "auto" and device.type == "cpu")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.use_kernels = packed and device.type == "cpu"
            m.cache_weights = not packed
            m.drop_cache()
        drop_plans(m)
    model.__dict__.pop("_decode_warm", None)


def _linear(t: TensorInfo, dtype: torch.dtype, bias: TensorInfo | None = None) -> nn.Module:
    out_f, in_f = t.shape
    b = tensor_float(bias, torch.float32).reshape(-1) if bias is not None else None
    if t.qtype in FLOAT_TYPES:
        lin = nn.Linear(in_f, out_f, bias=b is not None, device="meta")
        lin.weight = nn.Parameter(tensor_float(t, dtype), requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b.to(dtype), requires_grad=False)
        return lin
    return quant_linear(t.raw(), t.qtype, in_f, out_f, bias=b)


def _embedding(t: TensorInfo, dtype: torch.dtype) -> nn.Module:
    n, d = t.shape
    if t.qtype in FLOAT_TYPES:
        emb = nn.Embedding(n, d, device="meta")
        emb.weight = nn.Parameter(tensor_float(t, dtype), requires_grad=False)
        return emb
    return QuantEmbedding(t.raw(), t.qtype, n, d)


def _tied_output(emb: nn.Module, t: TensorInfo) -> nn.Module:
    """output shares token_embd's storage (no second copy of the vocabulary matrix)."""
    n, d = t.shape
    if isinstance(emb, nn.Embedding):
        lin = nn.Linear(d, n, bias=False, device="meta")
        lin.weight = emb.weight
        return lin
    return quant_linear(emb.qweight, t.qtype, d, n)


def _norm(g: GGUFFile, name: str, dim: int, eps: float) -> RMSNorm:
    n = RMSNorm(dim, eps)
    n.weight = nn.Parameter(tensor_float(g.tensor(name), torch.float32).reshape(-1), requires_grad=False)
    if n.weight.numel() != dim:
        raise ToolkitError(f"tensor '{name}' has {n.weight.numel()} values, expected {dim}", g.path)
    return n


def build(g: GGUFFile, dtype: torch.dtype = torch.float32, **overrides: Any) -> Transformer:
    """A Transformer over the tensors of an opened GGUF (on CPU, zero-copy where possible)."""
    args = ModelArgs.from_gguf(g, **overrides)
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
        model.load_adapter(str(file), scale=float(scale))
    if compile:
        model.compile_decode()
    return model, tok
