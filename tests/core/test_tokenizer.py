"""Tokenizer from GGUF metadata == llama.cpp's tokenizer (llama_tokenize / llama_token_to_piece) on the same file:
the real SmolLM2 vocabulary (gpt2 BPE, `smollm` pre-tokenizer) and SentencePiece (`llama`) vocabularies written
in code (a small one, and a 256k-piece one, the size gemma-family models ship)."""
from __future__ import annotations

import pytest

from oracle_llama import llama_detokenize, llama_tokenize
from tiny import LARGE_SPM_ALPHABET, make_large_spm_gguf, make_tiny_arch_gguf, spm_tokenizer_metadata
from toolkit.errors import ToolkitError
from toolkit.gguf_io import TensorSpec, copy_metadata, open_gguf, write_gguf
from toolkit.tokenizer import PRE_TOKENIZERS, Tokenizer

TEXTS = [
    "Hello world",
    " leading space and trailing  ",
    "numbers 1234567 3.14159 and 1,000,000 and 42nd",
    "unicode: héllo wörld 日本語 中文 😀🎉 ñ Ελληνικά русский العربية हिन्दी",
    "def f(x):\n    return x**2  # comment\n\n\tindented\r\nwindows line",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "don't I'll we're THEY'RE it's",
    "   multiple   spaces\n\n\nnewlines  ",
    "a<|endoftext|>b and <repo_name> and <file_sep>",
    "x" * 60 + " 🤖 " + "ab" * 20,
    "",
    "a",
    "$100 + 20% = ? <tag attr='v'>{json: [1, 2]}</tag>",
]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return Tokenizer.from_gguf(open_gguf(smollm2_path))


@pytest.mark.parametrize("special", [True, False])
def test_gpt2_ids_equal_llama_cpp(smol, smollm2_path, special):
    for text in TEXTS:
        # llama_tokenize(add_special=True) adds BOS only when the vocab says so: our add_bos=None
        assert smol.encode(text, special=special) == llama_tokenize(smollm2_path, text, True, special), text
        assert smol.encode(text, add_bos=False, special=special) == llama_tokenize(smollm2_path, text, False,
                                                                                   special), text


def test_gpt2_pieces_equal_llama_cpp(smol, smollm2_path):
    for text in TEXTS:
        ids = smol.encode(text)
        assert smol.token_bytes(ids) == llama_detokenize(smollm2_path, ids)
        assert smol.decode(ids) == text  # byte-level BPE round-trips


def test_special_tokens_and_flags_match_llama_cpp(smol, smollm2_path):
    import oracle_llama as O

    L = O._lib()
    vocab = L.llama_model_get_vocab(O._model(str(smollm2_path)))
    assert smol.bos_id == L.llama_vocab_bos(vocab) == 1
    assert smol.eos_id == L.llama_vocab_eos(vocab) == 2
    assert smol.add_bos == bool(L.llama_vocab_get_add_bos(vocab))
    eog = {i for i in range(O.n_vocab(smollm2_path)) if L.llama_vocab_is_eog(vocab, i)}
    assert smol.eot_ids == eog  # {<|endoftext|>, <|im_end|>, <reponame>} for SmolLM2
    assert smol.encode("hi", add_bos=True)[0] == 1 and smol.encode("hi", add_eos=True)[-1] == 2


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    return make_tiny_arch_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", "llama", tokenizer=spm_tokenizer_metadata())


SPM_TEXTS = ["the quick brown fox", "hello world, this is a test", " leading", "  two  spaces", "café naïve 123",
             "x<s>y</s> the", "日本 unknown chars → bytes", "the\nnew line", "", "lazy dog."]


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("special", [True, False])
def test_sentencepiece_ids_equal_llama_cpp(spm_path, special, full):
    """full: through the whole vocabulary's tokenizer; else through each text's own merges (what encoding uses
    until that tokenizer is built)."""
    tok = Tokenizer.from_gguf(open_gguf(spm_path))
    assert tok.kind == "llama" and tok.add_bos
    if full:
        tok.tok  # noqa: B018 -- built now, so every encode goes through it
    for text in SPM_TEXTS:
        assert tok.encode(text, special=special) == llama_tokenize(spm_path, text, True, special), text
        assert tok.encode(text, add_bos=False, special=special) == llama_tokenize(spm_path, text, False, special)
        ids = tok.encode(text)
        assert tok.token_bytes(ids) == llama_detokenize(spm_path, ids)
    assert (tok._tok is None) != full  # the path named is the one taken


