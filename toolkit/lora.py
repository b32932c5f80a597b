"""Unmerged LoRA: y = base(x) + sum_i s_i * B_i A_i x over any base linear (nn.Linear or QuantLinear).

LoRALinear / LoRAEmbedding wrap a base module (never copying it) and hold several named adapters; an adapter
at scale 0 is skipped, so it costs nothing and the output is the base's bit for bit. AdapterHost (mixed into
Transformer) loads adapter files onto the model's GGUF-named modules and switches the active set in place:
`set_adapters({name: scale})` only changes floats, so it takes milliseconds and never touches the base.

Effective scale of adapter i on a tensor = user scale * alpha / rank (alpha 0: 1), as llama.cpp computes it.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ToolkitError

Tensor = torch.Tensor
_versions = itertools.count(1)  # adapter-set versions, unique across all wrappers (see last_version)


def thin_linear(x: Tensor, w: Tensor) -> Tensor:
    """x [M, in] @ w.T [in, out] for a LoRA factor (r rows or r columns). Inside torch.compile it is a product
    and a sum, which inductor fuses into its neighbours' loops; as a matmul it would stay one library call per
    factor, and a decode step with LoRA on every linear makes hundreds of those (measured: 6 ms a token)."""
    if torch.compiler.is_compiling():
        return (x.unsqueeze(-2) * w).sum(-1)  # [M, 1, in] * [out, in] -> [M, out]
    return F.linear(x, w)


def last_version() -> int:
    """The newest adapter-set version handed out: unchanged means no wrapper anywhere changed its adapters."""
    return _LoRABase.newest_version


def _base_weight(base: nn.Module) -> Tensor:
    """The base's weight as float32 [out, in] (dequantized for packed bases)."""
    if hasattr(base, "weight_float"):
        return base.weight_float(torch.float32)
    return base.weight.detach().float()


class _LoRABase(nn.Module):
    """Bookkeeping shared by the linear and embedding wrappers: named A/B parameters and their scales."""

    newest_version = 0

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self._keys: dict[str, str] = {}  # adapter name -> ParameterDict key (names may hold dots)
        self.alpha_scale: dict[str, float] = {}
        self.user_scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self._active: list[tuple[str, float, float]] = []  # (key, effective scale, dropout), scale != 0 only
        self._fast: list[tuple[Tensor, Tensor, float]] = []  # (A, B, scale) of the active adapters
        self.layout = 0  # changes when adapters are attached, removed or moved (not on scale changes)

    def add(self, name: str, a: Tensor, b: Tensor, scale: float, user_scale: float = 1.0,
            trainable: bool = False, dropout: float = 0.0) -> tuple[nn.Parameter, nn.Parameter]:
        """Attach adapter `name`: a [r, in], b [out, r] (embedding: a [r, n_vocab], b [n_embd, r]);
        scale = alpha / rank. Stored float32 on the base's device."""
        if name in self._keys:
            raise ToolkitError(f"adapter '{name}' is already attached here")
        key = f"a{len(self._keys)}_{abs(hash(name)) % 10**8}"
        dev = self._device()
        pa = nn.Parameter(a.detach().to(dev, torch.float32).contiguous(), requires_grad=trainable)
        pb = nn.Parameter(b.detach().to(dev, torch.float32).contiguous(), requires_grad=trainable)
        self.lora_a[key], self.lora_b[key] = pa, pb
        self._keys[name] = key
        self.alpha_scale[name], self.user_scale[name], self.dropout[name] = float(scale), float(user_scale), dropout
        self.layout = next(_versions)
        self._refresh()
        return pa, pb

    def remove(self, name: str) -> None:
        key = self._keys.pop(name)
        del self.lora_a[key], self.lora_b[key]
        for d in (self.alpha_scale, self.user_scale, self.dropout):
            d.pop(name, None)
        self.layout = next(_versions)
        self._refresh()

    def set_scale(self, name: str, user_scale: float) -> None:
        self.user_scale[name] = float(user_scale)
        self._refresh()

    def pair(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        key = self._keys[name]
        return self.lora_a[key], self.lora_b[key]

    @property
    def names(self) -> list[str]:
        return list(self._keys)

    def _refresh(self) -> None:
        self._active = [(self._keys[n], self.user_scale[n] * self.alpha_scale[n], self.dropout[n])
                        for n in self._keys if self.user_scale[n] * self.alpha_scale[n] != 0.0]
        # inference reads the parameters straight from this list: a decode step is bound by per-op overhead
        self._fast = [(self.lora_a[k], self.lora_b[k], s) for k, s, _ in self._active]
        # tells cached stacks (linear_group) to rebuild; unique, so one number says whether anything changed
        self.version = _LoRABase.newest_version = next(_versions)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): rebuild the views on the new tensors
        out = super()._apply(fn, *args, **kwargs)
        self.layout = next(_versions)
        self._refresh()
        return out

    def _device(self) -> torch.device:
        for t in list(self.base.parameters()) + list(self.base.buffers()):
            return t.device
        return torch.device("cpu")

    def _delta(self, name: str) -> Tensor:
        a, b = self.pair(name)
        return (b.detach() @ a.detach()) * (self.user_scale[name] * self.alpha_scale[name])


