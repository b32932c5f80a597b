"""`toolkit convert model`: Hugging Face folder (safetensors) <-> GGUF model, streamed tensor by tensor.

HF -> GGUF follows llama.cpp's convert_hf_to_gguf.py for llama/qwen2/qwen3/phi3/gemma2/gemma3: the same
metadata keys, q/k rows permuted for llama, Gemma norms stored as 1 + w, the vocabulary built from the
transformers tokenizer (gpt2 BPE or SentencePiece-style) plus gguf-py's SpecialVocab (merges, special ids, chat
template). Tensors are read with plain file reads (no mmap, no pickle: `.bin` checkpoints are refused), one at a
time, so memory stays about one tensor.

GGUF -> HF writes dequantized safetensors + config.json + the tokenizer (from the GGUF vocabulary) that
transformers loads: `write_hf_dir` in the core (toolkit/hf_dir.py), shared with `toolkit export-lora --outtype hf`.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.gguf_writer import GGUFValue

from toolkit import names as N
from toolkit.config import arg, parse_config
from toolkit.errors import ToolkitError
from toolkit.gguf_io import TensorSpec, as_qtype, open_gguf, write_gguf
from toolkit.hf_dir import GEMMA, PRE_HINT, save_hf_tokenizer, write_hf_dir  # noqa: F401 (re-exported)
from toolkit.hf_dir import ST_DTYPES as _ST_DTYPES
from toolkit.merge import FILE_TYPE_OF
from toolkit.quants import encode, quantize_problem

from .quantize import QNT_VERSION, allows_quantization, fallback

_SKIP_HF = ("rotary_emb.inv_freq", "vision_tower", "multi_modal_projector", "vision_model", "audio_tower")


# ------------------------------------------------------------------------------------- safetensors, no mmap

@dataclass
class STEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def safetensors_index(folder: Path) -> dict[str, STEntry]:
    """Every tensor of every *.safetensors in `folder` (headers only). Pickle checkpoints are refused."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {pickles[0]}: pickle checkpoints are never loaded; re-save with safe_serialization=True)" \
            if pickles else ""
        raise ToolkitError(f"no .safetensors weights{hint}", str(folder))
    out: dict[str, STEntry] = {}
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ToolkitError("truncated safetensors file", str(f))
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise ToolkitError("corrupt safetensors header", str(f))
            try:
                meta = json.loads(fh.read(n))
            except json.JSONDecodeError:
                raise ToolkitError("corrupt safetensors header", str(f)) from None
        for name, v in meta.items():
            if name == "__metadata__":
                continue
            if v["dtype"] not in _ST_DTYPES:
                raise ToolkitError(f"tensor '{name}' has dtype {v['dtype']} (F32/F16/BF16 expected)", str(f))
            a, b = v["data_offsets"]
            out[name] = STEntry(f, v["dtype"], tuple(v["shape"]), 8 + n + a, b - a)
    return out


def read_st(e: STEntry) -> torch.Tensor:
    """One tensor as float32, read with a plain file read (so RSS is this tensor, not a mapping of the file)."""
    with open(e.file, "rb") as fh:
        fh.seek(e.start)
        buf = fh.read(e.nbytes)
    if len(buf) != e.nbytes:
        raise ToolkitError("truncated safetensors file", str(e.file))
    arr = np.frombuffer(buf, dtype=_ST_DTYPES[e.dtype])
    if e.dtype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return torch.from_numpy(arr.astype(np.float32, copy=False).copy()).reshape(e.shape)


# ------------------------------------------------------------------------------------------- HF -> GGUF

def _cfg(folder: Path) -> dict[str, Any]:
    p = folder / "config.json"
    if not p.is_file():
        raise ToolkitError("no config.json (not a Hugging Face model folder)", str(folder))
    cfg = json.loads(p.read_text())
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


