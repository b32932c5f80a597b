"""Adapter: the one in-memory form of a LoRA adapter, and its readers/writers (GGUF adapter, PEFT dir, GGLA).

Canonical form (what every reader produces and every writer consumes):
  * tensors keyed by the GGUF *base weight* name (`blk.3.attn_q.weight`), each a LoraPair in PEFT orientation:
    a [r, in], b [out, r], delta = scale * b @ a, against the base tensor's torch shape (out, in).
    q/k rows are in GGUF (llama.cpp-permuted) order, so the delta adds straight onto the GGUF weight.
  * `token_embd.weight` (torch (n_vocab, n_embd)) is an embedding, stored like PEFT's lora_embedding_A/B:
    a [r, n_vocab], b [n_embd, r], delta = scale * (b @ a).T. llama.cpp gathers rows of its lora_a
    (ggml ne [r, n_vocab] = torch (n_vocab, r) = a.T) by token and multiplies by lora_b (= b); see
    llm_build_inp_embd and convert_lora_to_gguf.py, which transposes only token_embd's lora_a.
  * norm weights (1-D, torch (n,)) may carry a LoRA pair (old finetune: a [r, n], b [1, r]; delta [1, n]) or a
    full replacement weight in `norms` (mergekit-extract-lora's saved norms). llama.cpp ignores both.
  * one `alpha` for the file: scale(name) = alpha / rank(name), alpha 0 meaning 1.0 (llama.cpp's rule).
    Per-module alphas and rsLoRA are folded into B when a PEFT adapter is read, so the GGUF form is exact.
  * DoRA (PEFT use_dora): the pair also holds `magnitude` [out] (PEFT's lora_magnitude_vector, rows in GGUF
    order like B's). The adapted weight is m / ||W + s B A||_row * (W + s B A), the norm over each output row's
    inputs (PEFT's get_weight_norm, a constant: no gradient), so its delta needs the base weight W:
    `delta(name, W)`. llama.cpp's adapter format has no place for m: only merged (export-lora) or unmerged here.
  * `weights`: full replacement weights (PEFT modules_to_save: token_embd / output, or any 2-D weight), in the
    GGUF tensor's torch shape and row order; token_embd / output may have more rows than the base (a vocabulary
    grown for new tokens, listed in `added_tokens` as (id, text, special)).
"""
from __future__ import annotations

import json
import math
import re
import struct
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from . import names as N
from .errors import ToolkitError
from .fileutil import atomic_path
from .gguf_io import GGUFFile, TensorInfo, TensorSpec, open_gguf, write_gguf
from .quants import block_size, dequant_problem, encode, tensor_float

Tensor = torch.Tensor
EMBD = "token_embd.weight"
OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
PEFT_PREFIX = "base_model.model."
TOOLKIT_PEFT_KEY = "toolkit.peft.adapter_config"  # the PEFT config a GGUF came from (llama.cpp ignores it)
_OWN_KEYS = {"general.architecture", "general.type", "adapter.type", "adapter.lora.alpha", TOOLKIT_PEFT_KEY,
             "general.base_model.count", "general.base_model.0.name"}


def is_embedding(name: str) -> bool:
    return name.endswith(EMBD)  # llama.cpp: str_endswith(name, "token_embd.weight")


def is_norm(name: str) -> bool:
    return name.endswith("_norm.weight")


@dataclass
class LoraPair:
    a: Tensor  # [r, in]   (token_embd: [r, n_vocab])
    b: Tensor  # [out, r]  (token_embd: [n_embd, r])
    magnitude: Tensor | None = None  # DoRA: [out], PEFT's lora_magnitude_vector (None: plain LoRA)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class Adapter:
    tensors: dict[str, LoraPair]
    alpha: float = 0.0
    arch: str = ""
    base_model: str = ""
    norms: dict[str, Tensor] = field(default_factory=dict)  # full norm weights that replace the base's
    extra: dict[str, Any] = field(default_factory=dict)  # 'metadata' (other GGUF keys), 'peft_config'
    path: str = ""
    weights: dict[str, Tensor] = field(default_factory=dict)  # full 2-D weights that replace the base's
    added_tokens: list[tuple[int, str, bool]] = field(default_factory=list)  # (id, text, special) past the base

    def rank(self, name: str) -> int:
        return self.tensors[name].rank

    def scale(self, name: str) -> float:
        """alpha / rank (alpha 0: 1.0), before the user's scale."""
        return self.alpha / self.rank(name) if self.alpha else 1.0

    def delta(self, name: str, base: Tensor | None = None) -> Tensor:
        """What the adapter adds to base weight `name`, float32 shaped like it (torch order): scale * B @ A,
        or for a DoRA pair (which needs the base weight `base`) m / ||W + s B A||_row * (W + s B A) - W."""
        p = self.tensors[name]
        d = (p.b.float() @ p.a.float()) * self.scale(name)
        if p.magnitude is None:
            return d.T.contiguous() if is_embedding(name) else d
        if base is None:
            raise ToolkitError(f"'{name}' is a DoRA tensor: its delta needs the base weight", self.path)
        w = base.float().reshape(d.shape)
        return dora_factor(w, d, p.magnitude)[:, None] * (w + d) - w

    @property
    def is_dora(self) -> bool:
        return any(p.magnitude is not None for p in self.tensors.values())

    @property
    def replaced(self) -> dict[str, Tensor]:
        """Every full replacement weight: norms and modules_to_save weights."""
        return {**self.norms, **self.weights}

    @property
    def targets(self) -> list[str]:
        return list(self.tensors) + list(self.norms) + list(self.weights)


def dora_factor(w: Tensor, d: Tensor, magnitude: Tensor) -> Tensor:
    """m / ||W + d|| per output row ([out]), float32: PEFT's DoRA factor, d = s * B @ A in W's layout."""
    return magnitude.float() / torch.linalg.norm(w.float() + d.float(), dim=1)


# --- the base model an adapter is checked against --------------------------------------------------------

