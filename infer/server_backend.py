"""The GGUF model behind `toolkit serve`: toolkit.load + toolkit.lora adapters + infer.generate's sampler.

Only the engine's model thread calls these methods (see server_engine.py), so none of them lock.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from toolkit.errors import ToolkitError

from .server_protocol import Sampling


class ModelBackend:
    def __init__(self, model: Any, tokenizer: Any, n_ctx: int, model_id: str):
        self.model, self.tok = model, tokenizer
        self.n_ctx, self.model_id = n_ctx, model_id
        self.vocab_size = int(tokenizer.vocab_size)

    @classmethod
    def load(cls, path: str, device: str = "auto", dtype: str | None = None, weights: str = "auto", ctx_size: int = 4096,
             threads: int = 0, alias: str | None = None, compile: bool = False) -> "ModelBackend":
        import torch

        from toolkit.model import load

        if threads > 0:
            torch.set_num_threads(threads)
        if not os.path.isfile(path):
            raise ToolkitError("model file not found", path)
        model, tok = load(path, device=device, dtype=dtype, weights=weights, compile=compile)
        train_ctx = int(model.args.ctx_len) if getattr(model.args, "ctx_len", None) else 0
        n_ctx = train_ctx if ctx_size <= 0 else (min(ctx_size, train_ctx) if train_ctx else ctx_size)
        return cls(model, tok, n_ctx, alias or Path(path).name)

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

    def set_adapters(self, scales: dict[str, float]) -> None:
        self.model.set_adapters(scales)

    # -- generation
    def generate(self, prompt_ids: list[int], s: Sampling) -> Iterator[int]:
        """The same token loop `toolkit.generate` / `toolkit infer` run (same sampler chain, seed handling and
        end-of-generation ids), so a request's text equals theirs for the same adapter set and seed."""
        from .generate import generate_tokens

        if s.max_tokens == 0:  # nothing to generate: skip the prefill too
            return iter(())
        stop = frozenset() if s.ignore_eos else frozenset(self.tok.eot_ids)
        return generate_tokens(self.model, prompt_ids, s.max_tokens, s.temperature, s.top_k, s.top_p, s.min_p,
                               s.repeat_penalty, s.presence_penalty, s.frequency_penalty, seed=s.seed,
                               stop_ids=stop, n_ctx=self.n_ctx)
