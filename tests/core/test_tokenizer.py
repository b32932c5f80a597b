"""Tokenizer from GGUF metadata == llama.cpp's tokenizer (llama_tokenize / llama_token_to_piece) on the same file:
the real SmolLM2 vocabulary (gpt2 BPE, `smollm` pre-tokenizer) and a SentencePiece (`llama`) vocabulary
written in code."""
from __future__ import annotations

import pytest

from oracle_llama import llama_detokenize, llama_tokenize
from tiny import make_tiny_arch_gguf, spm_tokenizer_metadata
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


@pytest.mark.parametrize("special", [True, False])
def test_sentencepiece_ids_equal_llama_cpp(spm_path, special):
    tok = Tokenizer.from_gguf(open_gguf(spm_path))
    assert tok.kind == "llama" and tok.add_bos
    for text in SPM_TEXTS:
        assert tok.encode(text, special=special) == llama_tokenize(spm_path, text, True, special), text
        assert tok.encode(text, add_bos=False, special=special) == llama_tokenize(spm_path, text, False, special)
        ids = tok.encode(text)
        assert tok.token_bytes(ids) == llama_detokenize(spm_path, ids)


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
