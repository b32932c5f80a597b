"""Adapters merged into a GGUF base's weights, tensor by tensor: what `toolkit export-lora` writes as GGUF and
`--outtype hf` as a transformers folder (the core, so neither command module imports the other).

merged_weight(g, name, adapters) = the base tensor (dequantized) with each adapter's part applied:
  * a LoRA pair: + user_scale * alpha/rank * B @ A (token_embd in its transposed form, as llama.cpp does);
  * a DoRA pair: + user_scale * (m / ||W + s B A||_row * (W + s B A) - W), W the original base tensor (so several
    adapters add up as they do unmerged; PEFT's own merge of two DoRA adapters on one layer compounds instead);
  * a full replacement (norms, modules_to_save weights): that tensor instead of the base's, which may have more
    rows than the base when the vocabulary grew.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as FT

from .adapter import Adapter, read_adapter
from .errors import ToolkitError
from .gguf_io import GGUFFile
from .quants import tensor_float

# the file type llama.cpp's loader would guess from a file's most common weight type
FILE_TYPE_OF: dict[Q, FT] = {
    Q.F32: FT.ALL_F32, Q.F16: FT.MOSTLY_F16, Q.BF16: FT.MOSTLY_BF16, Q.Q4_0: FT.MOSTLY_Q4_0,
    Q.Q4_1: FT.MOSTLY_Q4_1, Q.Q5_0: FT.MOSTLY_Q5_0, Q.Q5_1: FT.MOSTLY_Q5_1, Q.Q8_0: FT.MOSTLY_Q8_0,
    Q.Q2_K: FT.MOSTLY_Q2_K, Q.Q3_K: FT.MOSTLY_Q3_K_M, Q.Q4_K: FT.MOSTLY_Q4_K_M, Q.Q5_K: FT.MOSTLY_Q5_K_M,
    Q.Q6_K: FT.MOSTLY_Q6_K, Q.IQ4_NL: FT.MOSTLY_IQ4_NL, Q.IQ4_XS: FT.MOSTLY_IQ4_XS,
    Q.IQ3_S: FT.MOSTLY_IQ3_S, Q.IQ3_XXS: FT.MOSTLY_IQ3_XXS, Q.IQ2_S: FT.MOSTLY_IQ2_S, Q.IQ2_XS: FT.MOSTLY_IQ2_XS,
    Q.IQ2_XXS: FT.MOSTLY_IQ2_XXS, Q.IQ1_S: FT.MOSTLY_IQ1_S, Q.IQ1_M: FT.MOSTLY_IQ1_M, Q.TQ1_0: FT.MOSTLY_TQ1_0,
    Q.TQ2_0: FT.MOSTLY_TQ2_0, Q.MXFP4: FT.MOSTLY_MXFP4_MOE, Q.NVFP4: FT.MOSTLY_NVFP4, Q.Q1_0: FT.MOSTLY_Q1_0,
}


def check_conflicts(adapters: Sequence[tuple[Adapter, float]]) -> None:
    """Adapters whose tensor sets cannot be combined: two full replacements of one tensor that disagree."""
    seen: dict[str, tuple[str, torch.Tensor]] = {}
    for ad, _ in adapters:
        for name, w in ad.replaced.items():
            if name in seen and not torch.equal(seen[name][1], w):
                raise ToolkitError(f"adapters {seen[name][0]} and {ad.path} both replace '{name}' with different "
                                   f"values: merge them one at a time", ad.path)
            seen[name] = (ad.path, w)


def touched(adapters: Sequence[tuple[Adapter, float]]) -> set[str]:
    """GGUF names of the tensors a merge changes (or adds: output.weight over a tied base)."""
    return {n for ad, _ in adapters for n in (*ad.tensors, *ad.replaced)}


def merged_shape(g: GGUFFile, name: str, adapters: Sequence[tuple[Adapter, float]]) -> tuple[int, ...]:
    """The merged tensor's torch shape: a replacement's (grown vocabulary) or the base's."""
    for ad, _ in reversed(adapters):
        if name in ad.replaced:
            return tuple(ad.replaced[name].shape) if ad.replaced[name].ndim > 1 else g.tensors[name].shape
    return g.tensors[base_tensor_name(g, name)].shape


def base_tensor_name(g: GGUFFile, name: str) -> str:
    """The base tensor behind `name`: a tied base's output is token_embd."""
    return "token_embd.weight" if name == "output.weight" and name not in g.tensors else name


def merged_weight(g: GGUFFile, name: str, adapters: Sequence[tuple[Adapter, float]]) -> torch.Tensor:
    """float32 weight (torch shape) of base tensor `name` with every adapter's scaled part applied."""
    ti = g.tensors[base_tensor_name(g, name)]
    w0 = tensor_float(ti, copy=True)
    w = w0.clone()  # the mmap view is copy-on-write; own it anyway
    for ad, user_scale in adapters:
        if name in ad.replaced:
            new = ad.replaced[name].float()
            w = new.reshape(ti.shape).clone() if new.ndim < 2 else new.clone()
        if name in ad.tensors:
            w += ad.delta(name, w0).reshape(ti.shape) * user_scale
    return w


def file_type(types: dict[str, Q], g: GGUFFile) -> int:
    """general.file_type that tells the truth: the base's when no weight changed type, else the most common
    weight type's (what llama.cpp's loader guesses)."""
    weights = {n: q for n, q in types.items() if n in g.tensors and len(g.tensors[n].shape) >= 2}
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
