"""Sampling and the decode loop (gpt-fast style): small pure functions over logits, one KV-cached loop.

The sampler chain follows llama.cpp's default order: penalties -> top_k -> top_p -> min_p -> temperature ->
draw. temperature <= 0 is greedy (argmax after penalties).
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from toolkit.errors import ToolkitError


# --- sampling: pure functions over logits [V] (float32) ----------------------------------------------------

def apply_penalties(logits: Tensor, recent: Sequence[int], repeat_penalty: float = 1.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> Tensor:
    """llama.cpp's penalties sampler over the recent tokens: logit / p if > 0 else logit * p, then
    - count * frequency - presence."""
    if not recent or (repeat_penalty == 1.0 and presence_penalty == 0.0 and frequency_penalty == 0.0):
        return logits
    ids, counts = torch.tensor(list(recent), dtype=torch.long).unique(return_counts=True)
    ids = ids.to(logits.device)
    counts = counts.to(logits.device, torch.float32)
    out = logits.clone()
    sel = out[ids]
    sel = torch.where(sel > 0, sel / repeat_penalty, sel * repeat_penalty)
    sel = sel - counts * frequency_penalty - presence_penalty
    out[ids] = sel
    return out


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float, min_keep: int = 1) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    cum = probs.cumsum(-1)
    # keep token i while the mass before it is < p (the token that crosses p is kept, as llama.cpp does)
    drop = (cum - probs) >= p
    drop[:min_keep] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))


def min_p_filter(logits: Tensor, p: float) -> Tensor:
    """Drop tokens whose probability is below p times the most likely token's."""
    if p <= 0.0:
        return logits
    threshold = logits.max() + torch.log(torch.tensor(p, dtype=logits.dtype, device=logits.device))
    return logits.masked_fill(logits < threshold, float("-inf"))


def sample(logits: Tensor, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
           generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)
    probs = (logits / temperature).softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


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
def generate_tokens(model, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.8, top_k: int = 40,
                    top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, penalty_last_n: int = 64,
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
    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2**63)))
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
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for tok in ids:
        piece = dec.decode(tokenizer.token_bytes([tok]))
        if piece:
            yield piece
    tail = dec.decode(b"", final=True)
    if tail:
        yield tail


def stream(model, tokenizer, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8,
           top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
           seed: int | None = None, ignore_eos: bool = False, stats: GenStats | None = None,
           **kwargs) -> Iterator[str]:
    """The streaming form of generate(): yields text pieces as soon as they are whole UTF-8."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    stop = frozenset() if ignore_eos else frozenset(tokenizer.eot_ids)
    yield from detokenize_stream(tokenizer, generate_tokens(
        model, ids, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed=seed, stop_ids=stop,
        stats=stats, **kwargs))


def generate(model, tokenizer, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8,
             top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
             seed: int | None = None, ignore_eos: bool = False, **kwargs) -> str:
    """Generate up to max_tokens after prompt (text, tokenized with the model's BOS rule, or ids); returns the
    new text only."""
    return "".join(stream(model, tokenizer, prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                          seed, ignore_eos, **kwargs))