def test_sentencepiece_builds_the_whole_tokenizer_past_the_lookup_budget(spm_path):
    """Texts go through their own merges until those look-ups would pass the budget, then through the whole
    vocabulary's tokenizer, built then; the ids are llama.cpp's either way."""
    tok = Tokenizer.from_gguf(open_gguf(spm_path))
    short, long_ = SPM_TEXTS[1], " ".join(SPM_TEXTS)
    tok._lookups_left = tok._pieces.lookups(short) + tok._pieces.lookups(long_) - 1
    assert tok.encode(short) == llama_tokenize(spm_path, short, True, True)
    assert tok._tok is None
    assert tok.encode(long_) == llama_tokenize(spm_path, long_, True, True)
    assert tok._tok is not None


def test_dense_sentencepiece_vocabularies_equal_llama_cpp(tmp_path):
    """8 random vocabularies of 60 pieces over a, b and U+2581 (runs like "aaa" and "▁▁", pieces overlapping in
    many ways, so many splits compete), distinct random scores: ids equal llama_tokenize's on 40 random texts
    each, through each text's own merges and through the whole vocabulary's tokenizer."""
    import itertools
    import random

    from tiny import _spm_metadata

    rng = random.Random(5)
    base = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    every = ["".join(p) for n in range(2, 6) for p in itertools.product("ab\u2581", repeat=n)]
    for v in range(8):
        pieces = ["a", "b", "\u2581"] + rng.sample(every, 60)
        scores = [0.0] * len(base) + [-float(x) - 1 for x in rng.sample(range(1000), len(pieces))]
        meta = _spm_metadata(base + pieces, scores, [2, 3, 3] + [6] * 256 + [1] * len(pieces))
        # a file each: the oracle keeps llama.cpp's vocabulary by path
        path = make_tiny_arch_gguf(tmp_path / f"v{v}.gguf", "llama", tokenizer=meta)
        on_demand, full = Tokenizer.from_gguf(open_gguf(path)), Tokenizer.from_gguf(open_gguf(path))
        full.tok  # noqa: B018 -- built now, so every encode goes through it
        on_demand._lookups_left = 1 << 40
        for _ in range(40):
            text = "".join(rng.choice("ab ") for _ in range(rng.randint(1, 24)))
            want = llama_tokenize(path, text, True, True)
            assert on_demand.encode(text) == want, (v, text)
            assert full.encode(text) == want, (v, text)
        assert on_demand._tok is None