@dataclass
class BaseInfo:
    arch: str
    n_head: int
    n_head_kv: int
    shapes: dict[str, tuple[int, ...]]  # GGUF tensor name -> torch shape
    tied: bool
    name: str = ""
    path: str = ""

    @classmethod
    def of(cls, base: BaseInfo | GGUFFile | str | Path | None) -> BaseInfo | None:
        if base is None or isinstance(base, BaseInfo):
            return base
        if isinstance(base, GGUFFile):
            return cls.from_gguf(base)
        p = Path(base)
        return cls.from_hf_dir(p) if p.is_dir() else cls.from_gguf(open_gguf(p))

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> BaseInfo:
        def first(v: Any) -> int:
            return int(v[0] if isinstance(v, list) else v)

        try:
            n_head = first(g.arch_get("attention.head_count", 0))
            n_kv = first(g.arch_get("attention.head_count_kv", n_head))
        except (ValueError, TypeError, IndexError):
            raise ToolkitError("attention.head_count / head_count_kv are not integers", g.path) from None
        shapes = {n: t.shape for n, t in g.tensors.items()}
        for name, shape in shapes.items():  # q/k rows are permuted over the heads: the counts must split them
            heads = N.qk_heads(name, n_head, n_kv)
            if heads is not None and shape and (heads <= 0 or shape[0] % (2 * heads)):
                raise ToolkitError(f"tensor '{name}' has {shape[0]} rows, which {heads} heads cannot split", g.path)
        return cls(g.arch, n_head, n_kv, shapes, "output.weight" not in shapes, str(g.get("general.name", "")), g.path)

    @classmethod
    def from_hf_dir(cls, path: Path) -> BaseInfo:
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ToolkitError("no config.json: --base must be a GGUF model or a Hugging Face model folder", str(path))
        cfg = json.loads(cfg_path.read_text())
        text = cfg.get("text_config") or cfg
        arch = N.arch_from_hf_model_type(str(text.get("model_type", cfg.get("model_type", ""))), str(cfg_path))
        n_head = int(text.get("num_attention_heads", 0))
        n_kv = int(text.get("num_key_value_heads") or n_head)
        tied = bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", arch.startswith("gemma"))))
        shapes: dict[str, tuple[int, ...]] = {}
        for st in sorted(path.glob("*.safetensors")):
            for hf_name, shape in _safetensors_shapes(st).items():
                gg = N.hf_to_gguf(arch, hf_name)
                if gg is not None:
                    shapes[gg] = shape
        if tied:
            shapes.pop("output.weight", None)
        return cls(arch, n_head, n_kv, shapes, tied, str(cfg.get("_name_or_path", path.name)), str(path))


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ToolkitError(f"corrupt safetensors file ({str(e).splitlines()[0]})", str(path)) from None


# --- validation against a base (llama.cpp's rules, on canonical shapes) ------------------------------------

def check_against_base(adapter: Adapter, base: BaseInfo, path: str, tied_output_ok: bool = False) -> None:
    """Raise what llama.cpp's llama_adapter_lora_init_impl raises, with one clear line each.

    tied_output_ok: accept a LoRA on `output.weight` for a base whose output is token_embd (toolkit's model
    applies it to the output projection only; llama.cpp has no such tensor and refuses)."""
    shapes = dict(base.shapes)
    if tied_output_ok and base.tied and EMBD in shapes:
        shapes.setdefault("output.weight", shapes[EMBD])
    if adapter.arch and base.arch and adapter.arch != base.arch:
        raise ToolkitError(f"adapter is for architecture '{adapter.arch}' but the base model is '{base.arch}' "
                           f"(llama.cpp: model arch and LoRA arch mismatch)", path)
    for name, pair in adapter.tensors.items():
        if name not in shapes:
            raise ToolkitError(_missing_msg(name, base), path)
        shape = shapes[name]
        out, inp = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        if is_embedding(name):
            out, inp = inp, out  # a [r, n_vocab], b [n_embd, r]
        if tuple(pair.a.shape[1:]) != (inp,) or tuple(pair.b.shape[:1]) != (out,):
            raise ToolkitError(f"tensor '{name}' has incorrect shape: lora_a {list(pair.a.shape)}, lora_b "
                               f"{list(pair.b.shape)} for a base weight of {list(shape)} (hint: maybe wrong base "
                               f"model?)", path)
        if pair.magnitude is not None and tuple(pair.magnitude.shape) != (out,):
            raise ToolkitError(f"tensor '{name}': DoRA magnitude has shape {list(pair.magnitude.shape)}, the base "
                               f"weight has {out} rows", path)
    for name, w in adapter.weights.items():
        want = base.shapes.get(name, base.shapes.get(EMBD) if name == "output.weight" and base.tied else None)
        if want is None:
            raise ToolkitError(_missing_msg(name, base), path)
        vocab = name in (EMBD, "output.weight")
        if w.ndim != 2 or w.shape[1] != want[1] or (w.shape[0] != want[0] and not (vocab and w.shape[0] > want[0])):
            raise ToolkitError(f"full weight '{name}' has shape {list(w.shape)}, the base {list(want)}", path)
    for name, w in adapter.norms.items():
        if name not in base.shapes:
            raise ToolkitError(_missing_msg(name, base), path)
        if w.numel() != int(np.prod(base.shapes[name])):
            raise ToolkitError(f"norm tensor '{name}' has {w.numel()} values, the base has "
                               f"{list(base.shapes[name])}", path)


def _missing_msg(name: str, base: BaseInfo) -> str:
    hint = "maybe wrong base model?"
    if name == "output.weight" and base.tied:
        hint = "the base ties output to token_embd, so llama.cpp has no output tensor to adapt; load the PEFT form"
    return f"LoRA tensor '{name}' does not exist in base model (hint: {hint})"


# --- reading -----------------------------------------------------------------------------------------------

