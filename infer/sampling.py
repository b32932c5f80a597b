"""Sampling: the parameters of one sequence (the one home of their defaults), small pure functions over logits,
and the incremental detokenizer every streaming path uses.

The sampler chain follows llama.cpp's default order: penalties -> top_k -> top_p -> min_p -> temperature ->
draw. temperature <= 0 is greedy (argmax after penalties).
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How one sequence is sampled (llama.cpp's defaults). seed None: a random one."""
    max_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()  # end-of-generation ids (not yielded)

    def pick(self, logits: Tensor, history: Sequence[int], generator: torch.Generator | None) -> int:
        """The next token from logits [V] after `history` (prompt and generated ids): penalties, then sample."""
        recent = history[-self.penalty_last_n:] if self.penalty_last_n > 0 else []
        lg = apply_penalties(logits.float(), recent, self.repeat_penalty, self.presence_penalty,
                             self.frequency_penalty)
        return sample(lg, self.temperature, self.top_k, self.top_p, self.min_p, generator)


DEFAULTS = SamplingParams()


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one sequence's draws: seeded, or from the clock when seed is None."""
    return torch.Generator().manual_seed(seed if seed is not None else time.time_ns() % (2**63))


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


def candidates(logits: Tensor, temperature: float, top_k: int, top_p: float, min_p: float
               ) -> tuple[Tensor, Tensor | None]:
    """The draw's distribution: (probabilities [k], their token ids [k], or None when they are all V in order).
    The filters above in their order, run on the top_k candidates only (the others are out after top_k anyway;
    sorting the whole vocabulary for top_p made sampling cost ~40x the argmax a row)."""
    ids = None
    if 0 < top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, top_k)  # [k], sorted
    logits = min_p_filter(top_p_filter(logits, top_p), min_p)
    return (logits / temperature).softmax(-1), ids


def sample(logits: Tensor, temperature: float = DEFAULTS.temperature, top_k: int = DEFAULTS.top_k,
           top_p: float = DEFAULTS.top_p, min_p: float = DEFAULTS.min_p,
           generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]."""
    if temperature <= 0:
        return int(logits.argmax())
    probs, ids = candidates(logits, temperature, top_k, top_p, min_p)
    choice = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return choice if ids is None else int(ids[choice])


# --- text -------------------------------------------------------------------------------------------------------

class IncrementalDetokenizer:
    """Token ids -> text pieces, holding back bytes until they form whole UTF-8 characters (a byte-level token can
    end in the middle of one). source: a tokenizer with token_bytes(ids) (toolkit.tokenizer.Tokenizer), decoded
    incrementally, or a decode(ids) -> str callable, re-decoded as ids arrive and held back while the text ends
    in U+FFFD. add(id) -> the new text (maybe ""); flush() -> what is left once the sequence ends."""

    def __init__(self, source):
        self._bytes = getattr(source, "token_bytes", None)
        if self._bytes is not None:
            self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._decode: Callable[[list[int]], str] = source
            self.ids: list[int] = []
            self._sent = 0

    def add(self, token_id: int) -> str:
        if self._bytes is not None:
            return self._dec.decode(self._bytes([token_id]))
        self.ids.append(token_id)
        text = self._decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self._sent = text[self._sent:], len(text)
        return piece

    def flush(self) -> str:
        if self._bytes is not None:
            return self._dec.decode(b"", final=True)
        text = self._decode(self.ids)
        piece, self._sent = text[self._sent:], len(text)
        return piece
