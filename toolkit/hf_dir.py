"""A GGUF model as a transformers folder: config.json, model.safetensors (streamed), the tokenizer.

Shared by `toolkit convert model GGUF -o DIR` (convert/model.py) and `toolkit export-lora --outtype hf`
(convert/export_lora.py), which hands write_hf_dir its merged weights; living in the core, neither command
module imports the other.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import names as N
from .errors import ToolkitError
from .fileutil import atomic_path
from .gguf_io import GGUFFile

HF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
HF_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma2",
                 "gemma3": "gemma3_text"}
GEMMA = ("gemma2", "gemma3")
ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
PRE_HINT = "gguf_pre"  # tokenizer_config.json key toolkit writes on GGUF -> HF, so the round trip keeps the name


def write_safetensors(path: Path, entries: Sequence[tuple[str, str, tuple[int, ...], Callable[[], np.ndarray]]],
                      progress: bool = False) -> None:
    """Streamed safetensors writer: header from shapes, then each tensor's bytes as its callable produces them."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape, _ in entries:
        n = int(np.prod(shape)) * np.dtype(ST_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    bar = _bar(len(entries), f"writing {path.name}", progress)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb)
        for name, dtype, shape, fn in entries:
            arr = np.ascontiguousarray(fn())
            if arr.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise ToolkitError(f"tensor '{name}': {arr.nbytes} bytes for shape {list(shape)} {dtype}")
            fh.write(arr.tobytes())
            bar.update(1)
    bar.close()


def _bar(total: int, desc: str, on: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not on)


def _f32_decimal(x: float) -> float:
    """GGUF stores float32: 1e-5 comes back as 9.99999974e-06; write the shortest decimal of that float32."""
    return float(str(np.float32(x)))


def hf_config(g: GGUFFile) -> dict[str, Any]:
    """config.json for transformers from the GGUF hyperparameters."""
    arch = N.check_arch(g.arch, g.path)

    def hp(key: str, default: Any = None) -> Any:
        v = g.arch_get(key, default)
        v = v[0] if isinstance(v, list) else v
        return _f32_decimal(v) if isinstance(v, float) else v

    n_head, dim = int(hp("attention.head_count")), int(hp("embedding_length"))
    head_dim = int(hp("attention.key_length", 0) or dim // n_head)
    vocab = g.tensors["token_embd.weight"].shape[0]
    theta = float(hp("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10000.0))
    tokens = g.get("tokenizer.ggml.tokens") or []
    cfg: dict[str, Any] = {
        "architectures": [HF_ARCHS[arch]], "model_type": HF_MODEL_TYPE[arch],
        "hidden_size": dim, "intermediate_size": int(hp("feed_forward_length")),
        "num_hidden_layers": int(hp("block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": int(hp("attention.head_count_kv", n_head)), "head_dim": head_dim,
        "rms_norm_eps": float(hp("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(hp("context_length", 4096)), "vocab_size": vocab,
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": "output.weight" not in g.tensors, "torch_dtype": "float32", "dtype": "float32",
        "hidden_act": "gelu_pytorch_tanh" if arch in GEMMA else "silu",
    }
    for key, tid in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                     ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if g.get(tid) is not None and int(g.get(tid)) < max(len(tokens), 1):
            cfg[key] = int(g.get(tid))
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
        cfg["mlp_bias"] = False
    if arch == "phi3":
        cfg["partial_rotary_factor"] = int(hp("rope.dimension_count", head_dim)) / head_dim
        if hp("attention.sliding_window"):
            cfg["sliding_window"] = int(hp("attention.sliding_window"))
    if arch in GEMMA:
        cfg["query_pre_attn_scalar"] = head_dim
        if hp("attention.sliding_window"):
            cfg["sliding_window"] = int(hp("attention.sliding_window"))
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = float(hp("attn_logit_softcapping", 50.0))
        cfg["final_logit_softcapping"] = float(hp("final_logit_softcapping", 30.0))
    if hp("rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(hp("rope.scaling.factor"))}
        cfg["rope_parameters"] = {"rope_type": "linear", "factor": float(hp("rope.scaling.factor")),
                                  "rope_theta": theta}
    return cfg


def save_hf_tokenizer(g: GGUFFile, folder: Path) -> None:
    """The GGUF vocabulary as a transformers fast tokenizer (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from toolkit.tokenizer import Tokenizer

    t = Tokenizer.from_gguf(g)
    tok = t.tok
    names = t.tokens
    bos = names[t.bos_id] if t.bos_id is not None and t.bos_id < len(names) else None
    eos = names[t.eos_id] if t.eos_id is not None and t.eos_id < len(names) else None
    if t.add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, t.bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   clean_up_tokenization_spaces=False)
    pad = g.get("tokenizer.ggml.padding_token_id")
    if pad is not None and int(pad) < len(names):
        fast.pad_token = names[int(pad)]
    if t.chat_template:
        fast.chat_template = t.chat_template
    fast.save_pretrained(str(folder))
    tc = folder / "tokenizer_config.json"
    conf = json.loads(tc.read_text())
    conf[PRE_HINT] = g.get("tokenizer.ggml.pre", "default")
    conf["add_bos_token"], conf["add_eos_token"] = bool(t.add_bos), bool(t.add_eos)  # SpecialVocab reads these
    tc.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")


def _hf_weight(g: GGUFFile, name: str, w: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """GGUF value -> HF value: undo the q/k permutation (llama) and Gemma's stored 1 + w."""
    if g.arch in N.PERMUTES_QK:
        heads = N.qk_heads(name, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        if heads:
            w = N.unpermute_rows(w, heads)
    if g.arch in GEMMA and name.endswith("norm.weight"):
        w = w - 1
    return w


def write_hf_dir(g: GGUFFile, out: str | Path, weight: Callable[[str], torch.Tensor] | None = None,
                 dtype: str = "F32", progress: bool = True) -> None:
    """A transformers folder from a GGUF model: config.json, model.safetensors (dequantized, `dtype` F32/F16/BF16),
    tokenizer. `weight(name)` gives each GGUF tensor as float32 (default: dequantized); export-lora merges there."""
    from .quants import tensor_float

    if weight is None:
        def weight(name: str) -> torch.Tensor:
            return tensor_float(g.tensors[name], copy=True)

    cfg = hf_config(g)
    entries = []
    for name, ti in g.tensors.items():
        if name == "rope_freqs.weight":
            continue
        hf = N.gguf_to_hf(g.arch, name)
        if hf is None:
            raise ToolkitError(f"tensor '{name}' has no Hugging Face name for {g.arch}", g.path)

        def fn(name=name) -> np.ndarray:
            w = _hf_weight(g, name, weight(name).float(), cfg)
            if dtype == "F16":
                return w.numpy().astype(np.float16)
            if dtype == "BF16":
                return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return w.numpy()

        entries.append((hf, dtype, ti.shape, fn))
    cfg["torch_dtype"] = cfg["dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
    with atomic_path(out, directory=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", entries, progress)
        save_hf_tokenizer(g, tmp)
