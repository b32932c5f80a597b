"""Tiny GGUF models made in code: real tokenizer metadata (borrowed from the SmolLM2 GGUF), random weights.

llama.cpp loads these, so they serve as oracles' inputs too. Other architectures: pass `arch` and the
tensor/metadata differences through `extra_meta` / `tensors` (see the model tests).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

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
    return write_tiny(path, meta, tensors, qtype)


def write_tiny(path: str | Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor], qtype: str) -> Path:
    """2-D weights in `qtype` (quantized with toolkit.quants where needed), 1-D tensors F32."""
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


# --- other architectures ----------------------------------------------------------------------------------

ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    # head_dim 256 for gemma (qwen3: 128): transformers scales queries by query_pre_attn_scalar (256 by default, not stored
    # in GGUF) while llama.cpp uses 1/sqrt(head_dim); 256 makes the two agree.
    "llama": dict(tied=True),
    "qwen2": dict(tied=False),
    "qwen3": dict(tied=True, head_dim=128),  # transformers takes Qwen3Config.head_dim (128), not key_length
    "phi3": dict(tied=False, n_kv=4),
    "gemma2": dict(tied=True, head_dim=256, n_head=2, n_kv=1, window=8),
    "gemma3": dict(tied=True, head_dim=256, n_head=2, n_kv=1, window=8, n_layer=6),
}


def arch_tensors(arch: str, n_layer: int, dim: int, n_head: int, n_kv: int, hd: int, ffn: int, vocab: int,
                 tied: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as llama.cpp's converter writes them for `arch` (torch order)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(n: int) -> torch.Tensor:
        return 1 + w(n, std=0.1)  # gemma's stored norms already hold the +1, like the converter writes them

    t: dict[str, torch.Tensor] = {"token_embd.weight": w(vocab, dim, std=0.5 if arch[:5] != "gemma" else 0.05)}
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm(dim)
        if arch == "phi3":
            t[p + "attn_qkv.weight"] = w((n_head + 2 * n_kv) * hd, dim)
        else:
            t[p + "attn_q.weight"] = w(n_head * hd, dim)
            t[p + "attn_k.weight"] = w(n_kv * hd, dim)
            t[p + "attn_v.weight"] = w(n_kv * hd, dim)
        if arch == "qwen2":
            t[p + "attn_q.bias"] = w(n_head * hd, std=0.1)
            t[p + "attn_k.bias"] = w(n_kv * hd, std=0.1)
            t[p + "attn_v.bias"] = w(n_kv * hd, std=0.1)
        if arch in ("qwen3", "gemma3"):
            t[p + "attn_q_norm.weight"] = norm(hd)
            t[p + "attn_k_norm.weight"] = norm(hd)
        t[p + "attn_output.weight"] = w(dim, n_head * hd)
        if arch.startswith("gemma"):
            t[p + "post_attention_norm.weight"] = norm(dim)
            t[p + "post_ffw_norm.weight"] = norm(dim)
        t[p + "ffn_norm.weight"] = norm(dim)
        if arch == "phi3":
            t[p + "ffn_up.weight"] = w(2 * ffn, dim)
        else:
            t[p + "ffn_gate.weight"] = w(ffn, dim)
            t[p + "ffn_up.weight"] = w(ffn, dim)
        t[p + "ffn_down.weight"] = w(dim, ffn)
    t["output_norm.weight"] = norm(dim)
    if not tied:
        t["output.weight"] = w(vocab, dim)
    return t


def make_tiny_arch_gguf(path: str | Path, arch: str, n_layer: int | None = None, dim: int = 64,
                        n_head: int | None = None, n_kv: int | None = None, ffn: int = 128,
                        head_dim: int | None = None, qtype: str = "F32", tied: bool | None = None, seed: int = 0,
                        ctx: int = 256, window: int | None = None, tokenizer: dict[str, Any] | None = None) -> Path:
    """A tiny random model of `arch` (llama, qwen2, qwen3, phi3, gemma2, gemma3) with the metadata llama.cpp's
    converter writes for it. 2-D weights in `qtype` (token_embd too), norms and biases F32. tokenizer: the
    tokenizer.* metadata to use (default: SmolLM2's gpt2 vocabulary; see spm_tokenizer_metadata)."""
    d = ARCH_DEFAULTS[arch]
    n_layer = n_layer if n_layer is not None else d.get("n_layer", 2)
    n_head = n_head if n_head is not None else d.get("n_head", 4)
    n_kv = n_kv if n_kv is not None else d.get("n_kv", 2)
    hd = head_dim if head_dim is not None else d.get("head_dim", dim // n_head)
    tied = tied if tied is not None else d["tied"]
    window = window if window is not None else d.get("window", 0)
    a = arch
    meta: dict[str, Any] = {
        "general.architecture": arch, "general.name": f"tiny-{arch}", "general.file_type": 0,
        f"{a}.block_count": n_layer, f"{a}.context_length": ctx, f"{a}.embedding_length": dim,
        f"{a}.feed_forward_length": ffn, f"{a}.attention.head_count": n_head, f"{a}.attention.head_count_kv": n_kv,
        f"{a}.rope.freq_base": 10000.0, f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
    }
    if arch in ("llama", "phi3"):
        meta[f"{a}.rope.dimension_count"] = hd
    if arch in ("qwen3", "gemma2", "gemma3"):
        meta[f"{a}.attention.key_length"] = hd
        meta[f"{a}.attention.value_length"] = hd
    if arch == "gemma2":
        meta[f"{a}.attn_logit_softcapping"] = 50.0  # transformers' defaults, which it does not read from GGUF
        meta[f"{a}.final_logit_softcapping"] = 30.0
    if arch.startswith("gemma"):
        meta[f"{a}.attention.sliding_window"] = window
    if arch == "gemma3":
        meta[f"{a}.rope.freq_base"] = 1000000.0  # global layers; local (sliding) layers use 10000
    if arch == "phi3":
        meta[f"{a}.rope.scaling.original_context_length"] = ctx
    meta.update(tokenizer if tokenizer is not None else tokenizer_metadata())
    if arch == "phi3" and tokenizer is None:  # llama.cpp's phi3 vocab code looks up "<|end|>": give it one in place of an unused token
        from gguf.gguf_writer import GGUFValue

        tv = meta["tokenizer.ggml.tokens"]
        toks = list(tv.value)
        toks[toks.index("<repo_name>")] = "<|end|>"
        meta["tokenizer.ggml.tokens"] = GGUFValue(toks, tv.type, tv.sub_type)
    vocab = len(meta["tokenizer.ggml.tokens"].value)
    tensors = arch_tensors(arch, n_layer, dim, n_head, n_kv, hd, ffn, vocab, tied, seed)
    return write_tiny(path, meta, tensors, qtype)


SPM_CORPUS = ("the quick brown fox jumps over the lazy dog . hello world , this is a small sentencepiece "
              "vocabulary for testing : numbers 123 and 4567 ; unicode café naïve")


def _spm_metadata(tokens: list[str], scores: list[float], types: list[int]) -> dict[str, Any]:
    """GGUF tokenizer keys of a SentencePiece vocabulary (<unk> 0, <s> 1, </s> 2)."""
    from gguf import GGUFValueType as V
    from gguf.gguf_writer import GGUFValue

    return {
        "tokenizer.ggml.model": GGUFValue("llama", V.STRING),
        "tokenizer.ggml.tokens": GGUFValue(tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.scores": GGUFValue(scores, V.ARRAY, V.FLOAT32),
        "tokenizer.ggml.token_type": GGUFValue(types, V.ARRAY, V.INT32),
        "tokenizer.ggml.bos_token_id": GGUFValue(1, V.UINT32),
        "tokenizer.ggml.eos_token_id": GGUFValue(2, V.UINT32),
        "tokenizer.ggml.unknown_token_id": GGUFValue(0, V.UINT32),
    }


def spm_tokenizer_metadata() -> dict[str, Any]:
    """A small SentencePiece-style (`llama`) vocabulary: <unk> <s> </s>, the 256 byte tokens, characters and
    word pieces with scores (longer pieces score higher, as SentencePiece BPE learns them)."""

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    pieces: dict[str, float] = {}
    for word in SPM_CORPUS.split():
        w = "\u2581" + word
        for ch in w:
            pieces.setdefault(ch, -1000.0 - len(pieces))
        for n in range(2, len(w) + 1):  # prefixes of each word, e.g. "▁t", "▁th", "▁the"
            pieces.setdefault(w[:n], -float(100 - n) - len(pieces) * 1e-3)
    for piece, score in pieces.items():
        tokens.append(piece)
        types.append(1)
        scores.append(score)
    return _spm_metadata(tokens, scores, types)


def tiny_hf_config(arch: str, tied: bool, **over: Any):
    """A 2-layer transformers config of `arch` with SmolLM2's vocabulary size (for HF-side tests)."""
    import transformers

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    gemma = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=128)
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=32, **common),
        "gemma2": lambda: transformers.Gemma2Config(**gemma, **common),
        "gemma3": lambda: transformers.Gemma3TextConfig(**gemma, **common),
        "phi3": lambda: transformers.Phi3Config(**common),
    }[arch]()
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_hf(arch: str, folder: Path, tokenizer_dir: Path, seed: int = 0, tied: bool = False, **over: Any):
    """A random 2-layer transformers model of `arch`, saved (safetensors) with the tokenizer files of
    `tokenizer_dir`; returns the model (eval mode). Weights are scaled so logits are not near-uniform."""
    import shutil

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch, tied, **over)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # gemma stores norms as w - 1
                p.copy_((0.0 if arch.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15 if "embed" not in name else 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return model.eval()


def random_lora(shapes: dict[str, tuple[int, int]], r: int, seed: int, std: float, a_std: float | None = None):
    """Random non-zero LoRA pairs {GGUF weight name: LoraPair} for weights {name: (out, in)}, drawn in the dict's
    order (A, then B, per tensor). token_embd's pair is A [r, n_vocab], B [n_embd, r], as llama.cpp stores it."""
    from toolkit.adapter import LoraPair

    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, (out, inp) in shapes.items():
        if name == "token_embd.weight":
            out, inp = inp, out
        a = torch.randn(r, inp, generator=g) * (std if a_std is None else a_std)
        pairs[name] = LoraPair(a, torch.randn(out, r, generator=g) * std)
    return pairs


# letters of several scripts (Latin with accents, Greek, Cyrillic, CJK), digits, punctuation: the characters the
# synthetic SentencePiece vocabulary's words are made of; text outside it falls back to byte tokens
LARGE_SPM_ALPHABET = ("etaoinshrdlucmfwypvbgkjqxzETAOINSHRDLU" "éèàçöüñß" "αβγδεζ" "абвгде" "日本語中文字"
                      "0123456789" ".,;:!?'-()")


def large_spm_tokenizer_metadata(n_tokens: int = 256_000, seed: int = 0) -> dict[str, Any]:
    """A SentencePiece-style (`llama`) vocabulary of `n_tokens` pieces made in code, the size gemma-family models
    ship: <unk> <s> </s>, 256 byte tokens, the alphabet's characters, then prefixes of random words with and
    without the leading U+2581 (so every piece is two shorter pieces merged, as in a BPE-trained vocabulary).
    Scores are a random permutation of distinct integers, so the merge order is well defined but unrelated to
    piece length (harder on an implementation's ordering than a trained vocabulary)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    seen = set(tokens)
    pieces = ["\u2581"] + list(LARGE_SPM_ALPHABET)
    seen.update(pieces)
    alphabet = np.array(list(LARGE_SPM_ALPHABET))
    # Zipf-like letter frequencies: frequent letters make shared prefixes, rare ones long tails
    p = 1.0 / np.arange(1, len(alphabet) + 1)
    p /= p.sum()
    n_pieces = n_tokens - len(tokens)
    while len(pieces) < n_pieces:
        lengths = rng.integers(2, 12, size=4096)
        letters = rng.choice(alphabet, size=(4096, 12), p=p)
        spaced = rng.random(4096) < 0.6
        for row, n, sp in zip(letters, lengths, spaced):
            w = ("\u2581" if sp else "") + "".join(row[:n])
            for k in range(2, len(w) + 1):
                s = w[:k]
                if s not in seen:
                    seen.add(s)
                    pieces.append(s)
                    if len(pieces) == n_pieces:
                        break
            if len(pieces) == n_pieces:
                break
    scores = [0.0] * len(tokens) + (-rng.permutation(len(pieces)).astype(np.float64) - 1.0).tolist()
    tokens += pieces
    types += [1] * len(pieces)
    return _spm_metadata(tokens, scores, types)


def make_large_spm_gguf(path: str | Path, n_tokens: int = 256_000, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny model (2 layers, 16-wide, F16 embeddings) with a `n_tokens`-piece SentencePiece vocabulary."""
    return make_tiny_arch_gguf(path, arch, dim=16, n_head=2, n_kv=1, ffn=32, head_dim=8, qtype="F16",
                               tokenizer=large_spm_tokenizer_metadata(n_tokens, seed))
