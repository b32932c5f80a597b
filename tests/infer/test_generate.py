"""Sampling functions against llama.cpp's own samplers, greedy decoding through the KV cache against llama.cpp's
logits, seeds, stop tokens and UTF-8-safe streaming."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from oracle_llama import llama_greedy, llama_sampler_filter
from toolkit.infer.generate import (GenStats, apply_penalties, detokenize_stream, generate, generate_tokens,
                                    min_p_filter, sample, stream, top_k_filter, top_p_filter)
from toolkit.infer.sampling import candidates
from toolkit.model import load


def kept(t: torch.Tensor) -> set[int]:
    return {int(i) for i in torch.nonzero(torch.isfinite(t)).flatten()}


@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2000, generator=g) * 3


@pytest.mark.parametrize("k", [1, 5, 40, 1999])
def test_top_k_keeps_what_llama_cpp_keeps(logits, k):
    assert kept(top_k_filter(logits, k)) == set(llama_sampler_filter(logits.numpy(), "top_k", k))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.95, 0.999])
def test_top_p_keeps_what_llama_cpp_keeps(logits, p):
    assert kept(top_p_filter(logits, p)) == set(llama_sampler_filter(logits.numpy(), "top_p", p, 1))


@pytest.mark.parametrize("p", [0.01, 0.05, 0.3])
def test_min_p_keeps_what_llama_cpp_keeps(logits, p):
    assert kept(min_p_filter(logits, p)) == set(llama_sampler_filter(logits.numpy(), "min_p", p, 1))


def test_penalties_equal_llama_cpp(logits):
    history = [1, 2, 2, 3, 500, 500, 500, 1999]
    ours = apply_penalties(logits, history, repeat_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)
    # the binding still lists n_vocab first; passing last_n twice is right for either C signature
    ref = llama_sampler_filter(logits.numpy(), "penalties", 64, 64, 1.3, 0.2, 0.5, accepted=history)
    ref = np.array([ref[i] for i in range(len(logits))])
    assert np.allclose(ours.numpy(), ref, atol=1e-5)
    assert not np.allclose(ours.numpy(), logits.numpy())


def test_sampling_follows_the_tempered_distribution():
    lg = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    gen = torch.Generator().manual_seed(0)
    n = 4000
    counts = np.bincount([sample(lg, 0.7, 0, 1.0, 0.0, gen) for _ in range(n)], minlength=5) / n
    probs = (lg / 0.7).softmax(-1).numpy()
    assert np.abs(counts - probs).max() < 0.03  # ~4 sigma at n=4000
    assert sample(lg, 0.0) == 0  # greedy


@pytest.mark.parametrize("k, p, m", [(40, 0.95, 0.05), (5, 1.0, 0.0), (0, 0.9, 0.01), (1999, 0.5, 0.3), (0, 1.0, 0.0)])
def test_the_draw_is_over_the_filter_chain(logits, k, p, m):
    """sample() draws from the top-k candidates only: the same distribution as the whole chain of filters above
    (each checked against llama.cpp) over the whole vocabulary, to float32 rounding of a softmax (1e-6)."""
    probs, ids = candidates(logits, 0.8, k, p, m)
    got = torch.zeros_like(logits).index_add_(0, ids, probs) if ids is not None else probs
    want = (min_p_filter(top_p_filter(top_k_filter(logits, k), p), m) / 0.8).softmax(-1)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert kept(torch.where(want > 0, want, float("-inf"))) == set(torch.nonzero(got).flatten().tolist())


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load(tiny_llama, device="cpu", weights="float")


def test_greedy_decode_equals_llama_cpp(tiny, tiny_llama):
    model, tok = tiny
    prompt = tok.encode("Once upon a time, in a land far away,")
    ours = list(generate_tokens(model, prompt, 24, temperature=0.0))
    assert ours == llama_greedy(tiny_llama, prompt, 24)


def test_seed_reproducible_and_text_matches_tokens(tiny):
    model, tok = tiny
    a = generate(model, tok, "Hello", 16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, ignore_eos=True)
    b = generate(model, tok, "Hello", 16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, ignore_eos=True)
    c = generate(model, tok, "Hello", 16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=8, ignore_eos=True)
    assert a == b and a != c
    stats = GenStats()
    pieces = list(stream(model, tok, "Hello", 16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7,
                         ignore_eos=True, stats=stats))
    assert "".join(pieces) == a == tok.decode(stats.tokens)
    assert stats.gen_tokens == 16 and stats.prompt_tokens == len(tok.encode("Hello"))


def test_stop_tokens_end_generation(tiny):
    model, tok = tiny
    prompt = tok.encode("Hello")
    first = next(iter(generate_tokens(model, prompt, 5, temperature=0.0)))
    assert list(generate_tokens(model, prompt, 5, temperature=0.0, stop_ids={first})) == []


def test_context_limit_is_respected(tiny):
    model, tok = tiny
    prompt = tok.encode("Hello there")
    assert len(list(generate_tokens(model, prompt, 100, temperature=0.0, n_ctx=len(prompt) + 3))) == 3
    from toolkit.errors import ToolkitError

    with pytest.raises(ToolkitError, match="more than the context"):
        list(generate_tokens(model, prompt, 5, n_ctx=len(prompt)))


def test_streaming_never_splits_utf8(smollm2_path):
    from toolkit.gguf_io import open_gguf
    from toolkit.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(open_gguf(smollm2_path))
    text = "emoji 😀🎉🤖, CJK 日本語の文章, accents naïve café"
    ids = tok.encode(text)
    assert any(not tok.token_bytes([i]).decode("utf-8", "ignore") for i in ids)  # some tokens are partial chars
    pieces = list(detokenize_stream(tok, iter(ids)))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_public_api_one_liners(tiny_llama, tiny):
    import toolkit

    model, tok = toolkit.load(tiny_llama, device="cpu", weights="float")
    text = toolkit.generate(model, tok, "Once upon a time", 8, temperature=0.0, ignore_eos=True)
    m2, t2 = tiny
    assert text == generate(m2, t2, "Once upon a time", 8, temperature=0.0, ignore_eos=True)
    assert text == tok.decode(llama_greedy(tiny_llama, tok.encode("Once upon a time"), 8))
