"""SentencePiece (`llama`) vocabularies as `tokenizers` BPE merges, built fast enough for a 256k-piece vocabulary.

llama.cpp's SPM tokenizer (llm_tokenizer_spm) starts from the characters of the text and repeatedly merges the
adjacent pair whose concatenation is a token with the highest score (ties: the leftmost pair). A BPE model does
the same when its merges are every (a, b) with a, b and a + b all tokens, ranked by the score of a + b: so the
merges are all two-piece splits of every token, best-scoring token first. Equal scores of *different* tokens are
the one place the two can differ (llama.cpp takes the leftmost pair, BPE the lower token id); SentencePiece's own
vocabularies give their pieces distinct scores.

The splits are found with numpy instead of a Python loop over ~2M (token, split point) pairs: every prefix and
suffix of every token gets a 64-bit polynomial hash from one segmented cumulative sum over the code points of
all tokens, and is looked up by binary search among the tokens' own hashes (with its length checked, so a hash
collision would also need equal lengths: ~1e-8 for a 256k vocabulary).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_P = 0x9E3779B97F4A7C15  # odd: invertible modulo 2^64
_MASK = (1 << 64) - 1


def _powers(base: int, n: int) -> np.ndarray:
    out, x = [], 1
    for _ in range(n):
        out.append(x)
        x = x * base & _MASK
    return np.array(out, dtype=np.uint64)


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
        # canonical ids (the last of duplicates), sorted by hash for lookups
        vocab = vocab if vocab is not None else {t: i for i, t in enumerate(tokens)}
        canon = None
        if len(vocab) != n:
            canon = np.zeros(n, dtype=bool)
            canon[list(vocab.values())] = True
        ids = np.nonzero(lens > 0 if canon is None else canon & (lens > 0))[0]
        order = np.argsort(full[ids], kind="stable")
        table_h, table_id = full[ids][order], ids[order]

        # split after code point j (k = pos + 1 characters on the left), for canonical tokens only
        inner = pos < lens[owner] - 1
        j = np.nonzero(inner if canon is None else inner & canon[owner])[0]
        t = owner[j]
        k = pos[j] + 1
        left = c[j] - before[t]
        inv = _powers(pow(_P, -1, 1 << 64), int(lens.max()) + 1)
        right = (full[t] - left) * inv[k]
    del c, flat, owner, pos

    def lookup(h: np.ndarray, want_len: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(table_h, h), len(table_h) - 1)
        found = table_id[at]
        return np.where((table_h[at] == h) & (lens[found] == want_len), found, -1)

    a = lookup(left, k)
    ok = a >= 0
    t, k, a, right = t[ok], k[ok], a[ok], right[ok]
    b = lookup(right, lens[t] - k)
    ok = b >= 0
    t, k, a, b = t[ok], k[ok], a[ok], b[ok]
    # rank tokens by (-score, id) (a stable sort keeps ids in order among equal scores), then order the splits
    # by (rank of the merged token, split position) through one integer key
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")] = np.arange(n)
    sel = np.argsort(rank[t] * (int(lens.max()) + 1) + k)
    arr = np.array(tokens, dtype=object)
    return list(zip(arr[a[sel]].tolist(), arr[b[sel]].tolist()))


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