def read_adapter(path: str | Path, base: BaseInfo | GGUFFile | str | Path | None = None) -> Adapter:
    """GGUF adapter, PEFT directory or GGLA file -> Adapter; checked against `base` when given."""
    p = Path(path)
    if not p.exists():
        raise ToolkitError("no such file or directory", str(p))
    info = BaseInfo.of(base)
    if p.is_dir():
        adapter = read_peft(p, info)
    else:
        with open(p, "rb") as fh:
            magic = fh.read(4)
        if magic == b"GGUF":
            adapter = read_gguf_adapter(p, info)
        elif magic == b"algg":
            adapter = read_ggla(p, info)
        else:
            raise ToolkitError(f"not a LoRA adapter (magic {magic!r}; expected a GGUF adapter, a GGLA file or a PEFT "
                               f"directory)", str(p))
    if info is not None:
        check_against_base(adapter, info, str(p), tied_output_ok=p.is_dir())
    return adapter


def _to_f32(t: TensorInfo, path: str = "") -> Tensor:
    """An adapter tensor's float32 values (quants.tensor_float, memory of its own); integer types are refused."""
    why = dequant_problem(t.qtype)  # I8..I64, or a block type nothing here reads
    if why is not None:
        raise ToolkitError(f"tensor '{t.name}' has type {t.qtype.name}, which a LoRA adapter cannot hold ({why})",
                           path or None)
    return tensor_float(t, copy=True)


def _old_layout(a: Tensor, b: Tensor, name: str) -> LoraPair:
    """Old finetune / GGLA layout (ggml a ne [r, in], b ne [r, out] -> torch a (in, r), b (out, r)) -> canonical.

    The old delta is ggml_mul_mat(a, b) = b @ a.T in torch: linear A = a.T, B = b; token_embd swaps roles."""
    if is_embedding(name):
        return LoraPair(b.T.contiguous(), a.contiguous())  # a [r, n_vocab], b [n_embd, r]
    return LoraPair(a.T.contiguous(), b.contiguous())


def _warn_norms(path: str) -> None:
    warnings.warn(f"{path}: applying the adapter's norm tensors, which llama.cpp ignores (its results will differ)",
                  stacklevel=3)


def read_gguf_adapter(path: str | Path, base: BaseInfo | None = None) -> Adapter:
    g = open_gguf(path)
    p = g.path
    if g.get("training.type") == "finetune_lora":
        return _read_finetune_checkpoint(g, base)
    gtype = g.get("general.type")
    if gtype != "adapter":
        raise ToolkitError(f"general.type is '{gtype or ''}', expected 'adapter' (not a LoRA adapter GGUF)", p)
    if base is not None and g.arch != base.arch:
        raise ToolkitError(f"adapter is for architecture '{g.arch}' but the base model is '{base.arch}' "
                           f"(llama.cpp: model arch and LoRA arch mismatch)", p)
    atype = g.get("adapter.type")
    if atype != "lora":
        raise ToolkitError(f"adapter.type is '{atype or ''}', expected 'lora'", p)
    alpha = float(g.get("adapter.lora.alpha", 0.0))
    pairs: dict[str, dict[str, TensorInfo]] = {}
    norm_infos: dict[str, TensorInfo] = {}
    for name, t in g.tensors.items():
        if name.endswith((".lora_a", ".lora_b")):
            pairs.setdefault(name[:-7], {})[name[-1]] = t
        elif is_norm(name):
            norm_infos[name] = t
        else:
            raise ToolkitError(f"LoRA tensor '{name}' has unexpected suffix (expected .lora_a or .lora_b)", p)
    for name, ab in pairs.items():
        if len(ab) != 2:
            raise ToolkitError(f"LoRA tensor pair for '{name}' is missing one component "
                               f"({'lora_b' if 'a' in ab else 'lora_a'})", p)
    tensors: dict[str, LoraPair] = {}
    for name, ab in pairs.items():
        ta, tb = ab["a"], ab["b"]
        if base is not None and name not in base.shapes:
            raise ToolkitError(_missing_msg(name, base), p)
        if len(ta.shape) != 2 or len(tb.shape) != 2:
            raise ToolkitError(f"tensor '{name}': lora_a and lora_b must be 2-D", p)
        _check_gguf_shapes(name, ta.shape, tb.shape, base, p)
        a, b = _to_f32(ta, p), _to_f32(tb, p)
        tensors[name] = LoraPair(a.T.contiguous(), b) if is_embedding(name) else LoraPair(a, b)
    norms = {n: _to_f32(t, p).reshape(-1) for n, t in norm_infos.items()}
    if norms or any(is_norm(n) for n in tensors):
        _warn_norms(p)
    meta = {k: v for k, v in g.types.items() if k not in _OWN_KEYS}
    extra: dict[str, Any] = {"metadata": meta}
    if TOOLKIT_PEFT_KEY in g.metadata:
        extra["peft_config"] = json.loads(g.metadata[TOOLKIT_PEFT_KEY])
    return Adapter(tensors, alpha, g.arch, str(g.get("general.base_model.0.name", "")), norms, extra, p)


def _check_gguf_shapes(name: str, a: tuple[int, ...], b: tuple[int, ...], base: BaseInfo | None, path: str) -> None:
    """llama.cpp's shape rules, in torch order: a (r, in), b (out, r); token_embd a (n_vocab, r), b (n_embd, r)."""
    if is_embedding(name):
        if base is not None:
            n_vocab, n_embd = base.shapes[name]
            if b[0] != n_embd or a[0] != n_vocab:
                raise ToolkitError(f"tensor '{name}' has incorrect shape (hint: maybe wrong base model?)", path)
        if a[1] != b[1]:
            raise ToolkitError(f"tensor '{name}': lora_a rank {a[1]} != lora_b rank {b[1]}", path)
        return
    old = a[0] != b[1] and a[1] == b[1]  # old finetune: a (in, r), b (out, r)
    if base is not None:
        shape = base.shapes[name]
        out, inp = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        if a[1] != inp or b[0] != out:
            hint = "maybe wrong base model?"
            if old and a[0] == inp and b[0] == out:
                hint = ("lora_a is not transposed: this is the old finetune layout, which llama.cpp no longer loads; "
                        "`toolkit convert lora` reads old GGLA/checkpoint files")
            raise ToolkitError(f"tensor '{name}' has incorrect shape (hint: {hint})", path)
    if a[0] != b[1]:
        raise ToolkitError(f"tensor '{name}': lora_a is not transposed (hint: adapter from the old \"finetune\" "
                           f"example; llama.cpp no longer loads it)", path)


