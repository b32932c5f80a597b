"""Many sequences at once over one model (continuous batching): each in a slot of the KV cache with its own
positions, sampling parameters, seed and adapter set.

Every step() runs one forward pass for the decoding slots (one new token each, rows of different lengths
together: toolkit.model masks each row to its own positions) and, between such passes, prefill chunks of at most
prefill_chunk prompt tokens, so a long prompt never stalls the decoding slots for its whole length. Each row's
adapters ride on the shared base product (toolkit.linear_group.RowAdapters). Slots free when a sequence ends and
take the next one.

A freed slot keeps its cache: a later prompt that starts with the tokens it holds (same adapter set) takes that
slot and prefills only the rest (llama-server's cache_prompt, vLLM's prefix caching): a chat's next turn, or the
same system prompt again, costs only its new tokens. A cached key or value depends only on the tokens up to it,
its position and the adapters, so the reused entries are the ones a fresh prefill would write (while the model's
base weights stay as they are: change them, and make a new engine).

    engine = BatchEngine(model, n_slots=8, n_ctx=2048)
    slot = engine.add(tok.encode("Hello"), SamplingParams(temperature=0), adapters={"a": 1.0})
    while engine.active:
        for slot, token, finished in engine.step(): ...  # or prefill() and decode(), the step's two halves
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from toolkit.compiled import batch_rows
from toolkit.errors import ToolkitError
from toolkit.linear_group import RowAdapters
from toolkit.lora import LoRALinear

from .sampling import SamplingParams, seeded_generator


@dataclass
class _Seq:
    prompt: list[int]
    params: SamplingParams
    adapters: dict[str, float]
    gen: torch.Generator
    max_new: int
    order: int
    history: list[int] = field(default_factory=list)  # prompt + generated (penalties look at it)
    prefilled: int = 0  # prompt tokens in the cache
    n_new: int = 0
    next_token: int | None = None  # sampled, not yet in the cache: the next decode step feeds it
    cached: int = 0  # leading tokens of history whose keys and values are in the slot's cache
    reused: int = 0  # of the prompt's, those a previous sequence left there (not prefilled)


@dataclass
class _Kept:
    """What a freed slot's cache holds: keys and values of `tokens` under adapter set `key`."""
    tokens: list[int]
    key: tuple  # ((name, scale, the AdapterInfo itself), ...): a name unloaded and loaded again is a new adapter


_orders = itertools.count()


