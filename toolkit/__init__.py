"""toolkit: llama.cpp's LoRA workflow in PyTorch, exact with both GGUF (llama.cpp) and PEFT safetensors."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "generate", "generate_batch"]


def __getattr__(name: str):
    # lazy: `import toolkit` stays cheap for the CLI and for users who only need gguf_io/quants
    if name == "load":
        from .model import load

        return load
    if name == "generate":
        from .infer.generate import generate

        return generate
    if name == "generate_batch":
        from .infer.batch import generate_batch

        return generate_batch
    raise AttributeError(name)
