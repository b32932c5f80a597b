"""`toolkit export-lora -m base.gguf -o merged.gguf --lora a.gguf --lora-scaled b.gguf 0.5`: llama-export-lora.

Each tensor an adapter touches is dequantized, gets user_scale * alpha/rank * B @ A added (token_embd in its
transposed form, as llama.cpp does), and is written in the chosen type: `keep` (default) requantizes to the
tensor's own type so a Q4_K_M base stays Q4_K_M-sized (llama.cpp writes F16); any other type forces merged
tensors to it. Untouched tensors are copied byte for byte; metadata (tokenizer, chat template) carries over and
general.file_type says what the file holds. Streams tensor by tensor: memory is one tensor plus the adapters.

Unlike llama.cpp, adapters need not touch the same tensors; they may be GGUF adapters, PEFT folders or GGLA,
and PEFT's DoRA adapters and modules_to_save weights (which llama.cpp's converter refuses) merge too: full
weights replace the base's, a tied base gains an output.weight, and a vocabulary grown for new tokens takes
their names from the PEFT folder's tokenizer files (toolkit/merge.py says how each part applies).
`--outtype hf -o DIR` writes the merged model as a transformers folder (toolkit/hf_dir.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf.gguf_writer import GGUFValue

from toolkit.adapter import EMBD, Adapter
from toolkit.config import arg, parse_config, parse_lora_flags
from toolkit.errors import ToolkitError
from toolkit.gguf_io import GGUFFile, TensorSpec, as_qtype, copy_metadata, open_gguf, write_gguf
from toolkit.merge import (
    base_tensor_name,
    file_type,
    load_adapters,
    merged_shape,
    merged_weight,
    touched,
)
from toolkit.quants import dequant_problem, encode, quantize_problem, tensor_float

from .quantize import ALIASES, FTYPES, fallback, parse_ftype

OUTPUT = "output.weight"


def out_type(g: GGUFFile, name: str, outtype: str, shape: tuple[int, ...] | None = None) -> Q:
    """The type a merged tensor is written in: its own (`keep`; a tied base's new output: token_embd's), or the
    forced one (with llama.cpp's fallback for rows that do not split into the type's blocks). 1-D tensors (norms)
    stay as they are."""
    ti = g.tensors[base_tensor_name(g, name)]
    if outtype == "keep" or len(ti.shape) < 2:
        return ti.qtype
    return fallback((shape or ti.shape)[-1], forced_type(outtype))


def forced_type(outtype: str) -> Q:
    """'q8_0' / 'Q4_K' / a llama-quantize name such as 'Q4_K_M' (its base type) -> the GGML type."""
    key = outtype.upper()
    if key in FTYPES or key in ALIASES:
        return parse_ftype(key)[1]
    return as_qtype(outtype)


def tensor_names(g: GGUFFile, adapters: Sequence[tuple[Adapter, float]]) -> list[str]:
    """The merged file's tensors: the base's, plus output.weight where full weights (modules_to_save) untie a
    tied base (PEFT's lm_head then is the trained copy, or the original embedding when only that was saved)."""
    names = list(g.tensors)
    if OUTPUT in g.tensors or not any(EMBD in ad.weights or OUTPUT in ad.weights for ad, _ in adapters):
        return names
    return names[: names.index(EMBD) + 1] + [OUTPUT] + names[names.index(EMBD) + 1:]


def grown_vocab(g: GGUFFile, meta: dict[str, Any], adapters: Sequence[tuple[Adapter, float]]) -> None:
    """Extend tokenizer.ggml.tokens / scores / token_type with the adapters' added tokens (the grown vocabulary):
    special tokens CONTROL, others USER_DEFINED, unnamed ids UNUSED padding, as llama.cpp's converter does."""
    n_vocab = merged_shape(g, EMBD, adapters)[0]
    tokens = list(g.get("tokenizer.ggml.tokens") or [])
    if n_vocab <= len(tokens):
        return
    added = {i: (text, special) for ad, _ in adapters for i, text, special in ad.added_tokens}
    missing = [i for i in range(len(tokens), n_vocab) if i not in added]
    if missing:
        raise ToolkitError(f"the merged vocabulary has {n_vocab} tokens, the base {len(tokens)}, and no name for "
                           f"token {missing[0]}", adapters[0][0].path)
    new = [added[i] for i in range(len(tokens), n_vocab)]
    meta["tokenizer.ggml.tokens"] = GGUFValue(tokens + [t for t, _ in new], V.ARRAY, V.STRING)
    kinds = [5 if t.startswith("[PAD") and not sp else 3 if sp else 4 for t, sp in new]  # UNUSED, CONTROL, USER
    if g.get("tokenizer.ggml.token_type") is not None:
        meta["tokenizer.ggml.token_type"] = GGUFValue(list(g.get("tokenizer.ggml.token_type")) + kinds, V.ARRAY,
                                                      V.INT32)
    if g.get("tokenizer.ggml.scores") is not None:
        meta["tokenizer.ggml.scores"] = GGUFValue(list(g.get("tokenizer.ggml.scores")) + [-1000.0] * len(new),
                                                  V.ARRAY, V.FLOAT32)
    if g.arch_get("vocab_size") is not None:
        meta[f"{g.arch}.vocab_size"] = GGUFValue(n_vocab, V.UINT32)


def export_lora(base: str | Path, out: str | Path, loras: Sequence[tuple[str, float]], outtype: str = "keep",
                threads: int | None = None, progress: bool = True) -> dict[str, Q]:
    """Merge `loras` [(path, scale)] into the GGUF `base`, write `out`; returns the type of every tensor written."""
    if threads:
        torch.set_num_threads(threads)
    g = open_gguf(base)
    outtype = outtype.lower()
    if outtype != "keep":
        forced_type(outtype)  # unknown names fail before any work
    if Path(out).resolve() == Path(base).resolve():
        raise ToolkitError("output would overwrite the base model", str(out))
    adapters = load_adapters(g, loras)
    changed = touched(adapters)
    for n in sorted(changed & set(g.tensors)):  # before the output file is started
        why = dequant_problem(g.tensors[n].qtype)
        if why is not None:
            raise ToolkitError(f"tensor '{n}': {why}", g.path)
    names = tensor_names(g, adapters)
    shapes = {n: merged_shape(g, n, adapters) if n in changed else g.tensors[base_tensor_name(g, n)].shape
              for n in names}
    types = {n: (out_type(g, n, outtype, shapes[n]) if n in changed else g.tensors[base_tensor_name(g, n)].qtype)
             for n in names}
    for n in sorted(changed & set(names)):
        why = quantize_problem(types[n])
        if why is not None:
            raise ToolkitError(f"merged tensor '{n}' cannot be written as {types[n].name} ({why}): give --outtype "
                               "f16, q8_0 or another type", g.path)
    meta = copy_metadata(g)
    meta["general.file_type"] = file_type(types, g)
    grown_vocab(g, meta, adapters)

    def data(name: str):
        if name not in changed:
            return g.tensors[base_tensor_name(g, name)].raw()  # byte for byte
        return encode(merged_weight(g, name, adapters), types[name])

    specs = [TensorSpec(n, types[n], shapes[n], lambda n=n: data(n)) for n in names]
    write_gguf(out, meta, specs, progress=progress)
    return types


def export_lora_hf(base: str | Path, out: str | Path, loras: Sequence[tuple[str, float]],
                   threads: int | None = None, progress: bool = True, dtype: str = "F32") -> None:
    """`toolkit export-lora --outtype hf`: the merged model as a transformers folder."""
    from toolkit.hf_dir import write_hf_dir

    if threads:
        torch.set_num_threads(threads)
    g = open_gguf(base)
    adapters = load_adapters(g, loras)
    if any(ad.weights for ad, _ in adapters):
        raise ToolkitError("--outtype hf with full weights (modules_to_save) is not supported: merge to GGUF",
                           adapters[0][0].path)
    changed = touched(adapters)

    def weight(name: str) -> torch.Tensor:
        return merged_weight(g, name, adapters) if name in changed else tensor_float(g.tensors[name], copy=True)

    write_hf_dir(g, out, weight, dtype=dtype, progress=progress)


@dataclass
class ExportLoraConfig:
    model: str = arg(None, "-m", "--model", help="base GGUF model", required=True)
    output: str = arg(None, "-o", "--output", help="merged GGUF to write (a folder with --outtype hf)",
                      required=True)
    lora: list[str] = arg([], "--lora", action="append", metavar="FNAME",
                          help="LoRA adapter (GGUF, PEFT folder or GGLA), scale 1; repeatable or comma-separated")
    lora_scaled: list[list[str]] = arg([], "--lora-scaled", action="append", nargs="+", metavar="FNAME SCALE",
                                       help="adapter with a scale: FNAME SCALE, or FNAME:SCALE,...; repeatable")
    outtype: str = arg("keep", help="keep (each merged tensor in its own type), f32, f16, bf16, q8_0, q4_k, ... "
                                    "or hf (a transformers folder)")
    threads: int = arg(None, "-t", "--threads", help="CPU threads (default: torch's)")
    progress: bool = arg(True, help="show a progress bar")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ExportLoraConfig, argv, prog="toolkit export-lora",
                       description="merge LoRA adapters into a GGUF base model")
    loras = parse_lora_flags(cfg.lora, cfg.lora_scaled)
    if cfg.outtype.lower() == "hf":
        export_lora_hf(cfg.model, cfg.output, loras, threads=cfg.threads, progress=cfg.progress)
        print(f"wrote {cfg.output}")
        return 0
    types = export_lora(cfg.model, cfg.output, loras, cfg.outtype, cfg.threads, cfg.progress)
    print(f"wrote {cfg.output}: {len(types)} tensors")
    return 0