class BatchEngine:
    """n_slots sequences over one model; every step() advances all of them in one forward pass.

    While it is in use the engine owns the model's KV caches (setup_caches(n_slots, n_ctx)); other generations on
    the same model in between are fine (the engine puts its caches back), but not at the same time. The adapter
    set of a sequence replaces the model's active set for that sequence only; adapters=None at add() takes the
    active set as it is then."""

    def __init__(self, model, n_slots: int, n_ctx: int, prefill_chunk: int = 256, reuse_prefix: bool = True):
        if n_slots < 1 or n_ctx < 2 or prefill_chunk < 1:
            raise ToolkitError(f"a batch needs n_slots >= 1, n_ctx >= 2 and prefill_chunk >= 1 "
                               f"(got {n_slots}, {n_ctx}, {prefill_chunk})")
        self.model, self.n_slots, self.n_ctx, self.prefill_chunk = model, n_slots, n_ctx, prefill_chunk
        self.device = model.output_norm.weight.device
        model.setup_caches(n_slots, n_ctx)
        self._caches = [b.kv_cache for b in model.blk]
        self._seqs: list[_Seq | None] = [None] * n_slots
        self.reuse_prefix = reuse_prefix
        self._kept: list[_Kept | None] = [None] * n_slots  # free slots' caches (reuse_prefix)
        self._rows: tuple[tuple, RowAdapters] | None = None  # the decode rows' RowAdapters, while they stay

    # -- slots
    @property
    def n_free(self) -> int:
        return sum(s is None for s in self._seqs)

    @property
    def active(self) -> list[int]:
        return [i for i, s in enumerate(self._seqs) if s is not None]

    def add(self, prompt_ids: list[int], params: SamplingParams, adapters: dict[str, float] | None = None,
            reuse: bool = True) -> int:
        """Claim a free slot (ToolkitError if none is free or the prompt does not fit n_ctx); the prompt is
        prefilled in chunks over the next step() calls. adapters: names already loaded in the model
        (model.load_adapter) -> scale, for this sequence only. reuse: take the free slot whose cache holds the
        longest start of the prompt (at least one prompt token is prefilled, for the first token's logits);
        False, or reuse_prefix off: the lowest free slot, the whole prompt prefilled."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ToolkitError("empty prompt: nothing to condition on (give some text, or a model that adds BOS)")
        if len(prompt) >= self.n_ctx:
            raise ToolkitError(f"the prompt has {len(prompt)} tokens, more than the context of {self.n_ctx}")
        free = [i for i, s in enumerate(self._seqs) if s is None]
        if not free:
            raise ToolkitError(f"all {self.n_slots} slots are busy")
        room = self.n_ctx - len(prompt)
        max_new = min(params.max_tokens, room) if params.max_tokens >= 0 else room
        aset = self._adapter_set(adapters)
        key = self._key(aset)
        slot, n = free[0], 0
        if reuse and self.reuse_prefix:
            shared = {i: self._shared(i, prompt, key) for i in free}
            slot = max(free, key=shared.__getitem__)  # ties: the lowest slot (max keeps the first)
            n = shared[slot]
        seq = _Seq(prompt, params, aset, seeded_generator(params.seed), max_new, next(_orders), list(prompt))
        seq.prefilled = seq.cached = seq.reused = min(n, len(prompt) - 1)
        self._seqs[slot], self._kept[slot] = seq, None
        return slot

    def reused(self, slot: int) -> int:
        """Prompt tokens of the slot's sequence that a previous one had left in the cache (not prefilled)."""
        return self._seqs[slot].reused

    def _key(self, aset: dict[str, float]) -> tuple | None:
        """The adapter set's identity for reuse; None once one of its adapters is unloaded."""
        loaded = self.model.adapters
        if any(n not in loaded for n in aset):
            return None
        return tuple(sorted((n, s, loaded[n]) for n, s in aset.items()))

    def _shared(self, slot: int, prompt: list[int], key: tuple) -> int:
        """Leading prompt tokens that free slot `slot`'s cache holds under adapter set `key`."""
        kept = self._kept[slot]
        if kept is None or len(kept.key) != len(key) or any(
                a[:2] != b[:2] or a[2] is not b[2] for a, b in zip(kept.key, key)):
            return 0
        n = 0
        for a, b in zip(kept.tokens, prompt):
            if a != b:
                break
            n += 1
        return n

    def _free(self, slot: int) -> None:
        seq = self._seqs[slot]
        self._seqs[slot] = None
        # at most n_ctx - 1 tokens: a compiled step's padding row writes a free slot's next position
        # (_pad_position), which must not be one of them
        n, key = min(seq.cached, self.n_ctx - 1), self._key(seq.adapters)
        self._kept[slot] = _Kept(seq.history[:n], key) if self.reuse_prefix and n and key is not None else None

    def cancel(self, slot: int) -> None:
        """Free the slot now (client went away)."""
        self._free(slot)

    def close(self) -> None:
        """Give the model's KV caches back (the engine cannot step afterwards)."""
        if self.model.blk[0].kv_cache is self._caches[0]:
            self.model.clear_caches()
        self._seqs = [None] * self.n_slots
        self._kept = [None] * self.n_slots

    def _adapter_set(self, adapters: dict[str, float] | None) -> dict[str, float]:
        loaded = self.model.adapters
        if adapters is None:
            adapters = {n: i.scale for n, i in loaded.items() if i.scale != 0.0 and not i.trainable}
        unknown = [n for n in adapters if n not in loaded]
        if unknown:
            raise ToolkitError(f"no adapter named '{unknown[0]}' is loaded (loaded: {', '.join(loaded) or 'none'})")
        norms = self.model.__dict__.get("_lora_norms", {})
        full = self.model.__dict__.get("_lora_full", {})
        dora = {n for m in self.model.modules() if isinstance(m, LoRALinear) for n in m.dora_g}
        for n, s in adapters.items():
            if s == 0.0:
                continue
            if any(n in deltas for _, deltas in norms.values()):
                raise ToolkitError(f"adapter '{n}' changes norm weights, which the whole batch shares: "
                                   "it cannot be used per sequence")
            if any(n in weights for _, weights in full.values()):
                raise ToolkitError(f"adapter '{n}' replaces whole weights (modules_to_save), which the whole batch "
                                   "shares: it cannot be used per sequence (merge it with toolkit export-lora)")
            if n in dora:  # DoRA rescales each base output row: per sequence that is a base of its own
                raise ToolkitError(f"adapter '{n}' is DoRA, whose magnitude rescales the shared base output: it "
                                   "cannot be used per sequence (merge it with toolkit export-lora)")
        return {n: float(s) for n, s in adapters.items() if s != 0.0}

    # -- stepping
    def _names(self) -> tuple[str, ...]:
        """The adapters a row may name: every inference adapter loaded in the model, in load order."""
        return tuple(n for n, i in self.model.adapters.items() if not i.trainable)

    def _row_adapters(self, slots: list[int], decoding: set[int]) -> RowAdapters:
        names = self._names()
        # order, not id(): ids are reused; padding rows (not decoding) use no adapters
        key = (names, tuple((s, self._seqs[s].order if s in decoding else None) for s in slots))
        if self._rows is None or self._rows[0] != key:
            sets = [self._seqs[s].adapters if s in decoding else None for s in slots]
            self._rows = (key, RowAdapters.make(names, sets, self.device))
        return self._rows[1]

    def _pad_position(self, slot: int) -> int:
        """Where a padding row (batch_rows) may write in its slot: a position that is written again before anything
        reads it (a free slot's first past what it keeps, a prefilling one's next prompt position)."""
        seq = self._seqs[slot]
        if seq is None:
            kept = self._kept[slot]
            return 0 if kept is None else len(kept.tokens)
        return seq.prefilled

    def _install(self) -> None:
        if self.model.blk[0].kv_cache is not self._caches[0]:  # someone else used the model in between
            self.model.install_caches(self._caches)

    def _emit(self, slot: int, logits: torch.Tensor, out: list) -> None:
        seq = self._seqs[slot]
        tok = seq.params.pick(logits, seq.history, seq.gen)
        if tok in seq.params.stop_ids:
            self._free(slot)
            out.append((slot, None, True))
            return
        seq.history.append(tok)
        seq.n_new += 1
        finished = seq.n_new >= seq.max_new
        out.append((slot, tok, finished))
        if finished:
            self._free(slot)
        else:
            seq.next_token = tok

    def step(self) -> list[tuple[int, int | None, bool]]:
        """One engine step: `prefill()` then `decode()`. Returns (slot, new token id or None, finished) for each
        token a slot produced or its finishing, in order; a finished slot is freed (EOS in stop_ids ends it
        without yielding the token, as does max_tokens)."""
        return self.prefill() + self.decode()

    @torch.inference_mode()
    def prefill(self) -> list[tuple[int, int | None, bool]]:
        """The waiting prompts' next chunks, up to prefill_chunk tokens, in one forward pass; a slot whose prompt
        completes yields its first token (and decodes in the `decode()` that follows). Events as step's."""
        self._install()
        out: list[tuple[int, int | None, bool]] = []
        budget = self.prefill_chunk
        waiting = sorted((s.order, i) for i, s in enumerate(self._seqs) if s is not None and s.next_token is None)
        chunks: list[tuple[int, int]] = []  # (slot, tokens of its prompt in this step)
        for _, slot in waiting:
            seq = self._seqs[slot]
            if seq.max_new <= 0:  # nothing to generate: no prefill either
                self._free(slot)
                out.append((slot, None, True))
                continue
            if budget <= 0:
                break
            n = min(budget, len(seq.prompt) - seq.prefilled)
            chunks.append((slot, n))
            budget -= n
        if chunks:
            self._prefill(chunks, out)
        return out

    @torch.inference_mode()
    def decode(self) -> list[tuple[int, int | None, bool]]:
        """One token for every decoding slot, in one forward pass. Events as step's."""
        self._install()
        out: list[tuple[int, int | None, bool]] = []
        decoding = [i for i, s in enumerate(self._seqs) if s is not None and s.next_token is not None]
        if decoding:
            dev = self.device
            rows = batch_rows(self.model, decoding)  # under compile_decode: padded to the compiled layout
            real = set(decoding)
            seqs = [self._seqs[i] if i in real else None for i in rows]
            tokens = torch.tensor([[s.next_token if s else 0] for s in seqs], device=dev)
            pos = torch.tensor([[len(s.history) - 1 if s else self._pad_position(i)] for s, i in zip(seqs, rows)],
                               device=dev)
            logits = self.model(tokens, input_pos=pos, slots=rows, adapters=self._row_adapters(rows, real))
            for b, slot in enumerate(rows):
                if slot in real:
                    self._seqs[slot].cached = len(self._seqs[slot].history)  # next_token is in the cache now
                    self._emit(slot, logits[b, -1], out)
        return out

    def _prefill(self, chunks: list[tuple[int, int]], out: list) -> None:
        """The step's prompt chunks in one forward pass: rows padded at the end to the longest chunk (the padding
        writes the cache past the row's chunk, where the row reads nothing before its next chunk or its decoding
        writes there again), each row's logits at its own last token. A row whose padding would run past its slot
        is prefilled alone."""
        dev, T = self.device, max(n for _, n in chunks)
        fits = [(slot, n) for slot, n in chunks if self._seqs[slot].prefilled + T <= self.n_ctx]
        groups = [fits] if len(fits) > 1 else [[c] for c in fits]
        groups += [[c] for c in chunks if c not in fits]
        for group in groups:
            T = max(n for _, n in group)
            seqs = [self._seqs[slot] for slot, _ in group]
            tokens = torch.tensor([s.prompt[s.prefilled:s.prefilled + n] + [0] * (T - n)
                                   for s, (_, n) in zip(seqs, group)], device=dev)
            pos = torch.stack([torch.arange(s.prefilled, s.prefilled + T, device=dev) for s in seqs])  # [k, T]
            last = torch.tensor([n - 1 for _, n in group], device=dev)
            logits = self.model(tokens, input_pos=pos, slots=[slot for slot, _ in group], last_only=last,
                                adapters=RowAdapters.make(self._names(), [s.adapters for s in seqs], dev))
            for b, (s, (slot, n)) in enumerate(zip(seqs, group)):
                s.prefilled += n
                s.cached = s.prefilled
                if s.prefilled == len(s.prompt):
                    self._emit(slot, logits[b, -1], out)


