"""One config source per command: a dataclass whose fields carry defaults and help.

`arg(...)` declares a field; `parse_config(Cls, argv)` builds argparse from the dataclass, reads an optional
`--config file.yaml` (any field, by its flag name or field name), and lets the command line win.

    @dataclass
    class InferConfig:
        model: str = arg(None, "-m", "--model", help="GGUF model file", required=True)
        temp: float = arg(0.8, help="sampling temperature")
        ignore_eos: bool = arg(False, help="keep generating past end-of-sequence")
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from .errors import ToolkitError

T = TypeVar("T")


def arg(default: Any = None, *flags: str, help: str = "", required: bool = False, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag.

    flags: explicit option strings (default: --field-name). Extra kwargs go to add_argument
    (nargs, action, choices, metavar, type). Bool fields get --name / --no-name automatically.
    """
    meta = {"flags": flags, "help": help, "required": required, "kwargs": argparse_kwargs}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> Any:
    """Optional[X] / X | None -> X; list[X] -> list."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return tp


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML file of options (keys: flag or field names); the command line wins")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta:
            continue
        flags = list(meta["flags"]) or ["--" + f.name.replace("_", "-")]
        kwargs = dict(meta["kwargs"])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs.setdefault("help", meta["help"] or " ")
        kwargs["default"] = argparse.SUPPRESS  # so we know what the user actually typed
        if not flags[0].startswith("-"):  # positional: arg(None, "input"); optional so --config may supply it
            flags = [f.name]
            kwargs.setdefault("nargs", "?")
        else:
            kwargs["dest"] = f.name
        tp = _base_type(hints[f.name])
        if tp is bool and "action" not in kwargs:
            long = [fl for fl in flags if fl.startswith("--")]
            kwargs["action"] = argparse.BooleanOptionalAction if long else "store_true"
        elif "action" not in kwargs and "type" not in kwargs:
            if typing.get_origin(tp) is list:
                (item,) = typing.get_args(tp) or (str,)
                kwargs.setdefault("nargs", "+")
                kwargs["type"] = item if item in (int, float, str) else str
            elif tp in (int, float, str):
                kwargs["type"] = tp
        if default is not None and default != [] and "help" in kwargs:
            kwargs["help"] = kwargs["help"].rstrip() + f" (default: {default})"
        parser.add_argument(*flags, **kwargs)
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ToolkitError("config file not found", path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ToolkitError(f"not valid YAML ({str(e).splitlines()[0]})", path) from None
    if not isinstance(data, dict):
        raise ToolkitError("a config file must be a mapping of option: value", path)
    return data


def parse_config(cls: type[T], argv: Sequence[str] | None, prog: str, description: str = "") -> T:
    """Defaults < YAML (--config) < command line. Unknown YAML keys are an error naming the file."""
    parser = build_parser(cls, prog, description)
    ns = vars(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    values: dict[str, Any] = {}
    if "config" in ns:
        cfg_path = ns.pop("config")
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in load_yaml(cfg_path).items():
            name = str(key).lstrip("-").replace("-", "_")
            if name not in names:
                raise ToolkitError(f"unknown option '{key}'", cfg_path)
            values[name] = value
    values.update(ns)
    missing = [f.name for f in dataclasses.fields(cls) if f.metadata.get("required") and values.get(f.name) is None]
    if missing:
        parser.error("the following arguments are required: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return cls(**values)


WEIGHT_MODES = ("auto", "packed", "ggml", "bf16", "float", "train")  # toolkit.model.set_weight_mode says what each does


def weights_arg() -> Any:
    """The --weights field shared by the commands that run a model (infer, perplexity, serve)."""
    return arg("auto", "--weights", choices=[m for m in WEIGHT_MODES if m != "train"],  # "train": finetune's
               help="how quantized weights compute: auto (CPU: ggml where llama-cpp-python's libggml loads, else "
                    "packed; float elsewhere), ggml (CPU: llama.cpp's own matmul over the GGUF blocks, 8-bit "
                    "activations as llama.cpp), packed (CPU: torch's int4/bf16 weight-only kernels for decoding, "
                    "close to float), bf16 (packed, plus a bf16 copy for "
                    "prefill and batches of 8+ rows (24+ where the copy cannot be prepacked): faster on CPUs with "
                    "bf16 instructions (AVX512-BF16, AMX), slower on others (AVX2 emulates bf16), 2 bytes a weight "
                    "more), float (a dequantized copy: exact, 4-8x the memory)")


def compile_arg() -> Any:
    """The --compile field shared by the commands that decode (infer, serve)."""
    return arg(False, "--compile", help="compile the decode step with torch.compile at load (a minute the first time, "
                                        "seconds once inductor's disk cache is warm): fewer, fused kernels per token")


def parse_lora_flags(lora: Sequence[str] = (), lora_scaled: Sequence[Sequence[str]] = ()) -> list[tuple[str, float]]:
    """llama.cpp's adapter flags -> [(file, scale), ...]: `--lora A[,B...]` (scale 1), `--lora-scaled FNAME SCALE`
    and llama-export-lora's `--lora-scaled FNAME:SCALE[,...]`. Shared by infer, perplexity, serve, export-lora."""
    out: list[tuple[str, float]] = []
    for item in lora or ():
        out += [(p, 1.0) for p in item.split(",") if p]
    for group in lora_scaled or ():
        group = list(group)
        if len(group) == 2 and ":" not in group[1]:
            items = [(group[0], group[1])]
        elif len(group) == 1:
            items = []
            for part in group[0].split(","):
                path, sep, scale = part.rpartition(":")
                if not sep or not path:
                    raise ToolkitError(f"--lora-scaled '{part}': expected FNAME:SCALE (or FNAME SCALE)")
                items.append((path, scale))
        else:
            raise ToolkitError(f"--lora-scaled {' '.join(group)}: expected FNAME SCALE or FNAME:SCALE,...")
        for path, scale in items:
            try:
                value = float(scale)
            except ValueError:
                raise ToolkitError(f"--lora-scaled {path}: scale '{scale}' is not a number") from None
            if not math.isfinite(value):
                raise ToolkitError(f"--lora-scaled {path}: scale '{scale}' is not finite")
            out.append((path, value))
    return out
