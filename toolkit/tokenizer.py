"""Tokenizer from GGUF metadata, built on `tokenizers` so ids equal llama.cpp's on the same text.

* `gpt2` (byte-level BPE): the vocabulary and merges from the file, split first by llama.cpp's pre-tokenizer
  regexes for `tokenizer.ggml.pre` (llama-vocab.cpp), applied one after the other as llama.cpp does.
* `llama` (SentencePiece): a BPE model whose merges are every two-token split of every token, ranked by score
  (toolkit/spm.py: llama.cpp's SPM algorithm as BPE), with the space prefix llama.cpp adds before every run of
  text. Built straight from the metadata (no transformers import) on first need: until then, and while they are
  short, texts are encoded by a BPE of only the merges each can use, the same ids without the wait for all of a
  256k-piece vocabulary's merges.
* Special tokens: CONTROL tokens are matched in the text only with special=True (llama.cpp's parse_special);
  USER_DEFINED tokens are always matched whole.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import ToolkitError
from .gguf_io import GGUFFile
from .spm import SpmPieces, spm_merges

CONTROL, USER_DEFINED = 3, 4

# llama.cpp's regex_exprs per pre-tokenizer type (llama-vocab.cpp); applied in sequence, each splitting the
# pieces left by the one before (tokenizers' Split(behavior="isolated") does exactly that).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"[0-9][0-9][0-9]"],
    "gpt2": [_GPT2], "gpt-2": [_GPT2], "phi-2": [_GPT2], "mpt": [_GPT2], "olmo": [_GPT2], "jais": [_GPT2],
    "trillion": [_GPT2],
    "granite-docling": [_GPT2],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    **{k: [r"\p{N}", _GPT2] for k in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                                       "minerva-7b")},
    **{k: [_LLAMA3] for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx",
                              "smaug-bpe", "lfm2", "midm-2.0")},
    **{k: [_QWEN2] for k in ("qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan", "megrez")},
}
_EOG_NAMES = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "_<EOT>",
              "<|eom_id|>", "<｜end▁of▁sentence｜>", "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "<|repo_name|>",
              "<|fim_repo|>", "<fim-repo>", "<reponame>", "<REPO>", "<|file_sep|>", "<|return|>", "<|call|>",
              "<|end_of_text|>"}
# pre types whose llama.cpp default is add_bos = true when the file does not say
_BOS_BY_DEFAULT = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"}


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in _byte_alphabet().items()}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    # GPT-2's bytes -> printable unicode map (the form gpt2 vocabularies are stored in)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _bpe_tokenizer(meta: dict[str, Any], path: str) -> HFTokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ToolkitError("gpt2 tokenizer without tokenizer.ggml.merges", path)
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                     ignore_merges=meta.get("tokenizer.ggml.pre") in _BOS_BY_DEFAULT)  # llama3: ignore_merges
    tok = HFTokenizer(bpe)
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    regexes = PRE_TOKENIZERS.get(pre)
    if regexes is None:
        raise ToolkitError(f"unsupported tokenizer.ggml.pre '{pre}' (supported: {', '.join(sorted(PRE_TOKENIZERS))})",
                           path)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_tokenizer(meta: dict[str, Any], path: str, pieces: SpmPieces | None = None) -> HFTokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    vocab = pieces.vocab if pieces is not None else dict(zip(tokens, range(len(tokens))))
    if scores is not None:  # llama.cpp merges by score; any merges in the file are not what it uses
        merges = spm_merges(tokens, scores, vocab)
    elif meta.get("tokenizer.ggml.merges") is not None:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        raise ToolkitError("llama tokenizer without tokenizer.ggml.scores", path)
    return _spm_bpe(meta, vocab, merges)


def _spm_bpe(meta: dict[str, Any], vocab: dict[str, int], merges: list[tuple[str, str]]) -> HFTokenizer:
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    # llama.cpp: a space before each run of raw text (the first, and each one after a special token) when
    # add_space_prefix, then spaces -> U+2581, no other splitting. A normalizer runs per run of text between
    # added tokens, which is exactly that.
    steps = [normalizers.Replace(" ", "\u2581")]
    if _space_prefix(meta):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    # decoding (for a transformers tokenizer written from this one): pieces, <0xAB> bytes, the prefix space off
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if _space_prefix(meta) else []))
    return tok


def _space_prefix(meta: dict[str, Any]) -> bool:
    return bool(meta.get("tokenizer.ggml.add_space_prefix", True))


def _spm_for_text(meta: dict[str, Any], pieces: SpmPieces, added: list[tuple[int, str, bool]], text: str
                  ) -> HFTokenizer:
    """A tokenizer with only the merges `text` can use (SpmPieces.within): the same ids for it as the whole
    vocabulary's, from the merges of the few hundred tokens a prompt holds instead of a 256k vocabulary's ~600k."""
    found, merges = pieces.within(text.replace(" ", "\u2581"), "\u2581" if _space_prefix(meta) else "")
    vocab = pieces.vocab
    keep = [f"<0x{b:02X}>" for b in range(256)] + [t for _, t, _ in added]  # byte fallback, specials
    found.update((t, vocab[t]) for t in keep if t in vocab)
    return _with_added(_spm_bpe(meta, found, merges), added)


def _build(meta: dict[str, Any], model: str, path: str, pieces: SpmPieces | None = None) -> HFTokenizer:
    tok = _bpe_tokenizer(meta, path) if model == "gpt2" else _spm_tokenizer(meta, path, pieces)
    return _with_added(tok, _added(meta, model))


def _special_ids(meta: dict[str, Any]) -> list[int]:
    """Ids of the CONTROL and USER_DEFINED tokens."""
    types = meta.get("tokenizer.ggml.token_type") or []
    try:
        arr = np.asarray(types)
    except ValueError:  # ragged: a damaged file
        arr = np.zeros(0)
    if arr.dtype.kind in "iu" and arr.ndim == 1:  # the usual integer array: no Python loop over 256k types
        return np.flatnonzero((arr == CONTROL) | (arr == USER_DEFINED)).tolist()
    return [i for i, ty in enumerate(types) if ty in (CONTROL, USER_DEFINED)]


def _added(meta: dict[str, Any], model: str, special_ids: list[int] | None = None) -> list[tuple[int, str, bool]]:
    """(id, text, special) of the tokens matched whole in the text: CONTROL ones (special), USER_DEFINED ones."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    byte_set = set(_byte_alphabet().values()) if model == "gpt2" else None
    added = []
    for i in _special_ids(meta) if special_ids is None else special_ids:
        t = tokens[i] if i < len(tokens) else ""
        if types[i] == CONTROL and t and (byte_set is None or set(t) <= byte_set):
            added.append((i, t, True))
        elif types[i] == USER_DEFINED and t:
            added.append((i, t, False))
    return added


