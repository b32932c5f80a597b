"""The GGUF model behind `toolkit serve`: toolkit.load + toolkit.lora adapters + toolkit.infer.batch's engine.

Only the engine's model thread calls the model's methods (see server_engine.py), so none of them lock.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError



class ModelBackend:
    def __init__(self, model: Any, tokenizer: Any, n_ctx: int, model_id: str, cache_prompt: bool = True):
        self.model, self.tok = model, tokenizer
        self.n_ctx, self.model_id, self.cache_prompt = n_ctx, model_id, cache_prompt
        self.vocab_size = int(tokenizer.vocab_size)
        self.eot_ids = frozenset(tokenizer.eot_ids)

    @classmethod
    def load(cls, path: str, device: str = "auto", dtype: str | None = None, weights: str = "auto", ctx_size: int = 4096,
             threads: int = 0, alias: str | None = None, compile: bool = False,
             cache_prompt: bool = True) -> "ModelBackend":
        import torch

        from toolkit.model import load

        if threads > 0:
            torch.set_num_threads(threads)
        if not os.path.isfile(path):
            raise ToolkitError("model file not found", path)
        model, tok = load(path, device=device, dtype=dtype, weights=weights)
        if compile:  # only batched steps run here: Engine.warmup compiles them (no single-sequence graph)
            model.compile_decode(warmup=False)
        train_ctx = int(model.args.ctx_len) if getattr(model.args, "ctx_len", None) else 0
        n_ctx = train_ctx if ctx_size <= 0 else (min(ctx_size, train_ctx) if train_ctx else ctx_size)
        return cls(model, tok, n_ctx, alias or Path(path).name, cache_prompt)

    # -- text
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        # a template that writes the BOS text itself must not get a second BOS (llama.cpp warns about it)
        bos = self.tok.tokens[self.tok.bos_id] if self.tok.bos_id is not None else None
        add_bos = None if not (bos and text.startswith(bos)) else False
        return self.tok.encode(text, add_bos=add_bos)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # -- adapters (loaded at scale 0: a request's set turns them on)
    def load_adapter(self, path: str, name: str) -> None:
        self.model.load_adapter(path, name=name, scale=0.0)
        if self.model.adapters[name].source.added_tokens:  # one shared tokenizer cannot follow per-request sets
            self.model.unload_adapter(name)
            raise ToolkitError("the adapter grows the vocabulary (new tokens): serve its merged model instead "
                               "(toolkit export-lora)", path)

    def unload_adapter(self, name: str) -> None:
        self.model.unload_adapter(name)

    # -- generation
    def detokenizer(self) -> Any:
        from .sampling import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tok)

    def new_batch(self, n_slots: int) -> Any:
        """The same sampler chain, seed handling and end-of-generation ids as `toolkit.generate`, over n_slots
        rows, so a request's text equals `toolkit infer`'s for the same adapter set and seed (up to the float
        rounding of batched kernels, prefix reuse included)."""
        from .batch import BatchEngine

        return BatchEngine(self.model, n_slots, self.n_ctx, reuse_prefix=self.cache_prompt)
