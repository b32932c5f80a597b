"""The GGUF-native model against two oracles on the same files: transformers' own GGUF loading (fp32) and
llama.cpp (llama-cpp-python). Tiny random models of every architecture are written here; the real SmolLM2
Q4_1 GGUF covers the quantized llama path."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tiny import make_tiny_arch_gguf, make_tiny_gguf
from toolkit import ggml_matmul
from toolkit.errors import ToolkitError
from toolkit.gguf_io import open_gguf, write_gguf, TensorSpec, copy_metadata
from toolkit.model import ModelArgs, Transformer, load

ARCHS = ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun."
# > 100 tokens of ordinary prose for the real model
PROSE = ("Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical "
         "energy. Inside the chloroplasts, chlorophyll absorbs sunlight, and the energy is used to split water "
         "molecules into oxygen, protons and electrons. The electrons travel along a chain of proteins, and the "
         "energy they release is stored in ATP and NADPH. In the Calvin cycle, these molecules provide the energy "
         "to fix carbon dioxide from the air into sugars, which the plant uses to grow. Almost all life on Earth "
         "depends on this process, directly or indirectly, because it produces the oxygen we breathe.")


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("arch")


@pytest.fixture(scope="module")
def arch_path(tiny_dir):
    cache = {}

    def get(arch: str, **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            name = f"{arch}-" + "-".join(f"{k}{v}" for k, v in sorted(kw.items())) + ".gguf"
            cache[key] = make_tiny_arch_gguf(tiny_dir / name, arch, **kw)
        return cache[key]

    return get


def ours(path, ids) -> np.ndarray:
    model, _ = load(path, device="cpu", weights="float")
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0].numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_arch_matches_transformers_gguf(arch, arch_path):
    from oracle_hf import hf_logits

    path = arch_path(arch)
    _, tok = load(path, device="cpu", weights="float")
    ids = tok.encode(TEXT)
    ref = hf_logits(path, ids)
    got = ours(path, ids)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-3  # fp32 both sides: observed ~1e-6


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])  # phi3: see below
def test_tiny_arch_matches_llama_cpp(arch, arch_path):
    from oracle_llama import llama_logits

    path = arch_path(arch)
    _, tok = load(path, device="cpu", weights="float")
    ids = tok.encode(TEXT)  # 20 tokens: longer than gemma's window of 8, so sliding layers are exercised
    ref = llama_logits(path, ids)
    got = ours(path, ids)
    # llama.cpp computes some products in f16 (KQ, V): 5e-3 of the logit range; observed <= 1.4e-3
    assert rel_err(got, ref) < 5e-3
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_phi3_tiny_is_refused_by_this_llama_cpp_vocab_but_matches_transformers(arch_path):
    """llama.cpp's phi3 vocab setup wants phi-3's own special tokens, which the borrowed SmolLM2 vocab lacks,
    so phi3 is checked against transformers only (test above); here: the fused tensors really are used."""
    model, _ = load(arch_path("phi3"), device="cpu", weights="float")
    assert hasattr(model.blk[0], "attn_qkv") and not hasattr(model.blk[0], "attn_q")
    assert model.blk[0].ffn_up.out_features == 2 * model.args.ffn_dim


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])  # K-quants: exactness is in test_quants
def test_quantized_tiny_llama_matches_llama_cpp(qtype, tiny_dir):
    from oracle_llama import llama_logits

    path = make_tiny_gguf(tiny_dir / f"tiny-{qtype}.gguf", qtype=qtype, dim=128, ffn=256, n_head=4, n_kv=2)
    model, tok = load(path, device="cpu", weights="float")
    assert type(model.blk[0].attn_q).__name__ == "QuantLinear"  # stays packed
    assert model.blk[0].attn_q.qweight.dtype == torch.uint8
    ids = tok.encode(TEXT)
    ref = llama_logits(path, ids)
    with torch.inference_mode():
        got = model(torch.tensor([ids]))[0].numpy()
    # llama.cpp quantizes activations to 8 bits for quantized matmuls: close, not equal
    cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.99
    # random tiny models have near-tied logits, so top-1 is a weak check here (the real model's is below)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_llama3_rope_freqs_and_linear_rope_scaling_match_llama_cpp(tiny_dir):
    from oracle_llama import llama_logits

    base = make_tiny_gguf(tiny_dir / "base.gguf")
    g = open_gguf(base)
    meta = copy_metadata(g)
    meta["llama.rope.scaling.type"] = "linear"
    meta["llama.rope.scaling.factor"] = 2.0
    hd = g.arch_get("rope.dimension_count")
    factors = torch.linspace(1.0, 8.0, hd // 2)  # Llama 3's per-frequency divisors, as the converter stores them
    specs = [TensorSpec(n, t.qtype, t.shape, t.data) for n, t in g.tensors.items()]
    specs.append(TensorSpec("rope_freqs.weight", Q.F32, (hd // 2,), factors))
    path = tiny_dir / "llama3-rope.gguf"
    write_gguf(path, meta, specs)
    model, tok = load(path, device="cpu", weights="float")
    assert model.args.rope_scale == 0.5 and model.freq_factors is not None
    ids = tok.encode(TEXT * 3)
    with torch.inference_mode():
        got = model(torch.tensor([ids]))[0].numpy()
        plain = ours(base, ids)
    ref = llama_logits(path, ids)
    assert rel_err(got, ref) < 5e-3
    assert rel_err(plain, ref) > 1e-2  # the scaling matters, so the test can tell


def test_smollm2_matches_transformers_gguf(smollm2_path):
    from oracle_hf import hf_logits

    model, tok = load(smollm2_path, device="cpu", weights="float")
    ids = tok.encode(PROSE)[:48]
    with torch.inference_mode():
        got = model(torch.tensor([ids]))[0].numpy()
    ref = hf_logits(smollm2_path, ids)
    assert rel_err(got, ref) < 1e-3


def test_smollm2_top1_agrees_with_llama_cpp(smollm2_path):
    from oracle_llama import llama_logits

    model, tok = load(smollm2_path, device="cpu", weights="float")
    ids = tok.encode(PROSE)
    assert len(ids) >= 100
    with torch.inference_mode():
        got = model(torch.tensor([ids]))[0].numpy()
    ref = llama_logits(smollm2_path, ids)
    agree = (got.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.95, agree  # observed 0.98 (llama.cpp quantizes activations)


@pytest.mark.parametrize("weights,kind", [("packed", "int4"),
                                          pytest.param("ggml", "ggml", marks=pytest.mark.skipif(
                                              not ggml_matmul.available(), reason="libggml not installed"))])
def test_smollm2_packed_decoding_agrees_with_llama_cpp(smollm2_path, weights, kind):
    """The CPU kernel paths (packed: int4 kernels, bf16 activations; ggml: libggml's own mul_mat, 8-bit
    activations) decoding token by token through the KV cache, against llama.cpp's logits for the same >= 100
    tokens: the issue's top-1 bound, and the same agreement with the exact float path (each rounds activations
    otherwise than the float reference). Measured: top-1 with llama.cpp 0.957 (packed), 0.983 (ggml); logits
    within 1.6e-2 (packed) and 3.8e-2 (ggml: 8 bits per block of 32 is coarser than bf16's 8-bit mantissa) of
    the float path."""
    from oracle_llama import llama_logits

    model, tok = load(smollm2_path, device="cpu", weights=weights)
    assert model.blk[0].attn_q.kernel_weight().kind == kind
    ids = tok.encode(PROSE)
    model.setup_caches(1, len(ids))
    with torch.inference_mode():
        got = np.stack([model(torch.tensor([[t]]), input_pos=torch.tensor([i]))[0, -1].numpy()
                        for i, t in enumerate(ids)])
    model.clear_caches()
    ref = llama_logits(smollm2_path, ids)
    exact = ours(smollm2_path, ids)
    agree = (got.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.95, agree
    assert (got.argmax(-1) == exact.argmax(-1)).mean() >= 0.95
    assert 0 < rel_err(got, exact) < 6e-2  # not bit-exact, but close


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
def test_kv_cache_decode_equals_full_forward(arch, arch_path):
    """Prefill + one token at a time through the static cache == one full causal pass (gemma: past its
    sliding window of 8, so the windowed mask over the cache is exercised)."""
    model, tok = load(arch_path(arch), device="cpu", weights="float")
    ids = tok.encode(TEXT)
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0]
        model.setup_caches(1, 64)
        steps = [model(torch.tensor([ids[:5]]), input_pos=torch.arange(5))[0]]
        for i in range(5, len(ids)):
            steps.append(model(torch.tensor([[ids[i]]]), input_pos=torch.tensor([i]))[0])
        model.clear_caches()
    inc = torch.cat(steps)
    assert torch.allclose(inc, full, atol=1e-4, rtol=1e-4)


def test_unknown_architecture_is_a_clear_error(tmp_path):
    base = make_tiny_gguf(tmp_path / "t.gguf")
    g = open_gguf(base)
    meta = copy_metadata(g)
    meta["general.architecture"] = "mamba9"
    write_gguf(tmp_path / "m.gguf", meta, [TensorSpec(n, t.qtype, t.shape, t.data) for n, t in g.tensors.items()])
    with pytest.raises(ToolkitError, match="unsupported architecture 'mamba9'"):
        load(tmp_path / "m.gguf", device="cpu", weights="float")


def test_missing_tensor_names_file_and_tensor(tmp_path):
    base = make_tiny_gguf(tmp_path / "t.gguf")
    g = open_gguf(base)
    specs = [TensorSpec(n, t.qtype, t.shape, t.data) for n, t in g.tensors.items() if n != "blk.1.ffn_up.weight"]
    write_gguf(tmp_path / "broken.gguf", copy_metadata(g), specs)
    with pytest.raises(ToolkitError, match=r"broken\.gguf.*blk\.1\.ffn_up\.weight"):
        load(tmp_path / "broken.gguf", device="cpu", weights="float")


def test_module_names_are_gguf_names(tiny_llama):
    model, _ = load(tiny_llama, device="cpu", weights="float")
    targets = model.lora_targets()
    assert model.get_submodule("blk.1.attn_q") is targets["blk.1.attn_q.weight"]
    assert targets["token_embd.weight"] is model.token_embd
    expected = {f"blk.{i}.{n}.weight" for i in range(2) for n in
                ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(targets) == expected | {"token_embd.weight", "output.weight"}
    # tied output shares the embedding's storage
    assert model.output.weight.data_ptr() == model.token_embd.weight.data_ptr()
    # F32 weights are views on the memory-mapped file, not copies
    g = open_gguf(tiny_llama)
    w = model.get_submodule("blk.0.ffn_down").weight
    assert np.array_equal(w.numpy(), g.tensors["blk.0.ffn_down.weight"].data)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama):
    model, tok = load(tiny_llama, device="cpu", weights="float")
    ids = torch.tensor([tok.encode(TEXT)])
    emb = model.token_embd.weight

    def grad(ckpt: bool) -> torch.Tensor:
        model.train()
        model.gradient_checkpointing = ckpt
        x = model.blk[0].attn_q.weight
        x.requires_grad_(True)
        x.grad = None
        model(ids).float().logsumexp(-1).mean().backward()
        g = x.grad.clone()
        x.requires_grad_(False)
        return g

    g0, g1 = grad(False), grad(True)
    assert g0.abs().max() > 0
    assert torch.allclose(g0, g1, atol=1e-6, rtol=1e-5)
    assert emb.grad is None


def test_overrides_reach_the_model(tiny_llama):
    model, tok = load(tiny_llama, device="cpu", weights="float")
    m2, _ = load(tiny_llama, device="cpu", weights="float", rope_base=500000.0, norm_eps=1e-3)
    assert m2.args.rope_base == 500000.0 and m2.blk[0].attn_norm.eps == 1e-3
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.inference_mode():
        assert not torch.allclose(model(ids), m2(ids))
    with pytest.raises(TypeError):
        ModelArgs().override(bogus=1)


def test_smollm2_loads_fast(smollm2_path):
    t = time.perf_counter()
    model, tok = load(smollm2_path, device="cpu", weights="float")
    elapsed = time.perf_counter() - t
    assert isinstance(model, Transformer) and tok.vocab_size == 49152
    assert elapsed < 2.0, elapsed  # mmap + header + tokenizer; ~0.2-0.3 s measured on an idle machine


def test_load_with_two_adapters_moves_logits_as_llama_cpp(tiny_llama, tmp_path):
    """load(adapters=[(file, scale), ...]) attaches them unmerged; llama.cpp with the same files and scales."""
    from oracle_llama import llama_logits
    from toolkit.adapter import Adapter, LoraPair, write_gguf_adapter

    g = torch.Generator().manual_seed(0)
    g_file = open_gguf(tiny_llama)
    files = []
    for k in range(2):
        t = {}
        for n in ["blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.attn_v.weight"]:
            out_f, in_f = g_file.tensors[n].shape
            t[n] = LoraPair(torch.randn(4, in_f, generator=g) * 0.1, torch.randn(out_f, 4, generator=g) * 0.1)
        files.append(tmp_path / f"a{k}.gguf")
        write_gguf_adapter(Adapter(t, alpha=8.0, arch="llama"), files[-1])
    adapters = [(str(files[0]), 1.0), (str(files[1]), 0.5)]
    base, tok = load(tiny_llama, device="cpu", weights="float")
    model, _ = load(tiny_llama, device="cpu", weights="float", adapters=adapters)
    assert set(model.adapters) and len(model.adapters) == 2
    ids = tok.encode(TEXT)
    with torch.inference_mode():
        d_ours = (model(torch.tensor([ids])) - base(torch.tensor([ids])))[0].numpy().ravel()
    d_ref = (llama_logits(tiny_llama, ids, adapters) - llama_logits(tiny_llama, ids)).ravel()
    assert np.abs(d_ours).max() > 0.1  # the adapters matter
    assert d_ours @ d_ref / np.linalg.norm(d_ours) / np.linalg.norm(d_ref) > 0.999  # observed 0.9999993


def test_last_only_gives_the_last_position(tiny_llama):
    # prefill asks for the last logits only: same values (to matmul-shape rounding), no [T, vocab] tensor
    model, _ = load(tiny_llama, device="cpu", weights="float")
    toks = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 30]])
    with torch.no_grad():
        full, last = model(toks), model(toks, last_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    assert torch.allclose(last[0, 0], full[0, -1], rtol=1e-5, atol=1e-5 * full.abs().max().item())