def _read_finetune_checkpoint(g: GGUFFile, base: BaseInfo | None) -> Adapter:
    """Old llama.cpp `finetune` checkpoint: LoRA tensors in the old layout, trained without a scale (alpha 0)."""
    tensors: dict[str, LoraPair] = {}
    for name, t in g.tensors.items():
        if name.endswith(".lora_a"):
            tb = g.tensors.get(name[:-1] + "b")
            if tb is None:
                raise ToolkitError(f"LoRA tensor pair for '{name[:-7]}' is missing one component (lora_b)", g.path)
            tensors[name[:-7]] = _old_layout(_to_f32(t, g.path), _to_f32(tb, g.path), name[:-7])
    if not tensors:
        raise ToolkitError("finetune checkpoint holds no LoRA tensors", g.path)
    if any(is_norm(n) for n in tensors):
        _warn_norms(g.path)
    return Adapter(tensors, 0.0, g.arch or "llama", "", {}, {"metadata": {}}, g.path)


def read_ggla(path: str | Path, base: BaseInfo | None = None) -> Adapter:
    """The pre-GGUF LoRA file of convert-lora-to-ggml.py and old `finetune --lora-out`.

    Header: b'algg', version 1, r, alpha (int32). Tensors: n_dims, name_len, ftype (0 f32, 1 f16), ne[n_dims],
    name, padding to 32 bytes, data. Names are GGUF names + '.loraA'/'.loraB' (older files: ggml names, mapped).
    Old llama.cpp scaled every tensor by alpha / r of the header and applied B A to the weights as stored
    (no Q/K permutation), which is what this reproduces."""
    p = str(path)
    buf = Path(path).read_bytes()
    if len(buf) < 16:
        raise ToolkitError("truncated GGLA header", p)
    version, r, alpha = struct.unpack_from("<iii", buf, 4)
    if version != 1:
        raise ToolkitError(f"unsupported GGLA version {version}", p)
    if r <= 0:
        raise ToolkitError(f"GGLA header has rank {r}", p)
    pos, raw = 16, {}
    while pos < len(buf):
        if pos + 12 > len(buf):
            raise ToolkitError("truncated GGLA tensor header", p)
        n_dims, name_len, ftype = struct.unpack_from("<iii", buf, pos)
        pos += 12
        if not 1 <= n_dims <= 2 or ftype not in (0, 1) or not 0 < name_len < 512:
            raise ToolkitError(f"corrupt GGLA tensor header at byte {pos - 12}", p)
        if pos + 4 * n_dims > len(buf):
            raise ToolkitError("truncated GGLA tensor header", p)
        ne = struct.unpack_from(f"<{n_dims}i", buf, pos)
        if min(ne) <= 0:
            raise ToolkitError(f"corrupt GGLA tensor header at byte {pos - 12}: dimensions {list(ne)}", p)
        pos += 4 * n_dims
        name = buf[pos:pos + name_len].decode("utf-8", "replace")
        pos = (pos + name_len + 31) & -32
        dtype = np.float32 if ftype == 0 else np.float16
        n = int(np.prod(ne))
        if pos + n * np.dtype(dtype).itemsize > len(buf):
            raise ToolkitError(f"truncated GGLA file: tensor '{name}' runs past the end", p)
        arr = np.frombuffer(buf, dtype, n, pos).astype(np.float32).reshape(tuple(reversed(ne)))
        pos += n * np.dtype(dtype).itemsize
        raw[name] = torch.from_numpy(arr.copy())
    tensors: dict[str, LoraPair] = {}
    for name, a in raw.items():
        if not name.endswith(".loraA"):
            if not name.endswith(".loraB"):
                raise ToolkitError(f"GGLA tensor '{name}' has unexpected suffix (expected .loraA or .loraB)", p)
            continue
        stem = name[:-6]
        b = raw.get(stem + ".loraB")
        if b is None:
            raise ToolkitError(f"LoRA tensor pair for '{stem}' is missing one component (loraB)", p)
        if a.ndim == 1:
            a = a.reshape(-1, 1)
        if b.ndim == 1:
            b = b.reshape(-1, 1)
        gg = _ggla_name(stem, p)
        pair = _old_layout(a, b, gg)
        if pair.a.shape[0] != pair.b.shape[1]:
            raise ToolkitError(f"GGLA tensors '{stem}.loraA' {list(a.shape)} and '{stem}.loraB' {list(b.shape)} have "
                               f"different ranks", p)
        if pair.rank != r:  # the old loader scaled every tensor by alpha / r of the header
            pair = LoraPair(pair.a, pair.b * (pair.rank / r))
        tensors[gg] = pair
    for name in raw:
        if name.endswith(".loraB") and name[:-6] + ".loraA" not in raw:
            raise ToolkitError(f"LoRA tensor pair for '{name[:-6]}' is missing one component (loraA)", p)
    if not tensors:
        raise ToolkitError("GGLA file holds no LoRA tensors", p)
    if any(is_norm(n) for n in tensors):
        _warn_norms(p)
    arch = base.arch if base is not None else "llama"
    return Adapter(tensors, float(alpha), arch, "", {}, {"metadata": {}}, p)


_GGML_OLD = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
             "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
             "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
_OLD_GLOBAL = {"tok_embeddings.weight": EMBD, "norm.weight": "output_norm.weight", "output.weight": "output.weight"}


def _ggla_name(stem: str, path: str) -> str:
    """GGLA names: GGUF ('blk.0.attn_q.weight') or pre-GGUF ggml ('layers.0.attention.wq.weight')."""
    if stem.startswith("blk.") or stem in (EMBD, "output.weight", "output_norm.weight"):
        return stem
    if stem in _OLD_GLOBAL:
        return _OLD_GLOBAL[stem]
    m = re.match(r"^layers\.(\d+)\.(.+)\.weight$", stem)
    if m and m.group(2) in _GGML_OLD:
        return f"blk.{m.group(1)}.{_GGML_OLD[m.group(2)]}.weight"
    raise ToolkitError(f"GGLA tensor '{stem}' has an unknown name", path)


