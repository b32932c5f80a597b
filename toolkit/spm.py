"""SentencePiece (`llama`) vocabularies as `tokenizers` BPE merges, built fast enough for a 256k-piece vocabulary.

llama.cpp's SPM tokenizer (llm_tokenizer_spm) starts from the characters of the text and repeatedly merges the
adjacent pair whose concatenation is a token with the highest score (ties: the leftmost pair). A BPE model does
the same when its merges are every (a, b) with a, b and a + b all tokens, ranked by the score of a + b: so the
merges are all two-piece splits of every token, best-scoring token first. Equal scores of *different* tokens are
the one place the two can differ (llama.cpp takes the leftmost pair, BPE the lower token id); SentencePiece's own
vocabularies give their pieces distinct scores.

The splits are found with numpy instead of a Python loop over ~2M (token, split point) pairs: every prefix and
suffix of every token gets a 64-bit polynomial hash from one segmented cumulative sum over the code points of
all tokens, and is looked up with its length in a hash table of the tokens' own (hash, length) keys (a false
match needs a 64-bit collision: ~1e-8 for a 256k vocabulary). The merges come out ordered by moving each
token's group of splits, not by sorting them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_P = 0x9E3779B97F4A7C15  # odd: invertible modulo 2^64
_MASK = (1 << 64) - 1
_MIX = np.uint64(0xBF58476D1CE4E5B9)  # odd; splitmix64's multiplier


def _powers(base: int, n: int) -> np.ndarray:
    out, x = [], 1
    for _ in range(n):
        out.append(x)
        x = x * base & _MASK
    return np.array(out, dtype=np.uint64)


class _HashTable:
    """Open addressing with linear probing over 64-bit keys (0 marks an empty slot, so a key of 0 is stored as
    1), built and probed one round at a time for all keys at once. Against binary search in a sorted table
    (~20 dependent cache misses a look-up) a look-up here is one or two."""

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        bits = max(2 * len(keys) - 1, 1).bit_length()          # >= 2 slots a key: short probe runs
        self.mask, self.shift = (1 << bits) - 1, np.uint64(64 - bits)
        keys = np.maximum(keys, np.uint64(1))
        self.keys = np.zeros(1 << bits, dtype=np.uint64)        # [slots]
        self.values = np.zeros(1 << bits, dtype=np.int64)       # [slots] index into keys while building
        todo, at = np.arange(len(keys)), self._home(keys)
        self.rounds = 0
        while len(todo):
            free = self.keys[at] == 0
            self.values[at[free]] = todo[free]                 # of several keys on one free slot, one wins
            self.keys[at[free]] = keys[self.values[at[free]]]
            lost = self.values[at] != todo
            todo, at = todo[lost], (at[lost] + 1) & self.mask
            self.rounds += 1
        self.values = values[self.values]

    def _home(self, h: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # Fibonacci hashing: the top bits of h times an odd constant
            return ((h * _MIX) >> self.shift).astype(np.int64)

    def find(self, h: np.ndarray) -> np.ndarray:
        """The value stored under each key h, -1 where there is none."""
        h = np.maximum(h, np.uint64(1))
        out = np.full(len(h), -1, dtype=np.int64)
        todo, at = np.arange(len(h)), self._home(h)
        for _ in range(self.rounds):
            k = self.keys.take(at)
            hit = k == h[todo]
            out[todo[hit]] = self.values.take(at[hit])
            go = ~hit & (k != 0)
            todo, at = todo[go], (at[go] + 1) & self.mask
            if not len(todo):
                break
        return out


def spm_merges(tokens: Sequence[str], scores: Sequence[float], vocab: dict[str, int] | None = None
               ) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, ordered as llama.cpp would merge them: by the merged token's score
    (highest first), then its id, then the split position. A token listed twice counts once, under its last id
    (llama.cpp's token_to_id keeps the last); `vocab` is that map when the caller has it already."""
    n = len(tokens)
    try:
        flat = np.frombuffer("".join(tokens).encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError:  # lone surrogates from an undecodable token: the plain loop copes
        return _spm_merges_loop(tokens, scores)
    lens = np.fromiter(map(len, tokens), dtype=np.int64, count=n)
    if n == 0 or lens.max(initial=0) < 2:
        return []
    starts = np.cumsum(lens) - lens
    owner = np.repeat(np.arange(n), lens)                       # [chars] token of each code point
    pos = np.arange(len(flat)) - starts[owner]                  # [chars] position inside its token
    with np.errstate(over="ignore"):
        pw = _powers(_P, int(lens.max()) + 1)
        c = np.cumsum((flat.astype(np.uint64) + np.uint64(1)) * pw[pos], dtype=np.uint64)
        before = np.concatenate([np.zeros(1, np.uint64), c])[starts]   # cumsum before each token
        full = c[starts + lens - 1] - before                   # [n] hash of each whole token (0 if empty)
        full[lens == 0] = 0
        # canonical ids (the last of duplicates) in a hash table keyed by hash and length together
        vocab = vocab if vocab is not None else dict(zip(tokens, range(n)))
        canon = None
        if len(vocab) != n:
            canon = np.zeros(n, dtype=bool)
            canon[list(vocab.values())] = True
        ids = np.nonzero(lens > 0 if canon is None else canon & (lens > 0))[0]
        table = _HashTable(_with_len(full[ids], lens[ids]), ids)

        # split after code point j (k = pos + 1 characters on the left), for canonical tokens only
        inner = pos < lens[owner] - 1
        j = np.nonzero(inner if canon is None else inner & canon[owner])[0]
        t = owner[j]
        k = pos[j] + 1
        left = c[j] - before[t]
        inv = _powers(pow(_P, -1, 1 << 64), int(lens.max()) + 1)
        right = (full[t] - left) * inv[k]
    del c, flat, owner, pos

    a = table.find(_with_len(left, k))
    ok = a >= 0
    t, k, a, right = t[ok], k[ok], a[ok], right[ok]
    b = table.find(_with_len(right, lens[t] - k))
    ok = b >= 0
    t, a, b = t[ok], a[ok], b[ok]
    # the splits come grouped by token (ids ascending), split positions ascending within a group; llama.cpp's
    # order is the tokens' by (-score, id) (a stable sort keeps ids in order among equal scores): move whole
    # groups into that order rather than sort the splits
    by_rank = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    count = np.bincount(t, minlength=n)
    first = np.cumsum(count) - count                            # [n] where each token's splits start
    cnt = count[by_rank]
    sel = np.arange(len(t)) + np.repeat(first[by_rank] - (np.cumsum(cnt) - cnt), cnt)
    arr = np.array(tokens, dtype=object)
    return list(zip(arr[a[sel]].tolist(), arr[b[sel]].tolist()))


def _with_len(h: np.ndarray, n: np.ndarray) -> np.ndarray:
    # a hash and a length in one key: a look-up needs both to match, so a collision also needs equal lengths
    with np.errstate(over="ignore"):
        return h + n.astype(np.uint64) * _MIX


def _spm_merges_loop(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    vocab = {t: i for i, t in enumerate(tokens)}
    order = sorted(vocab.values(), key=lambda i: (-float(scores[i]), i))
    merges = []
    for i in order:
        s = tokens[i]
        for k in range(1, len(s)):
            if s[:k] in vocab and s[k:] in vocab:
                merges.append((s[:k], s[k:]))
    return merges


class SpmPieces:
    """The merges one text can use, for encoding it before all of spm_merges is built: a BPE word only ever
    merges (a, b) into a + b where a + b occurs in it, so the splits of the tokens occurring in a text, in
    spm_merges' order, tokenize it as all the merges do. Found by dict look-ups of its substrings up to the
    longest token's length (~2 look-ups a character per length), not by splitting every token."""

    def __init__(self, tokens: Sequence[str], scores: Sequence[float]):
        self.tokens, self.scores = tokens, scores
        self.vocab = dict(zip(tokens, range(len(tokens))))      # a duplicate token: its last id, as llama.cpp
        self.longest = max(map(len, tokens), default=0)

    def lookups(self, text: str) -> int:
        """How many look-ups `within` makes for `text` (at most)."""
        return 2 * len(text) * self.longest

    def within(self, text: str, prefix: str = "") -> tuple[dict[str, int], list[tuple[str, str]]]:
        """The tokens occurring in `text`, or in `prefix` + any of its suffixes (the normalizer's prefix starts
        each run of text, and a run may start anywhere: after any special token), each with its id; and their
        splits into two of them, ordered as spm_merges orders them."""
        vocab, n = self.vocab, len(text)
        found = {prefix: vocab[prefix]} if prefix in vocab else {}
        for i in range(n):
            for j in range(i + 1, min(n, i + self.longest) + 1):
                for s in (text[i:j], prefix + text[i:j]) if prefix else (text[i:j],):
                    t = vocab.get(s)
                    if t is not None:
                        found[s] = t
        ranked = []
        for s, t in found.items():
            for k in range(1, len(s)):
                if s[:k] in found and s[k:] in found:
                    ranked.append((-float(self.scores[t]), t, k, s[:k], s[k:]))
        ranked.sort()
        return found, [(a, b) for *_, a, b in ranked]
