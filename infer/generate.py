"""The decode loop of one sequence (gpt-fast style): one KV-cached loop over the sampling functions of
toolkit.infer.sampling (re-exported here). Many sequences at once: toolkit.infer.batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from toolkit.errors import ToolkitError

from .sampling import (DEFAULTS, IncrementalDetokenizer, SamplingParams, apply_penalties,  # noqa: F401 (re-exported)
                       min_p_filter, sample, seeded_generator, top_k_filter, top_p_filter)

D = DEFAULTS


# --- the loop -----------------------------------------------------------------------------------------------

@dataclass
class GenStats:
    prompt_tokens: int = 0
    prompt_s: float = 0.0  # prefill, first token's logits included
    gen_tokens: int = 0
    gen_s: float = 0.0
    tokens: list[int] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def gen_tps(self) -> float:
        return self.gen_tokens / self.gen_s if self.gen_s else 0.0


@torch.inference_mode()
def generate_tokens(model, prompt_ids: Sequence[int], max_tokens: int, temperature: float = D.temperature,
                    top_k: int = D.top_k, top_p: float = D.top_p, min_p: float = D.min_p,
                    repeat_penalty: float = D.repeat_penalty, presence_penalty: float = D.presence_penalty,
                    frequency_penalty: float = D.frequency_penalty, penalty_last_n: int = D.penalty_last_n,
                    seed: int | None = None, stop_ids: set[int] | frozenset = frozenset(), n_ctx: int | None = None,
                    stats: GenStats | None = None) -> Iterator[int]:
    """Yield sampled token ids (a stop id ends the loop and is not yielded)."""
    if not prompt_ids:
        raise ToolkitError("empty prompt: nothing to condition on (give some text, or a model that adds BOS)")
    device = model.output_norm.weight.device
    limit = n_ctx or (len(prompt_ids) + max_tokens)
    if len(prompt_ids) >= limit:
        raise ToolkitError(f"the prompt has {len(prompt_ids)} tokens, more than the context of {limit}")
    max_tokens = min(max_tokens, limit - len(prompt_ids)) if max_tokens >= 0 else limit - len(prompt_ids)
    gen = seeded_generator(seed)
    stats = stats if stats is not None else GenStats()
    stats.prompt_tokens = len(prompt_ids)
    model.setup_caches(1, len(prompt_ids) + max_tokens)
    history = list(prompt_ids)
    try:
        t0 = time.perf_counter()
        tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        pos = torch.arange(len(prompt_ids), device=device)
        logits = model(tokens, input_pos=pos, last_only=True)[0, -1]
        stats.prompt_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i in range(max_tokens):
            recent = history[-penalty_last_n:] if penalty_last_n > 0 else []
            lg = apply_penalties(logits.float(), recent, repeat_penalty, presence_penalty, frequency_penalty)
            tok = sample(lg, temperature, top_k, top_p, min_p, gen)
            if tok in stop_ids:
                break
            history.append(tok)
            stats.tokens.append(tok)
            stats.gen_tokens += 1
            yield tok
            if i + 1 == max_tokens:
                break
            p = len(history) - 1
            logits = model(torch.tensor([[tok]], device=device), input_pos=torch.tensor([p], device=device))[0, -1]
            stats.gen_s = time.perf_counter() - t1
        stats.gen_s = time.perf_counter() - t1
    finally:
        model.clear_caches()


def detokenize_stream(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Text pieces for a stream of token ids, holding back bytes until they form whole UTF-8 characters
    (a byte-level token can end in the middle of one)."""
    dec = IncrementalDetokenizer(tokenizer)
    for tok in ids:
        piece = dec.add(tok)
        if piece:
            yield piece
    tail = dec.flush()
    if tail:
        yield tail


def stream(model, tokenizer, prompt: str | Sequence[int], max_tokens: int = D.max_tokens,
           temperature: float = D.temperature, top_k: int = D.top_k, top_p: float = D.top_p,
           min_p: float = D.min_p, repeat_penalty: float = D.repeat_penalty,
           seed: int | None = None, ignore_eos: bool = False, stats: GenStats | None = None,
           **kwargs) -> Iterator[str]:
    """The streaming form of generate(): yields text pieces as soon as they are whole UTF-8."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    stop = frozenset() if ignore_eos else frozenset(tokenizer.eot_ids)
    yield from detokenize_stream(tokenizer, generate_tokens(
        model, ids, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed=seed, stop_ids=stop,
        stats=stats, **kwargs))


def generate(model, tokenizer, prompt: str | Sequence[int], max_tokens: int = D.max_tokens,
             temperature: float = D.temperature, top_k: int = D.top_k, top_p: float = D.top_p,
             min_p: float = D.min_p, repeat_penalty: float = D.repeat_penalty,
             seed: int | None = None, ignore_eos: bool = False, **kwargs) -> str:
    """Generate up to max_tokens after prompt (text, tokenized with the model's BOS rule, or ids); returns the
    new text only."""
    return "".join(stream(model, tokenizer, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                          seed, ignore_eos, **kwargs))
