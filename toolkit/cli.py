"""`toolkit <command> ...`: a table of command -> module, imported lazily so `toolkit --help` starts fast.

Each command module has `main(argv: list[str] | None) -> int`. A ToolkitError anywhere becomes one line on
stderr and exit code 1; Ctrl-C exits 130.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "infer": ("toolkit.infer.cli", "generate text with a GGUF model, optionally with LoRA adapters"),
    "perplexity": ("toolkit.infer.perplexity", "llama.cpp-style strided perplexity of a text file"),
    "serve": ("toolkit.infer.serve", "OpenAI-compatible HTTP server with per-request LoRA"),
    "finetune": ("toolkit.train.finetune", "train a LoRA adapter on a GGUF base (quantized bases included)"),
    "export-lora": ("toolkit.convert.export_lora", "merge LoRA adapters into a GGUF base"),
    "convert": ("toolkit.convert.cli", "adapters PEFT <-> GGUF, models HF <-> GGUF"),
    "quantize": ("toolkit.convert.quantize", "quantize a GGUF model to another type"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: toolkit <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`toolkit <command> --help` lists a command's options."]
    return "\n".join(lines)


def run_command(module_name: str, argv: list[str]) -> int:
    from .errors import ToolkitError

    try:
        module = importlib.import_module(module_name)
        return int(module.main(argv) or 0)
    except ToolkitError as e:
        print(f"toolkit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("toolkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"toolkit: error: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(COMMANDS[name][0], rest)


if __name__ == "__main__":
    sys.exit(main())
