"""Training checkpoints as GGUF: LoRA tensors, optimizer state, counters, shuffle and RNG state, config.

Nothing is pickled. Tensors are GGUF tensors (F32 / I64 / I8 bytes); everything else is metadata, with
llama.cpp finetune's key names where it had one (`training.iteration_count`, `training.shuffle.rng_state`,
`optimizer.type`, ...), and the resolved config plus the optimizer's non-tensor state as JSON strings.
Writes are atomic (temp file + rename), so a kill during a save leaves the previous checkpoint intact.

File names follow llama.cpp: ITERATION in a name becomes the iteration number, and every save also
writes the LATEST copy (`checkpoint-ITERATION.gguf` -> `checkpoint-12.gguf` and `checkpoint-LATEST.gguf`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, GGUFValueType
from gguf.gguf_writer import GGUFValue

from toolkit.errors import ToolkitError
from toolkit.fileutil import atomic_path
from toolkit.gguf_io import TensorSpec, open_gguf, write_gguf

from .data import ShuffleState, _mt_from_str

FILE_VERSION = 1
TRAINING_TYPE = "toolkit_finetune_lora"  # not llama.cpp's "finetune_lora": a different tensor layout

_DTYPES: dict[torch.dtype, tuple[Q, Any]] = {
    torch.float32: (Q.F32, np.float32), torch.int64: (Q.I64, np.int64), torch.int32: (Q.I32, np.int32),
    torch.uint8: (Q.I8, np.uint8), torch.int8: (Q.I8, np.int8), torch.bool: (Q.I8, np.uint8),
    torch.float64: (Q.F64, np.float64),
}


def train_filename(pattern: str, it_pattern: str, latest: str, iteration: int | None) -> str:
    """llama.cpp's get_train_filename: the first ITERATION becomes the number (or LATEST for None)."""
    return pattern.replace(it_pattern, latest if iteration is None else str(iteration), 1) if it_pattern else pattern


@dataclass
class TrainState:
    """Counters and convergence bookkeeping; `iteration` is the optimizer iteration (llama.cpp's opt->iter)."""
    iteration: int = 0
    tokens: int = 0
    shuffle: ShuffleState = field(default_factory=ShuffleState)
    best_loss: float = float("inf")
    prev_loss: float = float("nan")
    no_improvement: int = 0
    past_losses: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["best_loss"] = None if self.best_loss == float("inf") else self.best_loss
        d["prev_loss"] = None if self.prev_loss != self.prev_loss else self.prev_loss
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainState":
        d = dict(d)
        d["shuffle"] = ShuffleState(**d.get("shuffle", {}))
        d["best_loss"] = float("inf") if d.get("best_loss") is None else d["best_loss"]
        d["prev_loss"] = float("nan") if d.get("prev_loss") is None else d["prev_loss"]
        return cls(**d)


@dataclass
class Checkpoint:
    lora: dict[str, torch.Tensor]  # "blk.0.attn_q.weight.lora_a" -> [r, in] (PEFT orientation, see adapter.py)
    optimizer: dict[str, Any]  # the torch optimizer's state_dict
    optimizer_type: str  # "adam" | "lbfgs"
    state: TrainState
    config: dict[str, Any]
    rng: dict[str, torch.Tensor]
    arch: str = ""


# ----------------------------------------------------------------------------------------------- flatten