# --- PEFT --------------------------------------------------------------------------------------------------

_PEFT_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}


def _peft_pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first pattern key k with re.match(rf'(.*\\.)?({k})$', module)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _check_peft_config(cfg: Any, p: str) -> None:
    """The fields read_peft uses, with the types PEFT writes (a corrupt config is one clear line, not a crash)."""
    if not isinstance(cfg, dict):
        raise ToolkitError(f"adapter_config.json holds a {type(cfg).__name__}, not an object", p)

    def positive(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if "r" in cfg and not (positive(cfg["r"]) and float(cfg["r"]).is_integer()):
        raise ToolkitError(f"adapter_config.json: r is {cfg['r']!r}, not a positive integer", p)
    if "lora_alpha" in cfg and not number(cfg["lora_alpha"]):
        raise ToolkitError(f"adapter_config.json: lora_alpha is {cfg['lora_alpha']!r}, not a number", p)
    for key, ok in (("rank_pattern", positive), ("alpha_pattern", number)):
        pat = cfg.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict) or not all(ok(v) for v in pat.values()):
            raise ToolkitError(f"adapter_config.json: {key} must map module patterns to numbers", p)
        for k in pat:
            try:
                re.compile(k)
            except re.error as e:
                raise ToolkitError(f"adapter_config.json: {key} key {k!r} is not a regular expression ({e})", p) \
                    from None
    mts = cfg.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        raise ToolkitError("adapter_config.json: modules_to_save must be a list of module names", p)


def _peft_refusals(cfg: dict[str, Any], p: str) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ToolkitError(f"peft_type '{cfg.get('peft_type')}' is not supported (only LORA)", p)
    if cfg.get("fan_in_fan_out"):
        raise ToolkitError("fan_in_fan_out: true (Conv1D models) is not supported", p)
    if cfg.get("bias", "none") not in (None, "none") or cfg.get("lora_bias"):
        raise ToolkitError("adapters that train biases (bias / lora_bias) are not supported", p)


def read_peft(path: str | Path, base: BaseInfo | None = None) -> Adapter:
    d = Path(path)
    p = str(d)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise ToolkitError("not a PEFT adapter: no adapter_config.json", p)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ToolkitError(f"adapter_config.json is not valid JSON ({getattr(e, 'msg', e)})", p) from None
    _check_peft_config(cfg, p)
    _peft_refusals(cfg, p)
    st = d / "adapter_model.safetensors"
    if not st.is_file():
        hint = " (adapter_model.bin is a pickle, which toolkit never loads: save with safe_serialization)" \
            if (d / "adapter_model.bin").exists() else ""
        raise ToolkitError(f"no adapter_model.safetensors{hint}", p)
    if base is None:
        raise ToolkitError("a PEFT adapter needs the base model (--base base.gguf or a HF model folder) for its "
                           "architecture and head counts", p)
    arch = N.check_arch(base.arch, p)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(st))
    except (SafetensorError, OSError) as e:
        raise ToolkitError(f"corrupt safetensors file ({str(e).splitlines()[0]})", str(st)) from None
    gguf_meta = _gguf_metadata_from_st(st)
    halves: dict[str, dict[str, Tensor]] = {}
    norms: dict[str, Tensor] = {}
    weights: dict[str, Tensor] = {}
    for key, t in state.items():
        k = key.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default", "")
        if k.endswith(".token_adapter.trainable_tokens_delta"):  # trainable_token_indices: rows of a weight
            module = k[: -len(".token_adapter.trainable_tokens_delta")]
            weights.update(_trainable_token_rows(module, t.float(), cfg, base, arch, p))
            continue
        if k.endswith((".lora_magnitude_vector", ".lora_magnitude_vector.weight")):
            module = k[: k.index(".lora_magnitude_vector")]
            halves.setdefault(module, {})["m"] = t.float()
            continue
        suffix = next((s for s in _PEFT_SUFFIXES if k.endswith(s)), None)
        if suffix is None:
            module = k.rsplit(".", 1)[0]
            if k.endswith(".base_layer.weight"):
                # PEFT saves the embedding layers it targets (save_embedding_layers="auto"): a copy of the base,
                # unless the vocabulary was resized for new tokens
                gg = N.hf_to_gguf(arch, k.replace(".base_layer", ""))
                want = base.shapes.get(gg or "", base.shapes.get(EMBD) if gg == "output.weight" else None)
                if want is not None and tuple(t.shape) == tuple(want):
                    continue
                raise ToolkitError(f"'{key}' has shape {list(t.shape)}, the base {list(want or [])}: embeddings "
                                   f"resized for new tokens are not supported", p)
            gg = N.hf_to_gguf(arch, k)
            if gg is not None and is_norm(gg) and t.ndim == 1:
                norms[gg] = t.float()
                continue
            if gg is not None and t.ndim == 2:  # modules_to_save: the trained weight whole
                heads = N.qk_heads(gg, base.n_head, base.n_head_kv) if arch in N.PERMUTES_QK else None
                weights[gg] = N.permute_rows(t.float(), heads) if heads else t.float()
                continue
            raise ToolkitError(f"unexpected tensor '{key}': neither lora_A nor lora_B ({module})", p)
        module = k[: -len(suffix)]
        halves.setdefault(module, {})[_PEFT_SUFFIXES[suffix]] = t.float()
    r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora"))
    tensors: dict[str, LoraPair] = {}
    scales: dict[str, float] = {}
    for module, ab in halves.items():
        if ("A" in ab) != ("B" in ab):
            raise ToolkitError(f"'{module}' has lora_{'B' if 'A' in ab else 'A'} missing", p)
        gg_mod = N.hf_module_to_gguf(arch, module)
        if gg_mod is None:
            raise ToolkitError(f"'{module}' has no GGUF counterpart in a {arch} model", p)
        name = gg_mod + ".weight"
        if "A" not in ab and "B" not in ab:
            raise ToolkitError(f"'{module}' has a DoRA magnitude but no lora_A / lora_B", p)
        a, b, m = ab["A"], ab["B"], ab.get("m")
        if a.ndim != 2 or b.ndim != 2 or 0 in a.shape or 0 in b.shape:
            raise ToolkitError(f"'{module}': lora_A {list(a.shape)} and lora_B {list(b.shape)} must be 2-D and "
                               f"non-empty", p)
        if m is not None and is_embedding(name):
            raise ToolkitError(f"'{module}': DoRA on an embedding is not supported (only on linear layers)", p)
        if a.shape[0] != b.shape[1]:
            raise ToolkitError(f"'{module}': lora_A rank {a.shape[0]} != lora_B rank {b.shape[1]}", p)
        r = int(_peft_pattern_value(rank_pattern, module, r_default))
        if r != a.shape[0]:
            raise ToolkitError(f"'{module}': config says rank {r} but lora_A has {a.shape[0]} rows", p)
        alpha = float(_peft_pattern_value(alpha_pattern, module, alpha_default))
        scales[name] = alpha / math.sqrt(r) if rslora else alpha / r
        if is_embedding(name) and name in base.shapes and a.shape[1] != base.shapes[name][0]:
            raise ToolkitError(f"'{module}' covers {a.shape[1]} tokens but the base has {base.shapes[name][0]} "
                               f"(embeddings resized for new tokens are not supported)", p)
        heads = N.qk_heads(name, base.n_head, base.n_head_kv) if arch in N.PERMUTES_QK else None
        if heads:
            b = N.permute_rows(b, heads)  # llama.cpp's converter permutes q/k rows; B's rows (and m's) follow
            m = N.permute_rows(m.reshape(-1, 1), heads).reshape(-1) if m is not None else None
        tensors[name] = LoraPair(a.contiguous(), b.contiguous(), None if m is None else m.contiguous())
    if any(pair.magnitude is None for pair in tensors.values()) and cfg.get("use_dora"):
        raise ToolkitError("DoRA config (use_dora: true) but some modules have no lora_magnitude_vector", p)
    alpha_g, folded = _fold_scales(tensors, scales)
    if norms:
        _warn_norms(p)
    extra = {"metadata": gguf_meta, "peft_config": cfg, "folded": folded}
    check_against_base(Adapter({}, 0.0, arch, weights=weights), base, p, tied_output_ok=True)  # before naming tokens
    added = _added_tokens(d, weights, base)
    return Adapter(tensors, alpha_g, arch, str(cfg.get("base_model_name_or_path") or ""), norms, extra, p,
                   weights, added)


