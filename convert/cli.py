"""`toolkit convert lora|model ...`: adapters PEFT <-> GGUF (convert/lora.py), models HF <-> GGUF (convert/model.py)."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from toolkit.config import arg, parse_config

USAGE = """usage: toolkit convert <what> ...

  lora IN -o OUT [--base BASE] [--outtype f32|f16|bf16|q8_0]
        PEFT adapter folder <-> llama.cpp GGUF adapter (OUT.gguf -> GGUF, else a PEFT folder); reads old GGLA too
  model IN -o OUT [--outtype TYPE]
        Hugging Face model folder -> GGUF, or GGUF -> Hugging Face folder

`toolkit convert lora --help` / `toolkit convert model --help` list the options."""


@dataclass
class ConvertModelConfig:
    input: str = arg(None, "input", help="Hugging Face model folder (safetensors) or a GGUF model")
    output: str = arg(None, "-o", "--output", help="model.gguf, or a folder for a Hugging Face model", required=True)
    outtype: str = arg("f16", "--outtype", help="GGUF tensor type (f32, f16, bf16, q8_0, q4_0, q4_k, q6_k, ...)")


def model_main(argv: list[str]) -> int:
    cfg = parse_config(ConvertModelConfig, argv, prog="toolkit convert model",
                       description="Convert a model between Hugging Face safetensors and GGUF.")
    # lazy: written separately, heavy imports
    from toolkit.convert.model import convert_model

    out = convert_model(cfg.input, cfg.output, cfg.outtype)
    print(f"wrote {out if out is not None else cfg.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    what, rest = argv[0], argv[1:]
    if what == "lora":
        from toolkit.convert.lora import main as lora_main

        return lora_main(rest)
    if what == "model":
        return model_main(rest)
    print(f"toolkit convert: error: unknown kind '{what}' (use lora or model)\n\n{USAGE}", file=sys.stderr)
    return 2