def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Nested dict/list with tensors -> JSON-able structure; tensors set aside under "opt.N" names."""
    if isinstance(obj, torch.Tensor):
        name = f"opt.{len(tensors)}"
        t = obj.detach().cpu()
        if t.dtype not in _DTYPES:
            t = t.float()
        tensors[name] = t
        return {"__tensor__": name, "dtype": str(obj.dtype).removeprefix("torch."), "shape": list(obj.shape)}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            t = tensors[obj["__tensor__"]]
            dtype = getattr(torch, obj["dtype"])
            return t.to(dtype).reshape(obj["shape"]) if t.dtype != dtype else t.reshape(obj["shape"])
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
    return obj


def _spec(name: str, t: torch.Tensor) -> TensorSpec:
    t = t.detach().cpu().contiguous()
    qtype, np_dtype = _DTYPES[t.dtype]
    arr = t.numpy() if t.dtype != torch.bool else t.to(torch.uint8).numpy()
    arr = arr.astype(np_dtype, copy=False).reshape(-1) if arr.ndim == 0 else arr.astype(np_dtype, copy=False)
    shape = tuple(arr.shape) or (1,)
    if qtype in (Q.F32,):
        return TensorSpec(name, qtype, shape, arr.reshape(shape))
    # non-float types go as raw bytes (write_gguf converts only float data)
    return TensorSpec(name, qtype, shape, arr.reshape(shape).view(np.uint8).reshape(-1))


# ----------------------------------------------------------------------------------------------- save / load

def _u64(v: int) -> GGUFValue:
    return GGUFValue(int(v), GGUFValueType.UINT64, None)


def save_checkpoint(path: str | Path, ck: Checkpoint) -> None:
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json = _flatten(ck.optimizer, opt_tensors)
    st = ck.state
    meta: dict[str, Any] = {
        "general.architecture": ck.arch or "llama",
        "general.type": "training",
        "training.type": TRAINING_TYPE,
        "training.file_version": FILE_VERSION,
        "training.iteration_count": _u64(st.iteration),
        "training.sample_count": _u64(st.shuffle.train_samples),
        "training.token_count": _u64(st.tokens),
        "training.epoch_count": _u64(st.shuffle.epochs),
        "training.shuffle.samples_hash": _u64(st.shuffle.samples_hash),
        "training.shuffle.rng_state": st.shuffle.rng_state,
        "training.shuffle.sample_count": _u64(st.shuffle.sample_count),
        "training.shuffle.next_sample": _u64(st.shuffle.next_sample),
        "training.state": json.dumps(st.to_json()),
        "training.config": json.dumps(ck.config, default=str),
        "optimizer.file_version": 0,
        "optimizer.type": ck.optimizer_type,
        "optimizer.iteration_count": st.iteration,
        "optimizer.parameter_count": _u64(sum(t.numel() for t in ck.lora.values())),
        "optimizer.state": json.dumps(opt_json),
    }
    specs = [_spec(n, t) for n, t in ck.lora.items()]
    specs += [_spec(n, t) for n, t in opt_tensors.items()]
    specs += [_spec(f"rng.{n}", t) for n, t in ck.rng.items()]
    write_gguf(path, meta, specs)


def _tensor(info) -> torch.Tensor:
    arr = np.array(info.data)  # a copy: the checkpoint file may be overwritten by the next save
    if info.qtype == Q.F32:
        return torch.from_numpy(arr.astype(np.float32).reshape(info.shape))
    np_dtype = {Q.I64: np.int64, Q.I32: np.int32, Q.I8: np.uint8, Q.F64: np.float64}[info.qtype]
    return torch.from_numpy(arr.reshape(-1).view(np.uint8).view(np_dtype).reshape(info.shape).copy())


def load_checkpoint(path: str | Path) -> Checkpoint:
    g = open_gguf(path)
    if g.get("training.type") != TRAINING_TYPE or "training.state" not in g.metadata:
        raise ToolkitError("not a toolkit finetune checkpoint (no training.state)", str(path))
    if int(g.get("training.file_version", -1)) > FILE_VERSION:
        raise ToolkitError(f"checkpoint version {g.get('training.file_version')} is newer than this toolkit",
                           str(path))
    try:
        state = TrainState.from_json(json.loads(g.get("training.state")))
        config = json.loads(g.get("training.config", "{}"))
        opt_json = json.loads(g.get("optimizer.state", "{}"))
        _check_state(state)
        _check_config(config)
        if state.shuffle.rng_state:
            _mt_from_str(state.shuffle.rng_state)
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError, ToolkitError) as e:
        raise ToolkitError(f"corrupt checkpoint metadata ({str(e)[:200]})", str(path)) from None
    lora, opt_t, rng = {}, {}, {}
    for name, info in g.tensors.items():
        if info.qtype not in _NP_TYPES:
            raise ToolkitError(f"tensor '{name}' has type {info.qtype.name}, which checkpoints never hold", str(path))
        t = _tensor(info)
        if name.startswith("opt."):
            opt_t[name] = t
        elif name.startswith("rng."):
            rng[name[4:]] = t
        else:
            lora[name] = t
    if "torch" in rng:
        try:  # a generator of our own: a corrupt state must not touch the global one
            torch.Generator().set_state(rng["torch"].to(torch.uint8))
        except RuntimeError as e:
            raise ToolkitError(f"corrupt RNG state ({str(e)[:200]})", str(path)) from None
    try:
        optimizer = _unflatten(opt_json, opt_t)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ToolkitError(f"corrupt optimizer state ({type(e).__name__}: {str(e)[:200]})", str(path)) from None
    return Checkpoint(lora, optimizer, str(g.get("optimizer.type", "adam")), state, config, rng, g.arch)


_NP_TYPES = {Q.F32, Q.I64, Q.I32, Q.I8, Q.F64}


def _check_state(st: TrainState) -> None:
    """Field types as save_checkpoint writes them (JSON may hold anything); ValueError names the first bad one."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    checks = [("iteration", is_int(st.iteration) and st.iteration < 2**32),  # saved as UINT32
              ("tokens", is_int(st.tokens)),
              ("best_loss", is_num(st.best_loss)), ("prev_loss", is_num(st.prev_loss)),
              ("no_improvement", is_int(st.no_improvement)),
              ("past_losses", isinstance(st.past_losses, list) and all(map(is_num, st.past_losses))),
              ("shuffle.rng_state", isinstance(st.shuffle.rng_state, str))]
    checks += [(f"shuffle.{k}", is_int(getattr(st.shuffle, k))) for k in
               ("samples_hash", "sample_count", "next_sample", "epochs", "train_samples")]
    bad = [k for k, ok in checks if not ok]
    if bad:
        raise ValueError(f"training.state: {bad[0]} has the wrong type")