def _trainable_token_rows(module: str, rows: Tensor, cfg: dict[str, Any], base: BaseInfo, arch: str,
                          p: str) -> dict[str, Tensor]:
    """PEFT's trainable_token_indices: `rows` [n, dim] are the new values of rows `indices` of `module`'s weight
    (PEFT's forward index_copies them in), made a full weight from the base's. Rows past the base's (new tokens)
    must all be trained ones. A tied base's output follows its embedding, as PEFT ties the two adapters."""
    spec = cfg.get("trainable_token_indices")
    leaf = N.hf_leaf(module)
    indices = spec if isinstance(spec, list) else (spec or {}).get(leaf, next(
        (v for k, v in (spec or {}).items() if re.match(rf"(.*\.)?({k})$", module)), None))
    name = (N.hf_module_to_gguf(arch, module) or "") + ".weight"
    if indices is None or name not in (EMBD, "output.weight"):
        raise ToolkitError(f"'{module}': trainable tokens without indices in trainable_token_indices, or on a "
                           f"weight other than the embedding / lm_head", p)
    idx = torch.tensor([int(i) for i in indices])
    if rows.ndim != 2 or rows.shape[0] != len(idx):
        raise ToolkitError(f"'{module}': {rows.shape[0]} trainable token rows for {len(idx)} indices", p)
    src = name if name in base.shapes else EMBD  # a tied base's lm_head is the embedding
    w = _base_values(base, src, p)
    n = max(int(idx.max()) + 1, w.shape[0])
    missing = sorted(set(range(w.shape[0], n)) - set(idx.tolist()))
    if missing:
        raise ToolkitError(f"'{module}': token {missing[0]} is past the base's {w.shape[0]} rows and not trained", p)
    w = torch.cat([w, torch.zeros(n - w.shape[0], w.shape[1])]).index_copy(0, idx, rows)
    return {EMBD: w, "output.weight": w} if name == EMBD and base.tied else {name: w}


def _base_values(base: BaseInfo, name: str, p: str) -> Tensor:
    """The base's float32 values of GGUF tensor `name` (from its GGUF, or its HF folder's safetensors)."""
    path = Path(base.path) if base.path else None
    if path is not None and path.is_file():
        return tensor_float(open_gguf(path).tensors[name], copy=True)
    if path is not None and path.is_dir():
        from safetensors import safe_open

        hf = N.gguf_to_hf(base.arch, name)
        for st in sorted(path.glob("*.safetensors")):
            with safe_open(str(st), framework="pt") as f:
                if hf in f.keys():
                    return f.get_tensor(hf).float()
    raise ToolkitError(f"trainable tokens need the base's values of '{name}' (give the base model file)", p)