def test_chat_template_renders_with_transformers_semantics(smol):
    from transformers.utils.chat_template_utils import render_jinja_template

    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    out = smol.apply_chat_template(msgs)
    ref, _ = render_jinja_template([msgs], chat_template=smol.chat_template, add_generation_prompt=True,
                                   bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert out == ref[0]
    assert out.startswith("<|im_start|>system\n") and out.endswith("<|im_start|>assistant\n")
    ids = smol.encode(out)
    assert ids.count(1) == 5  # system, 3 turns, generation prompt: each <|im_start|> one special token


def test_pre_tokenizer_table_covers_common_types():
    for pre in ("smollm", "gpt2", "llama-bpe", "qwen2", "starcoder", "default"):
        assert pre in PRE_TOKENIZERS


def test_bad_tokenizer_metadata_is_a_clear_error(tmp_path, tiny_llama):
    g = open_gguf(tiny_llama)
    specs = [TensorSpec(n, t.qtype, t.shape, t.data) for n, t in g.tensors.items()]
    meta = copy_metadata(g)
    meta["tokenizer.ggml.model"] = "rwkv"
    write_gguf(tmp_path / "rwkv.gguf", meta, specs)
    with pytest.raises(ToolkitError, match=r"rwkv\.gguf: unsupported tokenizer model 'rwkv'"):
        Tokenizer.from_gguf(open_gguf(tmp_path / "rwkv.gguf"))
    meta = copy_metadata(g)
    meta["tokenizer.ggml.pre"] = "no-such-pre"
    write_gguf(tmp_path / "pre.gguf", meta, specs)
    with pytest.raises(ToolkitError, match="unsupported tokenizer.ggml.pre 'no-such-pre'"):
        Tokenizer.from_gguf(open_gguf(tmp_path / "pre.gguf"))
    meta = {k: v for k, v in copy_metadata(g).items() if not k.startswith("tokenizer.")}
    write_gguf(tmp_path / "none.gguf", meta, specs)
    with pytest.raises(ToolkitError, match="no tokenizer"):
        Tokenizer.from_gguf(open_gguf(tmp_path / "none.gguf"))


# -- a 256k-piece SentencePiece vocabulary: built straight from the metadata, ids equal llama.cpp's

@pytest.fixture(scope="module")
def large_spm_path(tmp_path_factory):
    return make_large_spm_gguf(tmp_path_factory.mktemp("spm256k") / "spm256k.gguf", 256_000)


def large_spm_texts(n: int = 150) -> list[str]:
    """Random words of the vocabulary's alphabet (so long pieces and many competing merges apply), joined by
    spaces, newlines and punctuation, plus text outside it (byte fallback) and control-token text."""
    import random

    rng = random.Random(1)
    texts = list(SPM_TEXTS) + ["α β γ абв 日本語中文字", "😀 emoji → ✓", "\t tab  and\n\nnewlines ", "<s>x</s>"]
    for _ in range(n):
        words = ["".join(rng.choice(LARGE_SPM_ALPHABET) for _ in range(rng.randint(1, 14)))
                 for _ in range(rng.randint(1, 10))]
        texts.append(rng.choice([" ", "  ", "\n", ", ", ""]).join(words))
    return texts


def test_large_sentencepiece_ids_equal_llama_cpp(large_spm_path):
    """Every id equal to llama_tokenize's on 170 texts (special on and off), both through each text's own merges
    (what encoding uses before the whole vocabulary's tokenizer is built) and through that tokenizer; every
    piece equal to llama_token_to_piece's; the merges found by hashing equal those of the plain loop over every
    split."""
    from toolkit.spm import _spm_merges_loop, spm_merges

    g = open_gguf(large_spm_path)
    on_demand, full = Tokenizer.from_gguf(g), Tokenizer.from_gguf(g)
    full.tok  # noqa: B018 -- built now, so every encode goes through it
    on_demand._lookups_left = 1 << 40  # the look-up budget is not what this tests
    assert on_demand.kind == "llama" and on_demand.vocab_size == 256_000
    for i, text in enumerate(large_spm_texts()):
        special = i % 2 == 0
        want = llama_tokenize(large_spm_path, text, True, special)
        assert on_demand.encode(text, special=special) == want, text
        assert full.encode(text, special=special) == want, text
        ids = full.encode(text)
        assert full.token_bytes(ids) == llama_detokenize(large_spm_path, ids), text
    assert on_demand._tok is None  # every text above went through its own merges
    tokens, scores = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.scores")
    assert spm_merges(tokens, scores) == _spm_merges_loop(tokens, scores)


LOAD_SCRIPT = """
import sys
from toolkit.model import load
model, tok = load(sys.argv[1], device="cpu")
ids = tok.encode("the quick brown fox")
print(len(ids), "transformers" in sys.modules)
"""


def test_loading_a_sentencepiece_model_does_not_import_transformers(large_spm_path):
    """The load path (model + tokenizer) stays off transformers: importing it alone costs seconds."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(large_spm_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    n, imported = r.stdout.split()
    assert int(n) > 1 and imported == "False"


def _flip(src, dst, key: str, old: bytes, new: bytes) -> None:
    """Copy src to dst with one string of the `key` array, `old` (its bytes after the length prefix), replaced
    by `new` of the same length: one damaged entry, the file otherwise intact."""
    import struct

    data = bytearray(open(src, "rb").read())
    at = data.index(key.encode())
    at = data.index(struct.pack("<Q", len(old)) + old, at) + 8
    data[at:at + len(old)] = new
    open(dst, "wb").write(bytes(data))


@pytest.mark.parametrize("key,old,new", [
    ("tokenizer.ggml.tokens", "Ġloc".encode(), "Ġlox".encode()),   # a token the merges build: now missing
    ("tokenizer.ggml.merges", "Ġ t".encode(), "Ġ \x7f".encode()),  # a merge of a token that does not exist
])
def test_damaged_vocabulary_is_one_line_from_the_cli(tiny_llama, tmp_path, capsys, key, old, new):
    """A GGUF whose vocabulary or merges have one flipped byte: `toolkit infer` exits 1 with one line naming the
    file (tokenizers' own 'Error while initializing BPE' used to end in a traceback)."""
    from toolkit.cli import main as cli

    bad = tmp_path / "damaged.gguf"
    _flip(tiny_llama, bad, key, old, new)
    assert cli(["infer", "-m", str(bad), "-p", "hello", "-n", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "vocabulary" in err[0], err
    assert "Traceback" not in err[0]