def _check_config(config: Any) -> None:
    lora = config.get("lora", {}) if isinstance(config, dict) else None
    ranks = lora.get("ranks", {}) if isinstance(lora, dict) else None
    if not isinstance(ranks, dict) or not all(type(r) is int and r > 0 for r in ranks.values()):
        raise ValueError("training.config: lora.ranks must map tensor names to positive ranks")
    alpha = lora.get("alpha", 0.0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError("training.config: lora.alpha must be a number")


def check_resume(ck: Checkpoint, params: dict[str, torch.Tensor], opt: torch.optim.Optimizer, path: str) -> None:
    """Before resuming: the LoRA tensors have the shapes of the parameters they restore, and the optimizer's
    state (already loaded into `opt`) holds, per parameter, numbers or tensors of the parameter's shape."""
    for name, p in params.items():
        t = ck.lora.get(name)
        if t is not None and tuple(t.shape) != tuple(p.shape):
            raise ToolkitError(f"checkpoint tensor '{name}' is {list(t.shape)}, the adapter needs {list(p.shape)}",
                               path)
    if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
        return  # L-BFGS keeps flat whole-model tensors on its first parameter
    for p in params.values():
        st = opt.state.get(p, {})
        if st and not {"step", "exp_avg", "exp_avg_sq"} <= set(st):
            raise ToolkitError("corrupt optimizer state: an Adam moment is missing", path)
        if st and not all(isinstance(st[k], torch.Tensor) for k in ("exp_avg", "exp_avg_sq")):
            raise ToolkitError("corrupt optimizer state: an Adam moment is not a tensor", path)
        step = st.get("step", 1)
        scalar = isinstance(step, torch.Tensor) and step.numel() == 1 or type(step) in (int, float)
        if not (scalar and float(step) >= 1):  # Adam divides by 1 - beta^step (states exist only after a step)
            raise ToolkitError(f"corrupt optimizer state: step {step!r:.40}", path)
        for k, v in st.items():
            ok = isinstance(v, torch.Tensor) and (v.ndim == 0 or tuple(v.shape) == tuple(p.shape)) \
                or isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok:
                raise ToolkitError(f"corrupt optimizer state: '{k}' does not fit its parameter", path)


def save_with_latest(path_pattern: str, it_pattern: str, latest: str, iteration: int, write) -> list[str]:
    """Write `path_pattern` for this iteration through `write(path)`, then the LATEST copy. Returns paths."""
    first = train_filename(path_pattern, it_pattern, latest, iteration)
    write(first)
    out = [first]
    second = train_filename(path_pattern, it_pattern, latest, None)
    if second != first:
        src = Path(first)
        if src.is_dir():
            with atomic_path(second, directory=True) as tmp:
                shutil.rmtree(tmp)
                shutil.copytree(src, tmp)
        else:
            with atomic_path(second) as tmp:
                shutil.copyfile(src, tmp)
        out.append(second)
    return out


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def set_rng_state(rng: dict[str, torch.Tensor]) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].to(torch.uint8))
    cuda = [rng[k].to(torch.uint8) for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