class LoRALinear(_LoRABase):
    """y = base(x) + sum_i s_i * (dropout(x) @ A_i.T) @ B_i.T."""

    @property
    def in_features(self) -> int:
        return int(self.base.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.add_adapters(self.base(x), x)

    def add_adapters(self, y: Tensor, x: Tensor) -> Tensor:
        """y (the base's output for x) plus the active adapters' deltas."""
        if not self._active:
            return y
        if not torch.is_grad_enabled() and y.dtype == x.dtype == torch.float32:
            # inference: two ops per adapter (decode is bound by per-op overhead): h = x A^T, y += s h B^T
            x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            for a, b, s in self._fast:
                if torch.compiler.is_compiling():
                    y2 = y2 + s * thin_linear(thin_linear(x2, a), b)
                else:
                    y2 = torch.addmm(y2, F.linear(x2, a), b.t(), alpha=s)  # [M, r] -> [M, out]
            return y2.view(y.shape)
        for key, s, p in self._active:
            a, b = self.lora_a[key], self.lora_b[key]
            h = F.dropout(x, p) if p and self.training else x
            y = y + (((h.to(a.dtype) @ a.T) @ b.T) * s).to(y.dtype)  # [B, T, r] -> [B, T, out]
        return y

    def merged_weight(self) -> Tensor:
        """base weight + the active adapters' deltas, float32 [out, in]."""
        w = _base_weight(self.base).clone()
        for name in self._keys:
            if self.user_scale[name] * self.alpha_scale[name] != 0.0:
                w += self._delta(name).to(w.device)
        return w


class LoRAEmbedding(_LoRABase):
    """llama.cpp's token_embd LoRA: rows of A.T gathered by token, times B.T (PEFT's lora_embedding_A/B)."""

    @property
    def num_embeddings(self) -> int:
        return int(self.base.num_embeddings)

    @property
    def embedding_dim(self) -> int:
        return int(self.base.embedding_dim)

    def forward(self, ids: Tensor, rows=None) -> Tensor:
        """rows: a batched step's per-row adapter scales (linear_group.RowAdapters) instead of the active set."""
        y = self.base(ids)
        if rows is not None:
            for i in rows.used:
                name = rows.names[i]
                if name in self._keys:
                    a, b = self.pair(name)
                    s = rows.scales[:, i] * self.alpha_scale[name]  # [B]: 0 for rows without this adapter
                    y = y + ((F.embedding(ids, a.T) @ b.T) * s[:, None, None]).to(y.dtype)
            return y
        for key, s, _ in self._active:
            a, b = self.lora_a[key], self.lora_b[key]
            rows = F.embedding(ids, a.T)  # [B, T, r]
            y = y + ((rows @ b.T) * s).to(y.dtype)  # [B, T, n_embd]
        return y

    def merged_weight(self) -> Tensor:
        """base table + active deltas, float32 [n_vocab, n_embd]."""
        w = _base_weight(self.base).clone()
        for name in self._keys:
            if self.user_scale[name] * self.alpha_scale[name] != 0.0:
                w += self._delta(name).T.to(w.device)
        return w


# --- the model side ----------------------------------------------------------------------------------------

@dataclass
class AdapterInfo:
    name: str
    scale: float
    alpha: float
    ranks: dict[str, int]  # GGUF weight name -> rank
    targets: list[str]
    path: str = ""
    trainable: bool = False
    source: Any = field(default=None, repr=False)  # the Adapter it came from (export keeps its metadata)


_NORM_WARNED: set[str] = set()


class AdapterHost:
    """Mixin for Transformer (which provides lora_targets() and gguf). See DESIGN.md for the contract."""

    # -- registry
    def _registry(self) -> dict[str, AdapterInfo]:
        reg = self.__dict__.get("_lora_registry")
        if reg is None:
            reg = self.__dict__["_lora_registry"] = {}
            self.__dict__["_lora_norms"] = {}  # norm weight name -> (base weight, {adapter: delta})
        return reg

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """name -> AdapterInfo(scale, alpha, ranks, targets, path)."""
        return dict(self._registry())

    def _base_info(self):
        from .adapter import BaseInfo

        g = getattr(self, "gguf", None)
        return BaseInfo.from_gguf(g) if g is not None else None

    def _wrap(self, name: str) -> _LoRABase:
        """The LoRA wrapper on the module behind GGUF weight `name`, created on first use (in place)."""
        targets = self.lora_targets()  # type: ignore[attr-defined]
        if name not in targets:
            raise ToolkitError(f"this model has no LoRA-able module for '{name}'")
        mod = targets[name]
        if isinstance(mod, _LoRABase):
            return mod
        path = name[: -len(".weight")]
        parent_path, _, attr = path.rpartition(".")
        parent = self.get_submodule(parent_path) if parent_path else self  # type: ignore[attr-defined]
        wrapper = LoRAEmbedding(mod) if name.endswith("token_embd.weight") else LoRALinear(mod)
        setattr(parent, attr, wrapper)
        return wrapper

    # -- loading
    def load_adapter(self, path: str | Path, name: str | None = None, scale: float = 1.0) -> str:
        """Read a GGUF adapter / PEFT dir / GGLA file (checked against this model) and attach it at `scale`."""
        from .adapter import read_adapter

        adapter = read_adapter(path, base=self._base_info())
        return self.add_adapter(adapter, name or _default_name(path, self._registry()), scale)

    def add_adapter(self, adapter: Any, name: str, scale: float = 1.0) -> str:
        """Attach an in-memory Adapter (toolkit.adapter.Adapter) under `name`."""
        reg = self._registry()
        if name in reg:
            raise ToolkitError(f"an adapter named '{name}' is already loaded")
        from .adapter import is_norm

        done: list[str] = []
        try:
            for t, pair in adapter.tensors.items():
                if is_norm(t):
                    self._add_norm_delta(name, t, (pair.b.float() @ pair.a.float()).reshape(-1) * adapter.scale(t))
                else:
                    self._wrap(t).add(name, pair.a, pair.b, adapter.scale(t), user_scale=scale)
                done.append(t)
            for t, w in adapter.norms.items():
                base = self._norm_base(t)
                self._add_norm_delta(name, t, w.float().reshape(-1).to(base.device) - base.float())
                done.append(t)
        except BaseException:
            self._detach(name, done)
            raise
        ranks = {t: p.rank for t, p in adapter.tensors.items()}
        reg[name] = AdapterInfo(name, float(scale), adapter.alpha, ranks, done, adapter.path, False, adapter)
        self._apply_norms()
        return name

    # -- switching
    def set_adapters(self, scales: dict[str, float]) -> None:
        """Exactly these adapters active at these scales; every other loaded adapter off (scale 0)."""
        reg = self._registry()
        unknown = [n for n in scales if n not in reg]
        if unknown:
            raise ToolkitError(f"no adapter named '{unknown[0]}' is loaded (loaded: {', '.join(reg) or 'none'})")
        for name, info in reg.items():
            s = float(scales.get(name, 0.0))
            if s == info.scale:
                continue
            info.scale = s
            for t in info.targets:
                if t not in self.__dict__["_lora_norms"]:
                    self._wrap(t).set_scale(name, s)
        self._apply_norms()

    def unload_adapter(self, name: str) -> None:
        reg = self._registry()
        if name not in reg:
            raise ToolkitError(f"no adapter named '{name}' is loaded")
        self._detach(name, reg.pop(name).targets)
        self._apply_norms()

    def _detach(self, name: str, targets: list[str]) -> None:
        norms = self.__dict__["_lora_norms"]
        for t in targets:
            if t in norms:
                norms[t][1].pop(name, None)
            else:
                mod = self.lora_targets().get(t)  # type: ignore[attr-defined]
                if isinstance(mod, _LoRABase) and name in mod.names:
                    mod.remove(name)

    # -- norm weights (llama.cpp ignores these; we add them to the norm's weight)
    def _norm_module(self, t: str) -> nn.Module:
        try:
            return self.get_submodule(t[: -len(".weight")])  # type: ignore[attr-defined]
        except AttributeError:
            raise ToolkitError(f"this model has no norm '{t}'") from None

    def _norm_base(self, t: str) -> Tensor:
        norms = self.__dict__["_lora_norms"]
        if t not in norms:
            norms[t] = (self._norm_module(t).weight, {})
        return norms[t][0].detach()

    def _add_norm_delta(self, name: str, t: str, delta: Tensor) -> None:
        base = self._norm_base(t)
        if delta.numel() != base.numel():
            raise ToolkitError(f"norm adapter '{t}' has {delta.numel()} values, the model's has {base.numel()}")
        self.__dict__["_lora_norms"][t][1][name] = delta.to(base.device, torch.float32).reshape(base.shape)
        if t not in _NORM_WARNED:
            _NORM_WARNED.add(t)
            if len(_NORM_WARNED) == 1:
                warnings.warn("adapter carries norm weights: toolkit applies them, llama.cpp skips them", stacklevel=3)

    def _apply_norms(self) -> None:
        reg = self._registry()
        for t, (base, deltas) in self.__dict__["_lora_norms"].items():
            active = [(reg[n].scale, d) for n, d in deltas.items() if n in reg and reg[n].scale != 0.0]
            mod = self._norm_module(t)
            if not active:
                mod.weight = base  # the original Parameter: base results bit for bit
                continue
            w = base.detach().float().clone()
            for s, d in active:
                w += s * d
            mod.weight = nn.Parameter(w.to(base.dtype), requires_grad=False)

    # -- training
    def add_trainable_adapter(self, name: str, ranks: dict[str, int], alpha: float, dropout: float = 0.0,
                              init: str = "peft") -> list[nn.Parameter]:
        """New adapter to train: ranks {GGUF weight name: r}; scale alpha / r. init 'peft': A kaiming-uniform
        (a=sqrt(5)), B zeros (embedding: A zeros, B normal), as PEFT does; 'gaussian': A normal(1/r), B zeros."""
        from .adapter import Adapter

        reg = self._registry()
        if name in reg:
            raise ToolkitError(f"an adapter named '{name}' is already loaded")
        if init not in ("peft", "gaussian"):
            raise ToolkitError(f"unknown LoRA init '{init}' (use peft or gaussian)")
        params: list[nn.Parameter] = []
        done: list[str] = []
        try:
            for t, r in ranks.items():
                mod = self._wrap(t)
                emb = isinstance(mod, LoRAEmbedding)
                n_in = mod.num_embeddings if emb else mod.in_features
                n_out = mod.embedding_dim if emb else mod.out_features
                a, b = torch.empty(r, n_in), torch.zeros(n_out, r)
                if emb:
                    a.zero_()
                    nn.init.normal_(b)
                elif init == "peft":
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                else:
                    nn.init.normal_(a, std=1.0 / r)
                scale = alpha / r if alpha else 1.0
                params += mod.add(name, a, b, scale, user_scale=1.0, trainable=True, dropout=dropout)
                done.append(t)
        except BaseException:
            self._detach(name, done)
            raise
        reg[name] = AdapterInfo(name, 1.0, float(alpha), dict(ranks), done, "", True,
                                Adapter({}, float(alpha), getattr(getattr(self, "args", None), "arch", "")))
        return params

    def export_adapter(self, name: str) -> Any:
        """The adapter's current tensors as an Adapter (for write_gguf_adapter / write_peft_adapter)."""
        from .adapter import Adapter, LoraPair

        reg = self._registry()
        if name not in reg:
            raise ToolkitError(f"no adapter named '{name}' is loaded")
        info = reg[name]
        src = info.source
        tensors: dict[str, LoraPair] = {}
        for t in info.targets:
            if t in self.__dict__["_lora_norms"]:
                continue
            a, b = self._wrap(t).pair(name)
            tensors[t] = LoraPair(a.detach().float().cpu().clone(), b.detach().float().cpu().clone())
        for t, pair in (src.tensors.items() if src is not None else ()):
            if t not in tensors:  # norm LoRA pairs live as deltas; keep the originals
                tensors[t] = pair
        arch = src.arch if src is not None and src.arch else getattr(getattr(self, "args", None), "arch", "")
        g = getattr(self, "gguf", None)
        base_name = (src.base_model if src is not None else "") or (str(g.get("general.name", "")) if g else "")
        extra = dict(src.extra) if src is not None else {}
        norms = dict(src.norms) if src is not None else {}
        return Adapter(tensors, info.alpha, arch, base_name, norms, extra, info.path)


def _default_name(path: str | Path, taken: dict[str, Any]) -> str:
    p = Path(path)
    stem = p.name[: -len(p.suffix)] if p.suffix and not p.is_dir() else p.name
    name, i = stem or "adapter", 2
    while name in taken:
        name, i = f"{stem}-{i}", i + 1
    return name
