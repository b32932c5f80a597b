"""Training data: llama.cpp finetune's samples from a text file, and mlx-lm style records (jsonl / datasets).

Everything becomes one `Samples`: a flat token array, a parallel loss mask, and each sample's (begin, size).
Batches are cut from it exactly as llama.cpp's `get_example_targets_batch` did: the input row starts with
BOS, the targets are the sample's tokens, a short sample is padded with EOS (or, with
--fill-with-next-samples, followed by the next samples, separated by EOS and/or BOS). `SampleOrder` holds
the per-epoch shuffle (std::mt19937 semantics, its state kept as the same text llama.cpp stored in its
checkpoints), so a resumed run sees the very same batches.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from toolkit.errors import ToolkitError

Tokenize = Callable[[str], list[int]]

DATASET_EXTS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


# --------------------------------------------------------------------------------------------- escapes

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def process_escapes(s: str) -> str:
    r"""--escape: \n \r \t \' \" \\ and \xHH, as llama.cpp's process_escapes; other backslashes stay."""
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            n = s[i + 1]
            if n in _ESCAPES:
                out.append(_ESCAPES[n])
                i += 2
                continue
            if n == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", s[i + 2:i + 4]):
                out.append(chr(int(s[i + 2:i + 4], 16)))
                i += 4
                continue
        out.append(c)
        i += 1
    return "".join(out)


# --------------------------------------------------------------------------------------------- samples

@dataclass
class Samples:
    tokens: np.ndarray  # int64 [n_tokens]
    mask: np.ndarray  # bool [n_tokens]: does this token count in the loss
    begins: np.ndarray  # int64 [n_samples]
    sizes: np.ndarray  # int64 [n_samples]
    pad_loss: bool = True  # llama.cpp trains on the EOS padding of short samples; records mode does not
    notes: list[str] = field(default_factory=list)  # warnings llama.cpp printed (too long/short/empty)

    def __len__(self) -> int:
        return len(self.begins)

    def digest(self) -> int:
        """A 63-bit hash of tokens + sample layout: a checkpoint's shuffle resumes only on the same data."""
        h = hashlib.sha256()
        for a in (self.tokens, self.begins, self.sizes):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return int.from_bytes(h.digest()[:8], "little") >> 1

    def subset(self, idx: Sequence[int]) -> "Samples":
        idx = np.asarray(idx, dtype=np.int64)
        return Samples(self.tokens, self.mask, self.begins[idx], self.sizes[idx], self.pad_loss)


def _utf8_next_boundary(data: bytes, pos: int) -> int:
    """Move `pos` forward past UTF-8 continuation bytes (llama.cpp never cuts inside a character)."""
    while pos < len(data) and (data[pos] & 0xC0) == 0x80:
        pos += 1
    return pos


def tokenize_text(data: bytes, tokenize: Tokenize, ctx: int, sample_start: str = "",
                  include_sample_start: bool = False, overlapping_samples: bool = False,
                  max_token_bytes: int = 1, source: str = "") -> Samples:
    """llama.cpp's tokenize_file. Empty `sample_start`: one token stream, a sample at every token position
    (ctx tokens each). Otherwise the text is split at every occurrence of `sample_start` and each piece is
    tokenized on its own (with --overlapping-samples a piece runs on for up to ctx tokens' worth of bytes)."""
    if not data:
        raise ToolkitError("training data is empty", source or None)
    notes: list[str] = []
    if not sample_start:
        toks = np.asarray(tokenize(data.decode("utf-8", errors="replace")), dtype=np.int64)
        if len(toks) == 0:
            raise ToolkitError("training data has no tokens", source or None)
        end = len(toks) - ctx if len(toks) >= ctx else 0
        begins = np.concatenate([[0], np.arange(1, max(end, 1), dtype=np.int64)])
        sizes = np.full(len(begins), ctx, dtype=np.int64)
        sizes[0] = min(ctx, len(toks))
        return Samples(toks, np.ones(len(toks), bool), begins, sizes, True, notes)

    pattern = sample_start.encode("utf-8")
    starts, pos = [], data.find(pattern)
    while pos != -1:
        starts.append(pos)
        pos = data.find(pattern, pos + len(pattern))
    if not starts:
        raise ToolkitError(f"sample start {sample_start!r} never occurs in the training data", source or None)
    offset = 0 if include_sample_start else len(pattern)
    context_bytes = max_token_bytes * ctx  # always at least ctx tokens' worth of text
    pieces: list[np.ndarray] = []
    begins, sizes = [], []
    n_tokens, too_big, too_small, empty = 0, 0, 0, 0
    min_size, max_size = None, 0
    for i, s in enumerate(starts):
        b = s + offset
        if overlapping_samples:
            e = min(len(data), b + context_bytes)
        else:
            e = starts[i + 1] if i + 1 < len(starts) else len(data)
        e = _utf8_next_boundary(data, e)
        begins.append(n_tokens)
        if e <= b:
            empty += 1
            sizes.append(0)
            continue
        toks = np.asarray(tokenize(data[b:e].decode("utf-8", errors="replace")), dtype=np.int64)
        too_big += len(toks) > ctx
        too_small += len(toks) < ctx
        max_size = max(max_size, len(toks))
        min_size = len(toks) if min_size is None else min(min_size, len(toks))
        pieces.append(toks)
        sizes.append(len(toks))
        n_tokens += len(toks)
    if too_big:
        notes.append(f"{too_big} samples (max length {max_size}) exceed the context of {ctx}: they are cut off")
    if too_small:
        notes.append(f"{too_small} samples (min length {min_size}) are shorter than the context of {ctx}")
    if empty:
        notes.append(f"{empty} empty samples")
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if len(tokens) == 0:
        raise ToolkitError("training data has no tokens after splitting at the sample start", source or None)
    return Samples(tokens, np.ones(len(tokens), bool), np.asarray(begins, np.int64), np.asarray(sizes, np.int64),
                   True, notes)