def generate_batch(model, tokenizer, prompts: Sequence[str | Sequence[int]],
                   params: Sequence[SamplingParams] | SamplingParams,
                   adapters: Sequence[dict[str, float] | None] | None = None, n_slots: int | None = None,
                   *, ignore_eos: bool = False, prefill_chunk: int = 256) -> list[str]:
    """The new text of every prompt (text, tokenized with the model's BOS rule, or ids), run together on a
    BatchEngine of n_slots slots (default: one per prompt, at most 16). params: one for all or one per prompt;
    the tokenizer's end-of-generation ids stop a sequence unless ignore_eos. adapters: per prompt, {name: scale}
    of adapters loaded in the model (None: the model's active set). A sequence gives the same tokens as it would
    alone (greedy, or sampled with the same seed) up to the float rounding of batched kernels."""
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if not ids:
        return []
    plist = list(params) if isinstance(params, Sequence) else [params] * len(ids)
    alist = list(adapters) if adapters is not None else [None] * len(ids)
    if len(plist) != len(ids) or len(alist) != len(ids):
        raise ToolkitError(f"{len(ids)} prompts but {len(plist)} sampling params and {len(alist)} adapter sets")
    stop = frozenset() if ignore_eos else frozenset(tokenizer.eot_ids)
    plist = [replace(p, stop_ids=p.stop_ids | stop) for p in plist]
    n_ctx = max(len(i) + (p.max_tokens if p.max_tokens >= 0 else model.args.ctx_len) for i, p in zip(ids, plist))
    engine = BatchEngine(model, n_slots or min(len(ids), 16), n_ctx, prefill_chunk)
    out: list[list[int]] = [[] for _ in ids]
    owner: dict[int, int] = {}
    pending = list(range(len(ids)))[::-1]
    try:
        while pending or owner:
            while pending and engine.n_free:
                i = pending.pop()
                owner[engine.add(ids[i], plist[i], alist[i])] = i
            for slot, tok, finished in engine.step():
                if tok is not None:
                    out[owner[slot]].append(tok)
                if finished:
                    del owner[slot]
    finally:
        engine.close()
    return [tokenizer.decode(o) for o in out]
