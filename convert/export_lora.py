"""`toolkit export-lora -m base.gguf -o merged.gguf --lora a.gguf --lora-scaled b.gguf 0.5`: llama-export-lora.

Each tensor an adapter touches is dequantized, gets user_scale * alpha/rank * B @ A added (token_embd in its
transposed form, as llama.cpp does), and is written in the chosen type: `keep` (default) requantizes to the
tensor's own type so a Q4_K_M base stays Q4_K_M-sized (llama.cpp writes F16); any other type forces merged
tensors to it. Untouched tensors are copied byte for byte; metadata (tokenizer, chat template) carries over and
general.file_type says what the file holds. Streams tensor by tensor: memory is one tensor plus the adapters.

Unlike llama.cpp, adapters need not touch the same tensors; they may be GGUF adapters, PEFT folders or GGLA.
`--outtype hf -o DIR` writes the merged model as a transformers folder (see convert/model.py).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as FT

from toolkit.adapter import Adapter, read_adapter
from toolkit.config import arg, parse_config, parse_lora_flags
from toolkit.errors import ToolkitError
from toolkit.gguf_io import GGUFFile, TensorSpec, as_qtype, copy_metadata, open_gguf, write_gguf
from toolkit.quants import encode, tensor_float

from .quantize import ALIASES, FTYPES, fallback, parse_ftype

# the file type llama.cpp's loader would guess from a file's most common weight type
FILE_TYPE_OF: dict[Q, FT] = {
    Q.F32: FT.ALL_F32, Q.F16: FT.MOSTLY_F16, Q.BF16: FT.MOSTLY_BF16, Q.Q4_0: FT.MOSTLY_Q4_0,
    Q.Q4_1: FT.MOSTLY_Q4_1, Q.Q5_0: FT.MOSTLY_Q5_0, Q.Q5_1: FT.MOSTLY_Q5_1, Q.Q8_0: FT.MOSTLY_Q8_0,
    Q.Q2_K: FT.MOSTLY_Q2_K, Q.Q3_K: FT.MOSTLY_Q3_K_M, Q.Q4_K: FT.MOSTLY_Q4_K_M, Q.Q5_K: FT.MOSTLY_Q5_K_M,
    Q.Q6_K: FT.MOSTLY_Q6_K, Q.IQ4_NL: FT.MOSTLY_IQ4_NL, Q.IQ4_XS: FT.MOSTLY_IQ4_XS,
}


def check_conflicts(adapters: Sequence[tuple[Adapter, float]]) -> None:
    """Adapters whose tensor sets cannot be combined: two full replacements of one norm that disagree."""
    seen: dict[str, tuple[str, torch.Tensor]] = {}
    for ad, _ in adapters:
        for name, w in ad.norms.items():
            if name in seen and not torch.equal(seen[name][1], w):
                raise ToolkitError(f"adapters {seen[name][0]} and {ad.path} both replace '{name}' with different "
                                   f"values: merge them one at a time", ad.path)
            seen[name] = (ad.path, w)


def out_type(g: GGUFFile, name: str, outtype: str) -> Q:
    """The type a merged tensor is written in: its own (`keep`), or the forced one (with llama.cpp's fallback
    for rows that do not split into the type's blocks). 1-D tensors (norms) stay as they are."""
    ti = g.tensors[name]
    if outtype == "keep" or len(ti.shape) < 2:
        return ti.qtype
    return fallback(ti.shape[-1], forced_type(outtype))


def forced_type(outtype: str) -> Q:
    """'q8_0' / 'Q4_K' / a llama-quantize name such as 'Q4_K_M' (its base type) -> the GGML type."""
    key = outtype.upper()
    if key in FTYPES or key in ALIASES:
        return parse_ftype(key)[1]
    return as_qtype(outtype)


def merged_weight(g: GGUFFile, name: str, adapters: Sequence[tuple[Adapter, float]]) -> torch.Tensor:
    """float32 weight (torch shape) of base tensor `name` with every adapter's scaled delta added."""
    ti = g.tensors[name]
    w = tensor_float(ti, copy=True)  # the mmap view is copy-on-write; own it anyway
    for ad, user_scale in adapters:
        if name in ad.norms:
            w = ad.norms[name].float().reshape(ti.shape).clone()
        if name in ad.tensors:
            w += ad.delta(name).reshape(ti.shape) * user_scale
    return w


def file_type(types: dict[str, Q], g: GGUFFile) -> int:
    """general.file_type that tells the truth: the base's when no weight changed type, else the most common
    weight type's (what llama.cpp's loader guesses)."""
    weights = {n: q for n, q in types.items() if len(g.tensors[n].shape) >= 2}
    if all(g.tensors[n].qtype == q for n, q in weights.items()) and g.get("general.file_type") is not None:
        return int(g.get("general.file_type"))
    common, _ = Counter(weights.values()).most_common(1)[0]
    return int(FILE_TYPE_OF.get(common, FT.GUESSED))


def load_adapters(g: GGUFFile, loras: Sequence[tuple[str, float]]) -> list[tuple[Adapter, float]]:
    if not loras:
        raise ToolkitError("no adapters: give --lora FNAME or --lora-scaled FNAME SCALE")
    if g.get("general.type") == "adapter":
        raise ToolkitError("-m must be a base model, this is a LoRA adapter", g.path)
    adapters = [(read_adapter(path, base=g), scale) for path, scale in loras]  # arch + shapes checked here
    check_conflicts(adapters)
    return adapters


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
    touched = {n for ad, _ in adapters for n in (*ad.tensors, *ad.norms)}
    types = {n: (out_type(g, n, outtype) if n in touched else ti.qtype) for n, ti in g.tensors.items()}
    meta = copy_metadata(g)
    meta["general.file_type"] = file_type(types, g)

    def data(name: str):
        if name not in touched:
            return g.tensors[name].raw()  # byte for byte
        return encode(merged_weight(g, name, adapters), types[name])

    specs = [TensorSpec(n, types[n], ti.shape, lambda n=n: data(n)) for n, ti in g.tensors.items()]
    write_gguf(out, meta, specs, progress=progress)
    return types


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
        from .model import export_lora_hf

        export_lora_hf(cfg.model, cfg.output, loras, threads=cfg.threads, progress=cfg.progress)
        print(f"wrote {cfg.output}")
        return 0
    types = export_lora(cfg.model, cfg.output, loras, cfg.outtype, cfg.threads, cfg.progress)
    print(f"wrote {cfg.output}: {len(types)} tensors")
    return 0