# --------------------------------------------------------------------------------------------- records

class RecordTokenizer:
    """Turns one mlx-lm style record into (tokens, loss mask); no BOS (the batch row starts with it)."""

    def __init__(self, tok: Any, mask_prompt: bool = True):
        self.tok, self.mask_prompt = tok, mask_prompt

    def _enc(self, text: str, first: bool = True) -> list[int]:
        ids = list(self.tok.encode(text, add_bos=False, special=True))
        if first and len(ids) > 1 and ids[0] == self.tok.bos_id:
            ids = ids[1:]  # a template that spells out BOS: the batch row already starts with it
        return ids

    def __call__(self, rec: dict[str, Any]) -> tuple[list[int], list[bool]]:
        eos = self.tok.eos_id
        if "messages" in rec:
            return self._chat(rec["messages"])
        if "prompt" in rec and "completion" in rec:
            p = self._enc(str(rec["prompt"]))
            c = self._enc(str(rec["completion"])) + [eos]
            return p + c, [not self.mask_prompt] * len(p) + [True] * len(c)
        if "text" in rec:
            t = self._enc(str(rec["text"])) + [eos]
            return t, [True] * len(t)
        raise ToolkitError(f"a record needs 'text', 'prompt'+'completion' or 'messages' (got keys {sorted(rec)})")

    def _chat(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
        """Render with the GGUF chat template; the loss counts only the assistant turns."""
        render = self.tok.apply_chat_template
        full = render(messages, add_generation_prompt=False)
        cuts: list[tuple[int, int]] = []  # [start, end) character spans of assistant answers
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = render(messages[:i], add_generation_prompt=True) if i else ""
            upto = render(messages[:i + 1], add_generation_prompt=False)
            if not (full.startswith(upto) and upto.startswith(before)):
                # template rewrites earlier turns: cannot place the answer, so train on everything
                ids = self._enc(full)
                return ids, [True] * len(ids)
            cuts.append((len(before), len(upto)))
        ids: list[int] = []
        mask: list[bool] = []
        pos = 0
        for a, b in cuts:
            for piece, train in ((full[pos:a], not self.mask_prompt), (full[a:b], True)):
                if piece:
                    t = self._enc(piece, first=not ids)
                    ids += t
                    mask += [train] * len(t)
            pos = b
        if pos < len(full):
            t = self._enc(full[pos:], first=not ids)
            ids += t
            mask += [not self.mask_prompt] * len(t)
        if not any(mask):
            mask = [True] * len(ids)
        return ids, mask


def records_to_samples(records: Iterable[dict[str, Any]], rt: Callable[[dict], tuple[list[int], list[bool]]],
                       ctx: int, source: str = "") -> Samples:
    toks: list[int] = []
    mask: list[bool] = []
    begins, sizes = [], []
    too_big = 0
    for rec in records:
        t, m = rt(rec)
        if not t:
            continue
        too_big += len(t) > ctx
        begins.append(len(toks))
        sizes.append(len(t))
        toks += t
        mask += m
    if not begins:
        raise ToolkitError("no training records", source or None)
    notes = [f"{too_big} records exceed the context of {ctx} tokens: they are cut off"] if too_big else []
    return Samples(np.asarray(toks, np.int64), np.asarray(mask, bool), np.asarray(begins, np.int64),
                   np.asarray(sizes, np.int64), False, notes)


def read_records(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """A local dataset as a list of dicts: .jsonl/.json/.parquet/.csv/.arrow through `datasets`, a
    `save_to_disk` folder, or a folder of files. Never downloads anything."""
    p = Path(path)
    if not p.exists():
        raise ToolkitError("no such file or folder", str(p))
    if p.suffix == ".jsonl" and p.is_file():  # the common case, without `datasets`' cache machinery
        out = []
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ToolkitError(f"line {n} is not JSON ({e.msg})", str(p)) from None
        if not out:
            raise ToolkitError("no records", str(p))
        return out
    import datasets

    datasets.disable_progress_bars()
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ToolkitError(f"no '{split}' split (has {', '.join(ds)})", str(p))
                ds = ds[split]
        elif p.is_file():
            kind = DATASET_EXTS.get(p.suffix)
            if kind is None:
                kind = "text"
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
        else:
            ds = datasets.load_dataset(str(p), split=split)
    except ToolkitError:
        raise
    except Exception as e:  # datasets raises many kinds; the user needs one line
        raise ToolkitError(f"cannot read as a dataset ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                           str(p)) from None
    rows = [dict(r) for r in ds]
    if not rows:
        raise ToolkitError("no records", str(p))
    return rows


# --------------------------------------------------------------------------------------------- shuffle

MT_N = 624


def mt19937_seed_state(seed: int) -> str:
    """std::mt19937(seed)'s state in libstdc++'s text form (624 words, then the position)."""
    bg = np.random.MT19937()
    bg._legacy_seeding(seed & 0xFFFFFFFF)  # numpy's legacy seeding is init_genrand, as std::mt19937(seed)
    return _mt_state_str(bg)


def _mt_state_str(bg: np.random.MT19937) -> str:
    st = bg.state["state"]
    return " ".join(str(int(x)) for x in st["key"]) + f" {int(st['pos'])}"


def _mt_from_str(state: str) -> np.random.MT19937:
    parts = state.split()
    if len(parts) != MT_N + 1:
        raise ToolkitError("checkpoint has a malformed shuffle RNG state")
    bg = np.random.MT19937()
    try:
        key = [int(x) for x in parts[:MT_N]]
        if not all(0 <= k < 2**32 for k in key):
            raise ValueError("key out of range")
        bg.state = {"bit_generator": "MT19937",
                    "state": {"key": np.asarray(key, np.uint32), "pos": int(parts[MT_N])}}
    except (ValueError, OverflowError, TypeError):
        raise ToolkitError("checkpoint has a malformed shuffle RNG state") from None
    return bg


def shuffle_samples(state: str, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """llama.cpp's shuffle_samples: one draw per sample, stable sort by draw, then one random offset per
    (shuffled) sample. Returns (order, offsets, the generator's next state)."""
    n = len(sizes)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), state
    bg = _mt_from_str(state)
    rnd = bg.random_raw(n).astype(np.uint64)
    order = np.lexsort((np.arange(n), rnd)).astype(np.int64)  # ties by index: a stable sort
    frac = bg.random_raw(n).astype(np.float64) / float(2**32 - 2)  # C: rng() / (rng.max() - 1)
    s = sizes[order].astype(np.float64)
    offs = np.where(s > 0, np.floor((s - 1) * frac), 0).astype(np.int64)
    return order, offs, _mt_state_str(bg)


@dataclass
class ShuffleState:
    """What the checkpoint keeps of the data order (llama.cpp's train_state shuffle fields + counters)."""
    samples_hash: int = 0
    sample_count: int = 0
    next_sample: int = 0
    rng_state: str = ""  # state that produced the current shuffle
    epochs: int = 0
    train_samples: int = 0


class SampleOrder:
    """The shuffled sample order of one epoch and the cursor into it; reshuffles when an epoch ends."""

    def __init__(self, samples: Samples, seed: int, state: ShuffleState | None = None,
                 force_reshuffle: bool = False, log: Callable[[str], None] = lambda s: None):
        self.samples = samples
        st = ShuffleState() if state is None else ShuffleState(**vars(state))
        h = samples.digest()
        changed = st.rng_state != "" and (st.samples_hash != h or st.sample_count != len(samples))
        if changed:
            log("train data seems to have changed: restarting the shuffled epoch")
        if force_reshuffle and st.rng_state:
            log("forced reshuffling of data: restarting with a newly shuffled epoch")
        if st.rng_state == "" or changed or force_reshuffle:
            st.rng_state = mt19937_seed_state(seed)
            st.sample_count = len(samples)
            st.next_sample = 0
            st.samples_hash = h
        self.state = st
        self._reshuffle()

    def _reshuffle(self) -> None:
        self.order, self.offsets, self.next_rng_state = shuffle_samples(self.state.rng_state, self.samples.sizes)

    def batch(self, n_batch: int, ctx: int, bos: int, eos: int, n_vocab: int, separate_with_eos: bool = False,
              separate_with_bos: bool = True, fill_with_next_samples: bool = False,
              sample_random_offsets: bool = False) -> "Batch":
        """The next training batch; advances the cursor (and the epoch) like llama.cpp's callback."""
        st = self.state
        b = make_batch(self.samples, self.order, self.offsets, st.next_sample, n_batch, ctx, bos, eos, n_vocab,
                       separate_with_eos, separate_with_bos, fill_with_next_samples, sample_random_offsets)
        st.train_samples += b.used_samples
        st.next_sample += b.used_samples
        if st.next_sample >= st.sample_count:
            st.epochs += 1
            st.rng_state = self.next_rng_state
            self._reshuffle()
            st.next_sample = 0
            b.epoch_done = True
        return b


@dataclass
class Batch:
    inputs: torch.Tensor  # int64 [B, T]
    targets: torch.Tensor  # int64 [B, T]
    weights: torch.Tensor  # bool [B, T]: positions that count in the loss
    used_samples: int
    epoch_done: bool = False

    @property
    def n_loss_tokens(self) -> int:
        return int(self.weights.sum())

    def rows(self, sl: slice) -> "Batch":
        """Some of the rows (one process's share of a batch)."""
        return Batch(self.inputs[sl], self.targets[sl], self.weights[sl], self.used_samples, self.epoch_done)

    def trimmed(self) -> "Batch":
        """Drop trailing columns no row trains on (records mode: short answers, smaller batches)."""
        cols = self.weights.any(0).nonzero()
        t = int(cols[-1]) + 1 if len(cols) else 1
        return Batch(self.inputs[:, :t], self.targets[:, :t], self.weights[:, :t], self.used_samples,
                     self.epoch_done)


def make_batch(samples: Samples, order: np.ndarray, offsets: np.ndarray, example_id: int, n_batch: int,
               ctx: int, bos: int, eos: int, n_vocab: int, separate_with_eos: bool = False,
               separate_with_bos: bool = True, fill_with_next_samples: bool = False,
               sample_random_offsets: bool = False) -> Batch:
    """llama.cpp's get_example_targets_batch over the shuffled `order`, plus a loss mask."""
    count = len(order)
    if count == 0:
        raise ToolkitError("no training samples")
    tok, msk = samples.tokens, samples.mask
    begins, sizes = samples.begins[order], samples.sizes[order]
    inputs = np.empty((n_batch, ctx), np.int64)
    targets = np.empty((n_batch, ctx), np.int64)
    weights = np.empty((n_batch, ctx), bool)
    used = 0
    for k in range(n_batch):
        idx = (example_id + used) % count
        offs = int(offsets[idx]) if sample_random_offsets else 0
        begin, size = int(begins[idx]), int(sizes[idx])
        used += 1
        inputs[k, 0] = bos
        sep_eos, sep_bos = not separate_with_eos, not separate_with_bos
        for i in range(ctx):
            token, w = eos, samples.pad_loss  # padding
            if offs >= size and fill_with_next_samples:
                if not sep_eos:
                    sep_eos, w = True, True
                elif not sep_bos:
                    sep_bos, token, w = True, bos, True
                else:
                    sep_eos, sep_bos = not separate_with_eos, not separate_with_bos
                    offs = 0
                    idx = (example_id + used) % count
                    begin, size = int(begins[idx]), int(sizes[idx])
                    used += 1
            if offs < size:
                token = min(max(int(tok[begin + offs]), 0), n_vocab - 1)
                w = bool(msk[begin + offs])
                offs += 1
            targets[k, i] = token
            weights[k, i] = w
            if i + 1 < ctx:
                inputs[k, i + 1] = token
    return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(weights), used)


def eval_batches(samples: Samples, n_batch: int, ctx: int, bos: int, eos: int, n_vocab: int,
                 max_batches: int | None = None, **kw: bool) -> Iterable[Batch]:
    """Validation/test batches: every sample once, in file order, no random offsets."""
    order = np.arange(len(samples), dtype=np.int64)
    offsets = np.zeros(len(samples), np.int64)
    n = -(-len(samples) // n_batch)
    if max_batches is not None and max_batches > 0:
        n = min(n, max_batches)
    for j in range(n):
        rows = min(n_batch, len(samples) - j * n_batch)
        b = make_batch(samples, order, offsets, j * n_batch, rows, ctx, bos, eos, n_vocab, **kw)
        yield b.trimmed() if not samples.pad_loss else b


def split_holdout(samples: Samples, fraction: float) -> tuple[Samples, Samples | None]:
    """Hold out the last `fraction` of the samples (a contiguous tail, so overlapping windows barely leak)."""
    if fraction <= 0:
        return samples, None
    n_val = max(1, int(round(len(samples) * fraction)))
    if n_val >= len(samples):
        raise ToolkitError(f"--val-split {fraction} leaves no training samples (only {len(samples)} samples)")
    idx = np.arange(len(samples))
    return samples.subset(idx[:-n_val]), samples.subset(idx[-n_val:])