def _rope_theta(cfg: dict[str, Any], default: float) -> float:
    rp = cfg.get("rope_parameters") or {}
    if isinstance(rp, dict) and "full_attention" in rp:  # gemma3 in transformers 5: per layer type
        rp = rp["full_attention"]
    return float(cfg.get("rope_theta") or (rp.get("rope_theta") if isinstance(rp, dict) else None) or default)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    rs = cfg.get("rope_scaling")
    if rs is None:
        rp = cfg.get("rope_parameters") or {}
        if isinstance(rp, dict) and "full_attention" in rp:
            rp = rp["full_attention"]
        rs = rp if isinstance(rp, dict) and rp.get("rope_type", "default") != "default" else None
    return rs


def hf_metadata(arch: str, cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The `{arch}.*` keys convert_hf_to_gguf.py writes for this architecture."""
    n_head = int(cfg["num_attention_heads"])
    dim = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or dim // n_head)
    a = arch
    m: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": str(cfg.get("_name_or_path") or folder.name),
        f"{a}.context_length": int(cfg.get("max_position_embeddings", 4096)),
        f"{a}.embedding_length": dim,
        f"{a}.feed_forward_length": int(cfg["intermediate_size"]),
        f"{a}.block_count": int(cfg["num_hidden_layers"]),
        f"{a}.attention.head_count": n_head,
        f"{a}.attention.head_count_kv": int(cfg.get("num_key_value_heads") or n_head),
        f"{a}.attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        f"{a}.rope.freq_base": _rope_theta(cfg, 1_000_000.0 if arch == "gemma3" else 10000.0),
        f"{a}.vocab_size": int(cfg["vocab_size"]),
    }
    if arch in ("llama", "qwen2"):
        m[f"{a}.rope.dimension_count"] = head_dim
        if head_dim != dim // n_head:
            m[f"{a}.attention.key_length"] = m[f"{a}.attention.value_length"] = head_dim
    if arch in ("qwen3", *GEMMA):
        m[f"{a}.attention.key_length"] = m[f"{a}.attention.value_length"] = head_dim
    if arch == "phi3":
        rot = float(cfg.get("partial_rotary_factor", 1.0))
        m[f"{a}.rope.dimension_count"] = int(rot * head_dim)
        m[f"{a}.rope.scaling.original_context_length"] = int(cfg.get("original_max_position_embeddings",
                                                                    m[f"{a}.context_length"]))
        if cfg.get("sliding_window"):
            m[f"{a}.attention.sliding_window"] = int(cfg["sliding_window"])
    if arch == "gemma2":
        m[f"{a}.attn_logit_softcapping"] = float(cfg.get("attn_logit_softcapping") or 50.0)
        m[f"{a}.final_logit_softcapping"] = float(cfg.get("final_logit_softcapping") or 30.0)
    if arch in GEMMA and cfg.get("sliding_window"):
        m[f"{a}.attention.sliding_window"] = int(cfg["sliding_window"])
    rs = _rope_scaling(cfg)
    if rs:
        kind = rs.get("rope_type") or rs.get("type")
        if kind == "linear":
            m[f"{a}.rope.scaling.type"] = "linear"
            m[f"{a}.rope.scaling.factor"] = float(rs["factor"])
        else:
            raise ToolkitError(f"rope scaling '{kind}' is not supported by toolkit's converter yet", str(folder))
    return m


def _looks_special(tok: str) -> bool:
    return (tok.startswith(("<|", "<｜")) and tok.endswith(("|>", "｜>"))) or tok in (
        "<start_of_turn>", "<end_of_turn>", "<pad>", "<bos>", "<eos>", "<unk>", "<mask>")




def _describe_pre(tj: dict[str, Any]) -> str:
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return "+".join(str(st.get("type")) for st in steps) or "none"


def _detect_pre(tok: Any, tj: dict[str, Any], folder: Path) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer, as llama.cpp's converter chooses it: the hash of the ids
    of its check text, looked up in llama.cpp's table (toolkit.convert.pre_hash). A folder toolkit wrote from a
    GGUF names the original pre-tokenizer in tokenizer_config.json; that name is kept."""
    from toolkit.tokenizer import PRE_TOKENIZERS

    from .pre_hash import identify_pre

    tc = folder / "tokenizer_config.json"
    hint = json.loads(tc.read_text()).get(PRE_HINT) if tc.is_file() else None
    if hint in PRE_TOKENIZERS:
        return hint
    try:
        name, h = identify_pre(tok.encode)
    except Exception as e:  # a tokenizer that cannot encode plain text
        raise ToolkitError(f"cannot identify the BPE pre-tokenizer ({_describe_pre(tj)}): encoding llama.cpp's "
                           f"check text failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                           str(folder)) from None
    if name is None:
        raise ToolkitError(f"cannot identify the BPE pre-tokenizer ({_describe_pre(tj)}) of this tokenizer: its "
                           f"check-text hash {h[:16]} is not in llama.cpp's table, so no tokenizer.ggml.pre would "
                           "make llama.cpp split text as transformers does", str(folder))
    return name


def hf_vocab(folder: Path, arch: str, vocab_size: int) -> dict[str, Any]:
    """Tokenizer metadata as convert_hf_to_gguf.py builds it (tokens, types, merges/scores, special ids, template)."""
    from gguf import GGUFWriter, SpecialVocab, TokenType

    w = GGUFWriter(None, arch)
    tj_path = folder / "tokenizer.json"
    tj = json.loads(tj_path.read_text()) if tj_path.is_file() else None
    bpe = tj is not None and tj.get("model", {}).get("type") == "BPE" and not tj["model"].get("byte_fallback")
    if bpe:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        rev = {i: t for t, i in tok.get_vocab().items()}
        added = tok.get_added_vocab()
        decoder = tok.added_tokens_decoder
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in rev:
                tokens.append(f"[PAD{i}]")
                types.append(TokenType.UNUSED)
                continue
            t = rev[i]
            if t in added:
                if decoder[i].special or _looks_special(t):
                    types.append(TokenType.CONTROL)
                else:
                    t = t.replace("\u2581", " ")
                    types.append(TokenType.USER_DEFINED)
            else:
                types.append(TokenType.NORMAL)
            tokens.append(t)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_detect_pre(tok, tj, folder))
        w.add_token_list(tokens)
        w.add_token_types(types)
    elif tj is not None or (folder / "tokenizer.model").is_file():
        from gguf.vocab import LlamaHfVocab, SentencePieceVocab

        try:
            vocab = SentencePieceVocab(folder) if (folder / "tokenizer.model").is_file() else LlamaHfVocab(folder)
        except Exception as e:  # sentencepiece missing, unusual tokenizer.json
            raise ToolkitError(f"cannot read the SentencePiece tokenizer ({e})", str(folder)) from None
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            tokens.append(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)
            scores.append(float(score))
            types.append(int(ttype))
        for i in range(len(tokens), vocab_size):  # padded embedding rows
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
    else:
        raise ToolkitError("no tokenizer.json or tokenizer.model: llama.cpp needs the vocabulary", str(folder))
    SpecialVocab(folder, load_merges=bpe, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    return {k: GGUFValue(v.value, v.type, v.sub_type) for k, v in w.kv_data[0].items()}


def _hf_tensor_plan(arch: str, cfg: dict[str, Any], index: dict[str, STEntry], folder: Path):
    """[(gguf name, hf name, transform)] in llama.cpp's order; skips lm_head when tied and non-text towers."""
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    tied = bool(cfg.get("tie_word_embeddings", arch in GEMMA))
    plan = []
    for hf in index:
        if any(s in hf for s in _SKIP_HF):
            continue
        gg = N.hf_to_gguf(arch, hf)
        if gg is None:
            raise ToolkitError(f"tensor '{hf}' has no GGUF name for {arch} (unsupported variant?)", str(folder))
        if gg == "output.weight" and tied:
            continue
        heads = N.qk_heads(gg, n_head, n_kv) if arch in N.PERMUTES_QK else None
        gemma_norm = arch in GEMMA and gg.endswith("norm.weight")

        def fn(w: torch.Tensor, heads=heads, gemma_norm=gemma_norm) -> torch.Tensor:
            if heads:
                w = N.permute_rows(w, heads)
            if gemma_norm:
                w = w + 1  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
            return w

        plan.append((gg, hf, fn))
    if not any(gg == "token_embd.weight" for gg, _, _ in plan):
        raise ToolkitError("no embedding tensor found (model.embed_tokens.weight)", str(folder))
    return plan


def _gguf_type(name: str, shape: tuple[int, ...], qtype: Q) -> Q:
    """convert_hf_to_gguf's rule: 1-D tensors and norms F32, the rest in outtype (llama.cpp's fallback for
    rows that do not split into the type's blocks)."""
    if not allows_quantization(name, len(shape)):
        return Q.F32
    if qtype in (Q.F32, Q.F16, Q.BF16):
        return qtype
    return fallback(shape[-1], qtype)


def hf_to_gguf(src: Path, out: Path, outtype: str = "f16", progress: bool = True) -> dict[str, Q]:
    cfg = _cfg(src)
    arch = N.arch_from_hf_model_type(str(cfg.get("model_type", "")), str(src / "config.json"))
    qtype = as_qtype(outtype)
    why = quantize_problem(qtype)
    if why is not None:  # before any work
        raise ToolkitError(f"--outtype {outtype}: {why}")
    index = safetensors_index(src)
    meta = hf_metadata(arch, cfg, src)
    meta.update(hf_vocab(src, arch, int(cfg["vocab_size"])))
    plan = _hf_tensor_plan(arch, cfg, index, src)
    specs, types, weights = [], {}, []
    for gg, hf, fn in plan:
        shape = index[hf].shape
        t = _gguf_type(gg, shape, qtype)
        types[gg] = t
        if allows_quantization(gg, len(shape)):
            weights.append(t)
        specs.append(TensorSpec(gg, t, shape, lambda e=index[hf], fn=fn, t=t: encode(fn(read_st(e)), t)))
    common = Counter(weights).most_common(1)
    meta["general.file_type"] = int(FILE_TYPE_OF.get(common[0][0] if common else Q.F32, 0))
    meta["general.quantization_version"] = QNT_VERSION
    write_gguf(out, meta, specs, progress=progress)
    return types


# ------------------------------------------------------------------------------------------- GGUF -> HF

def gguf_to_hf(src: Path, out: Path, dtype: str = "F32", progress: bool = True) -> None:
    g = open_gguf(src)
    if g.get("general.type") == "adapter":
        raise ToolkitError("this is a LoRA adapter, not a model (use `toolkit convert lora`)", g.path)
    write_hf_dir(g, out, dtype=dtype, progress=progress)


# ------------------------------------------------------------------------------------------- command

def convert_model(src: str | Path, out: str | Path, outtype: str | None = None, progress: bool = True) -> None:
    """HF folder -> GGUF file (outtype f32/f16/bf16/q8_0/q4_0/q4_k/q6_k/..., default f16), or GGUF file -> HF
    folder (outtype f32/f16/bf16 for the safetensors, default f32)."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise ToolkitError("no such file or directory", str(src))
    if src.is_dir():
        hf_to_gguf(src, out, outtype or "f16", progress)
    else:
        dt = (outtype or "f32").upper()
        if dt not in ("F32", "F16", "BF16"):
            raise ToolkitError(f"--outtype {outtype}: a Hugging Face folder holds f32, f16 or bf16")
        gguf_to_hf(src, out, dt, progress)


@dataclass
class ConvertModelConfig:
    src: str = arg(None, "src", help="Hugging Face model folder (safetensors) or GGUF model file")
    output: str = arg(None, "-o", "--output", help="GGUF file (from a folder) or folder (from a GGUF)", required=True)
    outtype: str = arg(None, help="GGUF: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k (default f16); "
                                  "HF: f32, f16, bf16 (default f32)")
    progress: bool = arg(True, help="show a progress bar")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ConvertModelConfig, argv, prog="toolkit convert model",
                       description="convert a model between a Hugging Face folder and GGUF")
    if cfg.src is None:
        raise ToolkitError("give the model to convert: toolkit convert model SRC -o OUT")
    convert_model(cfg.src, cfg.output, cfg.outtype, cfg.progress)
    print(f"wrote {cfg.output}")
    return 0