def _added_tokens(d: Path, weights: dict[str, Tensor], base: BaseInfo) -> list[tuple[int, str, bool]]:
    """(id, text, special) of the tokens past the base's vocabulary when modules_to_save grew it, from the
    adapter folder's tokenizer files (tokenizer.json's added_tokens, else added_tokens.json)."""
    n_base = base.shapes.get(EMBD, (0,))[0]
    n_new = max((w.shape[0] for n, w in weights.items() if n in (EMBD, "output.weight")), default=n_base)
    if n_new <= n_base:
        return []
    rows = {n: weights[n].shape[0] if n in weights else n_base for n in (EMBD, "output.weight")}
    if len(set(rows.values())) > 1:  # the resized base's other matrix has rows the adapter does not hold
        raise ToolkitError(f"the adapter grows the vocabulary but holds {rows[EMBD]} embedding rows and "
                           f"{rows['output.weight']} lm_head rows (save both: modules_to_save=['embed_tokens', "
                           f"'lm_head'])", str(d))
    found: dict[int, tuple[str, bool]] = {}
    tj, aj = d / "tokenizer.json", d / "added_tokens.json"
    try:
        if tj.is_file():
            for t in json.loads(tj.read_text()).get("added_tokens", []):
                found[int(t["id"])] = (str(t["content"]), bool(t.get("special")))
        elif aj.is_file():
            found = {int(i): (str(text), False) for text, i in json.loads(aj.read_text()).items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ToolkitError(f"cannot read the added tokens from {tj.name if tj.is_file() else aj.name}", str(d)) \
            from None
    if not tj.is_file() and not aj.is_file():
        raise ToolkitError(f"the adapter grows the vocabulary from {n_base} to {n_new} tokens but its folder has no "
                           f"tokenizer.json or added_tokens.json naming the new tokens (save the tokenizer with "
                           f"the adapter)", str(d))
    # ids without a name are padding, as llama.cpp's converter writes them
    return [(i, *found.get(i, (f"[PAD{i}]", False))) for i in range(n_base, n_new)]


def _fold_scales(tensors: dict[str, LoraPair], scales: dict[str, float]) -> tuple[float, bool]:
    """One GGUF alpha for all tensors; where a tensor's PEFT scale differs, fold the ratio into its B.

    Returns (alpha, folded). No folding when every scale * rank agrees (plain LoRA, rank_pattern, or rsLoRA with
    one rank), or when every scale is 1 (alpha 0)."""
    if not tensors:
        return 0.0, False
    want = {n: scales[n] * tensors[n].rank for n in tensors}  # the alpha each tensor needs
    counts = Counter(want.values())
    alpha, _ = counts.most_common(1)[0]
    if len(counts) > 1 and all(s == 1.0 for s in scales.values()):
        return 0.0, False
    folded = False
    for n, pair in tensors.items():
        if want[n] != alpha:
            ratio = want[n] / alpha  # scale wanted / scale llama.cpp will use (alpha / rank)
            tensors[n] = replace(pair, b=(pair.b.double() * ratio).float())  # (DoRA: s B A, so m's norm, unchanged)
            folded = True
    return float(alpha), folded


# --- writing -----------------------------------------------------------------------------------------------

def _quantized(name: str, t: Tensor, qtype: Q) -> tuple[Q, Any]:
    """(type, data) for one tensor; like llama.cpp's converter, Q8_0 falls back to F16 where rows don't fit."""
    if t.ndim < 2:
        qtype = Q.F32
    elif t.shape[-1] % block_size(qtype)[0]:
        qtype = Q.F16
    return qtype, encode(t.detach().float().contiguous(), qtype)


def write_gguf_adapter(adapter: Adapter, path: str | Path, outtype: str = "f32",
                       base: BaseInfo | GGUFFile | str | Path | None = None) -> None:
    """llama.cpp's GGUF adapter (general.type=adapter, adapter.type=lora, adapter.lora.alpha, <base>.lora_a/b)."""
    key = outtype.lower()
    if key not in OUTTYPES:
        raise ToolkitError(f"unknown --outtype '{outtype}' (use {', '.join(OUTTYPES)})")
    if adapter.is_dora:
        raise ToolkitError("llama.cpp cannot apply a DoRA adapter unmerged (its adapter format has no magnitude "
                           "vectors): merge it into the base with `toolkit export-lora`", str(adapter.path or path))
    if adapter.weights:
        raise ToolkitError(f"llama.cpp adapters cannot carry full weights ({', '.join(adapter.weights)}, from "
                           f"modules_to_save): merge them into the base with `toolkit export-lora`",
                           str(adapter.path or path))
    info = BaseInfo.of(base)
    if info is not None:
        check_against_base(adapter, info, str(adapter.path or path))
    if info is not None and info.tied and "output.weight" in adapter.tensors:
        raise ToolkitError(_missing_msg("output.weight", info), str(adapter.path or path))
    if info is not None and info.tied and EMBD in adapter.tensors:
        # llama.cpp's tied output is a duplicate of token_embd and picks up its LoRA as a linear one: GGML_ASSERT
        raise ToolkitError("a token_embd LoRA on a base with tied output makes llama.cpp abort (it applies the "
                           "same LoRA to the output matmul); keep the PEFT form for toolkit", str(adapter.path or path))
    if not adapter.arch:
        raise ToolkitError("the adapter's architecture is unknown (give --base)", str(adapter.path or path))
    meta: dict[str, Any] = {"general.architecture": adapter.arch}
    meta.update(adapter.extra.get("metadata", {}))
    meta.update({"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": float(adapter.alpha)})
    if adapter.base_model:
        meta.update({"general.base_model.count": 1, "general.base_model.0.name": adapter.base_model})
    cfg = adapter.extra.get("peft_config")
    if cfg is not None and not adapter.extra.get("folded"):
        meta[TOOLKIT_PEFT_KEY] = json.dumps(cfg, sort_keys=True)
    qtype = OUTTYPES[key]
    specs = []
    for name, pair in adapter.tensors.items():
        a = pair.a.T if is_embedding(name) else pair.a  # llama.cpp gathers rows of token_embd's lora_a
        for suffix, t in ((".lora_a", a), (".lora_b", pair.b)):
            q, data = _quantized(name, t, qtype)
            specs.append(TensorSpec(name + suffix, q, tuple(t.shape), data))
    for name, w in adapter.norms.items():
        specs.append(TensorSpec(name, Q.F32, (w.numel(),), w.float().reshape(-1).contiguous()))
    write_gguf(path, meta, specs)


def _module_alpha(adapter: Adapter, name: str) -> float:
    """The PEFT lora_alpha (no rsLoRA) that gives this tensor the adapter's scale."""
    return adapter.scale(name) * adapter.rank(name)


def _restored_config(adapter: Adapter, modules: dict[str, str]) -> dict[str, Any] | None:
    """The PEFT config the adapter came from, if it still describes these tensors exactly (round trips)."""
    cfg = adapter.extra.get("peft_config")
    if not cfg or adapter.extra.get("folded"):
        return None
    r0, a0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for name, module in modules.items():
        r = int(_peft_pattern_value(rp, module, r0))
        alpha = float(_peft_pattern_value(ap, module, a0))
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if r != adapter.rank(name) or not math.isclose(s, adapter.scale(name), rel_tol=1e-6):
            return None
    return dict(cfg)


def write_peft_adapter(adapter: Adapter, out_dir: str | Path,
                       base: BaseInfo | GGUFFile | str | Path | None = None) -> None:
    """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) that PeftModel loads."""
    from safetensors.torch import save_file

    info = BaseInfo.of(base)
    p = str(adapter.path or out_dir)
    arch = N.check_arch(adapter.arch or (info.arch if info else ""), p)
    if info is not None:
        check_against_base(adapter, info, p, tied_output_ok=True)
    permute = arch in N.PERMUTES_QK
    if permute and info is None and any(N.qk_heads(n, 1, 1) for n in adapter.tensors):
        raise ToolkitError("writing q/k LoRA for a llama-type model needs --base (head counts to undo llama.cpp's "
                           "Q/K permutation)", p)
    state: dict[str, Tensor] = {}
    modules: dict[str, str] = {}
    for name, pair in adapter.tensors.items():
        module = N.gguf_module_to_hf(arch, name[: -len(".weight")])
        if module is None:
            raise ToolkitError(f"'{name}' has no Hugging Face counterpart in a {arch} model", p)
        modules[name] = module
        b = pair.b
        heads = N.qk_heads(name, info.n_head, info.n_head_kv) if permute and info else None
        if heads:
            b = N.unpermute_rows(b, heads)
        if is_embedding(name):
            state[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = pair.a.float().contiguous()
            state[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = b.float().contiguous()
        else:
            state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = pair.a.float().contiguous()
            state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.float().contiguous()
        if pair.magnitude is not None:
            m = pair.magnitude.float().reshape(-1, 1)
            m = N.unpermute_rows(m, heads) if heads else m
            state[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"] = m.reshape(-1).contiguous()
    norm_modules = []
    for name, w in adapter.replaced.items():
        hf = N.gguf_to_hf(arch, name)
        if hf is None:
            raise ToolkitError(f"'{name}' has no Hugging Face counterpart in a {arch} model", p)
        heads = N.qk_heads(name, info.n_head, info.n_head_kv) if permute and info and w.ndim == 2 else None
        state[PEFT_PREFIX + hf] = (N.unpermute_rows(w.float(), heads) if heads else w.float()).contiguous()
        norm_modules.append(N.hf_leaf(hf[: -len(".weight")]))
    cfg = _restored_config(adapter, modules) or _fresh_config(adapter, modules, info)
    cfg["base_model_name_or_path"] = cfg.get("base_model_name_or_path") or adapter.base_model or \
        (info.name if info else "")
    if norm_modules:
        cfg["modules_to_save"] = sorted(set(norm_modules))
    with atomic_path(out_dir, directory=True) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata=_st_metadata(adapter))
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


ST_GGUF_KEY = "toolkit.gguf_metadata"  # a GGUF adapter's other metadata, kept through PEFT for round trips


def _st_metadata(adapter: Adapter) -> dict[str, str]:
    """safetensors header metadata (strings; PEFT ignores it): the GGUF keys this adapter carried."""
    meta = adapter.extra.get("metadata") or {}
    out = {"format": "pt"}
    if meta:
        out[ST_GGUF_KEY] = json.dumps({k: [v.value, int(v.type), None if v.sub_type is None else int(v.sub_type)]
                                       for k, v in meta.items()})
    return out


def _gguf_metadata_from_st(path: Path) -> dict[str, Any]:
    from gguf import GGUFValueType
    from gguf.gguf_writer import GGUFValue
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(ST_GGUF_KEY)
    if not raw:
        return {}
    try:
        return {k: GGUFValue(v, GGUFValueType(t), None if st is None else GGUFValueType(st))
                for k, (v, t, st) in json.loads(raw).items()}
    except (ValueError, TypeError, AttributeError):
        raise ToolkitError(f"corrupt {ST_GGUF_KEY} metadata", str(path)) from None


def _fresh_config(adapter: Adapter, modules: dict[str, str], info: BaseInfo | None) -> dict[str, Any]:
    ranks = {n: adapter.rank(n) for n in modules}
    alphas = {n: _module_alpha(adapter, n) for n in modules}
    r0 = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    a0 = Counter(alphas.values()).most_common(1)[0][0] if alphas else 8.0
    # full module paths as pattern keys: PEFT matches them exactly ((.*\.)?key$)
    rank_pattern = {modules[n]: r for n, r in ranks.items() if r != r0}
    alpha_pattern = {modules[n]: a for n, a in alphas.items() if a != a0}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r0, "lora_alpha": _num(a0),
        "rank_pattern": rank_pattern, "alpha_pattern": {k: _num(v) for k, v in alpha_pattern.items()},
        "target_modules": _target_modules(modules, info), "use_rslora": False, "use_dora": adapter.is_dora,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
    }


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _target_modules(modules: dict[str, str], info: BaseInfo | None) -> list[str]:
    """Leaf names (q_proj, ...) when the adapter covers every module of that kind in the base; else full paths."""
    leaves = sorted({N.hf_leaf(m) for m in modules.values()})
    if info is None:
        return leaves
    covered = set(modules)
    out: list[str] = []
    for leaf in leaves:
        hf_names = {n: N.gguf_to_hf(info.arch, n) for n in info.shapes if n.endswith(".weight")}
        base_names = [n for n, hf in hf_names.items() if hf is not None and N.hf_leaf(hf[:-7]) == leaf]
        if info.tied and leaf == "lm_head":
            base_names.append("output.weight")
        if all(n in covered for n in base_names):
            out.append(leaf)
        else:
            out += sorted(m for n, m in modules.items() if N.hf_leaf(m) == leaf)
    return out