def _with_added(tok: HFTokenizer, added: list[tuple[int, str, bool]]) -> HFTokenizer:
    if added:  # ids exist in the vocab already: tokenizers keeps them
        tok.add_tokens([AddedToken(t, special=special, normalized=False) for _, t, special in added])
    return tok


def _checked(build: Callable[[], HFTokenizer], model: str, path: str) -> HFTokenizer:
    try:
        return build()
    except ToolkitError:
        raise
    except Exception as e:  # tokenizers' own errors (a damaged vocabulary or merges), malformed arrays
        msg = str(e).splitlines()[0].strip() if str(e).strip() else type(e).__name__
        raise ToolkitError(f"damaged {model} vocabulary: cannot build its tokenizer ({msg[:200]})", path) from None


# Texts are encoded through _spm_for_text while its look-ups together stay under this (a fraction of what the
# whole vocabulary's merges cost; a prompt of ~10k characters); past it (a loop over many texts, a long one)
# that tokenizer is built, once.
_ON_DEMAND_LOOKUPS = 1 << 18


class Tokenizer:
    """encode/decode with llama.cpp's ids; bos/eos/eot; the GGUF chat template."""

    def __init__(self, tok: HFTokenizer | None, meta: dict[str, Any], kind: str, path: str = "",
                 pieces: SpmPieces | None = None):
        # tok None: a SentencePiece vocabulary whose tokenizer is built on first need (`tok`); until then short
        # texts are encoded with the merges they can use (pieces)
        self._tok, self._meta, self._pieces, self.kind, self.path = tok, meta, pieces, kind, path
        self._lookups_left = _ON_DEMAND_LOOKUPS
        special_ids = _special_ids(meta)
        self._added = _added(meta, kind, special_ids) if pieces is not None else []
        self.tokens: list[str] = meta["tokenizer.ggml.tokens"]
        self.vocab_size = len(self.tokens)
        types = meta.get("tokenizer.ggml.token_type") or [1] * self.vocab_size
        self.token_types = types
        self.bos_id: int | None = meta.get("tokenizer.ggml.bos_token_id")
        self.eos_id: int | None = meta.get("tokenizer.ggml.eos_token_id")
        pre = meta.get("tokenizer.ggml.pre")
        default_bos = kind == "llama" or pre in _BOS_BY_DEFAULT
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        self.chat_template: str | None = meta.get("tokenizer.chat_template")
        # end-of-generation, as llama.cpp's vocab loader gathers it: eos/eot/eom ids, the usual end-of-turn
        # control tokens by name, and the FIM pad/repo/separator tokens
        eog = {self.eos_id, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")}
        eog.update(i for i in special_ids if i < self.vocab_size and self.tokens[i] in _EOG_NAMES)
        self.eot_ids: set[int] = {i for i in eog if i is not None}
        self._byte_tokens: dict[int, bytes] = {}

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "Tokenizer":
        meta = g.metadata
        model = meta.get("tokenizer.ggml.model")
        if model is None or "tokenizer.ggml.tokens" not in meta:
            raise ToolkitError("no tokenizer in this GGUF (tokenizer.ggml.model/tokens missing)", g.path)
        if model not in ("gpt2", "llama"):
            raise ToolkitError(f"unsupported tokenizer model '{model}' (supported: gpt2, llama)", g.path)
        scores = meta.get("tokenizer.ggml.scores")
        if model == "llama" and scores is not None:
            tokens = meta["tokenizer.ggml.tokens"]
            if not isinstance(scores, list) or len(scores) != len(tokens):
                raise ToolkitError(f"damaged llama vocabulary: {len(tokens)} tokens but tokenizer.ggml.scores is "
                                   f"not {len(tokens)} numbers", g.path)
            return cls(None, meta, model, g.path, SpmPieces(tokens, scores))
        return cls(_checked(lambda: _build(meta, model, g.path), model, g.path), meta, model, g.path)

    @property
    def tok(self) -> HFTokenizer:
        """The `tokenizers` tokenizer of the whole vocabulary (a SentencePiece one's is built here, once)."""
        if self._tok is None:
            self._tok = _checked(lambda: _build(self._meta, self.kind, self.path, self._pieces), self.kind,
                                 self.path)
        return self._tok

    def _tokenizer_for(self, text: str) -> HFTokenizer:
        if self._tok is None and self._pieces is not None and self._pieces.lookups(text) <= self._lookups_left:
            self._lookups_left -= self._pieces.lookups(text)
            return _checked(lambda: _spm_for_text(self._meta, self._pieces, self._added, text), self.kind,
                            self.path)
        return self.tok

    def add_tokens(self, added: Sequence[tuple[int, str, bool]]) -> None:
        """Grow the vocabulary by (id, text, special) past its end (an adapter's modules_to_save grew the
        embeddings): CONTROL tokens when special, else USER_DEFINED, as export-lora writes them into the GGUF."""
        for i, text, special in sorted(added):
            if i < self.vocab_size:
                continue  # already there (a second adapter with the same tokens)
            if i != self.vocab_size:
                raise ToolkitError(f"added token {i} ('{text}') leaves a gap after {self.vocab_size - 1}", self.path)
            self.tok.add_tokens([AddedToken(text, special=special, normalized=False)])
            if self.tok.token_to_id(text) != i:
                raise ToolkitError(f"added token '{text}' is already in the vocabulary", self.path)
            self.tokens = [*self.tokens, text]
            self.token_types = [*self.token_types, CONTROL if special else USER_DEFINED]
            self.vocab_size += 1
        self._byte_tokens = {}  # pieces are made on first use (_piece)

    # -- encode / decode
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False, special: bool = True) -> list[int]:
        """Token ids as llama_tokenize(text, add_special=add_bos, parse_special=special) gives them."""
        ids = []
        if text:
            tok = self._tokenizer_for(text)
            tok.encode_special_tokens = not special
            ids = tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if (add_eos or (add_bos is None and self.add_eos)) and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.token_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def token_bytes(self, ids: Sequence[int], skip_special: bool = False) -> bytes:
        """The bytes these tokens stand for (llama_token_to_piece, concatenated); control tokens render as
        their text unless skip_special."""
        out = []
        for i in ids:
            i = int(i)
            if skip_special and self.token_types[i] == CONTROL:
                continue
            p = self._byte_tokens.get(i)
            out.append(p if p is not None else self._piece(i))
        return b"".join(out)

    def _piece(self, i: int) -> bytes:
        # made on first use and kept: all of a 256k vocabulary up front would be a noticeable part of the load
        t, ty = self.tokens[i], self.token_types[i]
        if self.kind == "gpt2":
            inv = _byte_decoder()
            p = t.encode("utf-8") if ty in (CONTROL, USER_DEFINED) or not all(c in inv for c in t) \
                else bytes(inv[c] for c in t)
        elif ty == 6 and len(t) == 6 and t.startswith("<0x"):  # BYTE tokens <0xAB>
            p = bytes([int(t[3:5], 16)])
        else:
            p = t.replace("\u2581", " ").encode("utf-8")
        self._byte_tokens[i] = p
        return p

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render the GGUF's chat template with transformers' jinja renderer (the same environment and helpers
        as `tokenizer.apply_chat_template` there); bos_token / eos_token from this vocabulary."""
        if not self.chat_template:
            raise ToolkitError("this GGUF has no chat template (tokenizer.chat_template)", self.path or None)
        from transformers.utils.chat_template_utils import render_jinja_template

        bos = self.tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self.tokens[self.eos_id] if self.eos_id is not None else ""
        try:
            rendered, _ = render_jinja_template([messages], chat_template=self.chat_template,
                                                add_generation_prompt=add_generation_prompt, bos_token=bos,
                                                eos_token=eos, **kwargs)
        except Exception as e:  # jinja errors, raise_exception() in the template
            raise ToolkitError(f"chat template failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                               self.path or None) from None
        return rendered[0]

    def is_eog(self, token: int) -> bool:
        return int(token) in self.eot_ids
