"""`toolkit convert lora IN -o OUT [--base base.gguf|hf_dir] [--outtype f32|f16|bf16|q8_0]`.

IN: a PEFT directory, a GGUF adapter, an old GGLA file or an old finetune checkpoint. OUT ending in `.gguf`
gets llama.cpp's GGUF adapter format; anything else becomes a PEFT directory. Everything unsupported is refused
with one line before anything is written (outputs are atomic, so a failure leaves no partial file).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.adapter import (
    OUTTYPES,
    BaseInfo,
    read_adapter,
    write_gguf_adapter,
    write_peft_adapter,
)
from toolkit.config import arg, parse_config
from toolkit.errors import ToolkitError


@dataclass
class ConvertLoraConfig:
    input: str = arg(None, "input", help="PEFT adapter folder, GGUF adapter, or old GGLA file")
    output: str = arg(None, "-o", "--output", help="OUT.gguf (llama.cpp adapter) or a folder (PEFT adapter)",
                      required=True)
    base: str = arg(None, "--base", help="base model: GGUF file or Hugging Face model folder (config.json); "
                                         "needed for PEFT input and for llama-type q/k")
    outtype: str = arg("f32", "--outtype", help="GGUF tensor type", choices=list(OUTTYPES))


def convert_lora(src: str | Path, out: str | Path, base: str | Path | None = None, outtype: str = "f32") -> Path:
    """Convert one adapter; returns the output path."""
    if src is None:
        raise ToolkitError("no input adapter given")
    info = BaseInfo.of(base) if base else None
    adapter = read_adapter(src, base=info)
    out = Path(out)
    if out.resolve() == Path(src).resolve():
        raise ToolkitError("output would overwrite the input", str(out))
    if out.suffix.lower() == ".gguf":
        write_gguf_adapter(adapter, out, outtype=outtype, base=info)
    else:
        if outtype != "f32":
            raise ToolkitError("--outtype applies to GGUF output only (PEFT adapters are written in float32)")
        write_peft_adapter(adapter, out, base=info)
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ConvertLoraConfig, argv, prog="toolkit convert lora",
                       description="Convert LoRA adapters between PEFT and llama.cpp's GGUF (and read old GGLA).")
    out = convert_lora(cfg.input, cfg.output, cfg.base, cfg.outtype)
    print(f"wrote {out}")
    return 0
