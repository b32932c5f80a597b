"""Block types only llama.cpp's libggml reads (IQ1-IQ3, TQ1_0/TQ2_0, MXFP4, NVFP4): values identical to gguf-py's
dequantizers; a base of such a type loads, infers (against llama.cpp), trains and merges like its float copy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from blocks import random_blocks, same_bits
from gguf import GGML_QUANT_SIZES, quants as gguf_quants
from gguf import GGMLQuantizationType as Q
from oracle_ggml import ggml_quantize
from tiny import make_tiny_gguf

from toolkit import ggml_codec, ggml_matmul, qkernels
from toolkit.errors import ToolkitError
from toolkit.gguf_io import TensorSpec, copy_metadata, open_gguf, write_gguf
from toolkit.quants import DEQUANT_TYPES, dequant_problem, dequantize, quantize, quantize_problem, tensor_float

pytestmark = pytest.mark.skipif(not ggml_codec.available(), reason="llama-cpp-python's libggml not available")

# every block type gguf-py can read and the torch codec cannot (Q1_0: libggml only, no second reader to check it)
ONLY_GGML = [Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M, Q.TQ1_0, Q.TQ2_0, Q.MXFP4,
             Q.NVFP4]
TEXT = "".join(f"<q>what is {a} times {b}?\n{a * b}\n" for a in range(2, 7) for b in range(2, 5))


@pytest.mark.parametrize("qtype", ONLY_GGML, ids=lambda q: q.name)
def test_read_as_gguf_py_reads_them(qtype):
    assert qtype not in DEQUANT_TYPES and dequant_problem(qtype) is None
    raw = random_blocks(qtype, 6, 512, seed=int(qtype))  # every bit pattern, NaN and inf scales included
    ref = gguf_quants.dequantize(raw, qtype).reshape(6, 512).astype(np.float32)
    got = dequantize(torch.from_numpy(raw), qtype, (6, 512)).numpy()
    assert same_bits(got, ref)  # the same float operations in the same order: bit for bit
    prev = ggml_codec.set_codec("torch")  # the torch codec has no form of these: libggml reads them anyway
    try:
        assert same_bits(dequantize(torch.from_numpy(raw), qtype, (6, 512)).numpy(), ref)
    finally:
        ggml_codec.set_codec(prev)


def test_refusals_are_one_line_not_an_abort():
    """ggml_quantize_chunk aborts the process on a type with no quantizer or one that needs an importance matrix:
    those are refused before the call."""
    x = torch.randn(2, 256)
    with pytest.raises(ToolkitError, match="IQ2_XXS needs an importance matrix"):
        quantize(x, Q.IQ2_XXS)
    with pytest.raises(ToolkitError, match="libggml has no codec for Q8_K"):
        quantize(x, Q.Q8_K)
    assert quantize_problem(Q.I32) == dequant_problem(Q.I32) == "I32 holds integers, not float values"
    for q in (Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_S, Q.TQ2_0, Q.MXFP4):  # types the torch codec only reads, or not at all
        assert quantize(x, q).numpy().tobytes() == ggml_quantize(x.numpy(), q)
    b = quantize(x, Q.IQ3_S)
    assert b.shape == (2, GGML_QUANT_SIZES[Q.IQ3_S][1]) and quantize_problem(Q.IQ3_S) is None
    # IQ3_S: 3.4 bits a weight: a normal row comes back within a quarter of its norm
    assert (dequantize(b, Q.IQ3_S, (2, 256)) - x).norm() < 0.25 * x.norm()


def _float_copy(src, dst):
    """The same model with every tensor stored as the float32 values toolkit reads from `src`."""
    g = open_gguf(src)
    write_gguf(dst, copy_metadata(g), [TensorSpec(n, Q.F32, tuple(t.shape), tensor_float(t))
                                      for n, t in g.tensors.items()])
    return dst


@pytest.fixture(scope="module")
def iq_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("iq")
    iq = make_tiny_gguf(d / "tiny-iq3_s.gguf", qtype="IQ3_S", dim=256, ffn=512, n_head=4, n_kv=2)
    return iq, _float_copy(iq, d / "tiny-iq3_s-as-f32.gguf")


def test_iq_base_infers_like_its_float_copy_and_like_llama_cpp(iq_pair):
    from oracle_llama import llama_logits
    from toolkit.model import load

    iq, f32 = iq_pair
    model, tok = load(iq, device="cpu", weights="packed")  # a prompt's rows: blocks dequantized, exact
    assert model.blk[0].attn_q.qtype == Q.IQ3_S and model.blk[0].attn_q.qweight.dtype == torch.uint8  # packed
    ref_model, _ = load(f32, device="cpu", weights="float")
    ids = tok.encode(TEXT[:60])
    with torch.inference_mode():
        got = model(torch.tensor([ids]))[0].numpy()
        ref = ref_model(torch.tensor([ids]))[0].numpy()
    # the same float weights; only the GEMM's call form differs: float32 rounding
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    # llama.cpp multiplies IQ3_S weights by 8-bit quantized activations (Q8_K): close, not equal
    lc = llama_logits(str(iq), ids)
    cos = (got * lc).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(lc, axis=-1)
    assert cos.min() > 0.99
    if ggml_matmul.available():  # the ggml mode multiplies as llama.cpp does: closer to it than the float path
        n = min(len(ids), qkernels.GGML_MAX_ROWS)  # (longer inputs of IQ3_S dequantize blocks in this mode too)
        with torch.inference_mode():
            mine = load(iq, device="cpu", weights="ggml")[0](torch.tensor([ids[:n]]))[0].numpy()
        lc, got = lc[:n], got[:n]  # causal: the first n positions' logits are those of the first n tokens
        cos = (mine * lc).sum(-1) / np.linalg.norm(mine, axis=-1) / np.linalg.norm(lc, axis=-1)
        # measured (32 of the 35 tokens): cosine 0.99938 against the float path's 0.99867, largest deviation 2.7e-2
        # of the largest logit against 3.9e-2
        assert np.abs(mine - lc).max() < np.abs(got - lc).max() and cos.min() > 0.999


def test_iq_base_trains_like_its_float_copy_and_merges_in_its_type(iq_pair, tmp_path):
    from toolkit.convert.export_lora import export_lora
    from oracle_llama import llama_logits
    from toolkit.model import load
    from toolkit.train.finetune import FinetuneConfig, finetune

    iq, f32 = iq_pair
    (tmp_path / "data.txt").write_text(TEXT)

    def run(base, tag):
        return finetune(FinetuneConfig(
            model_base=str(base), train_data=str(tmp_path / "data.txt"), sample_start="<q>", ctx=24, batch=2,
            adam_iter=3, adam_alpha=0.05, warmup=1, lora_r=4, lora_alpha=8, checkpoint_in="", checkpoint_out="",
            lora_out=str(tmp_path / f"lora-{tag}.gguf"), log_file="", save_every=0, threads=1, seed=5, quiet=True))

    a, b = run(iq, "iq"), run(f32, "f32")
    # packed base: blocks dequantized on every use; float copy: the same values held; same arithmetic otherwise
    assert np.allclose(a.losses, b.losses, rtol=1e-5, atol=0) and a.losses[-1] < a.losses[0]

    merged = tmp_path / "merged.gguf"
    export_lora(iq, merged, [(str(tmp_path / "lora-iq.gguf"), 1.0)])
    g = open_gguf(merged)
    assert g.tensors["blk.0.attn_q.weight"].qtype == Q.IQ3_S  # `keep`: requantized into the base's own type
    _, tok = load(iq, device="cpu")
    ids = tok.encode(TEXT[:60])
    base = llama_logits(str(iq), ids)
    unmerged = llama_logits(str(iq), ids, adapters=[(str(tmp_path / "lora-iq.gguf"), 1.0)])
    lc_merged = llama_logits(str(merged), ids)
    # requantizing the merged weights adds IQ3_S rounding: the merged file lands nearer llama.cpp's unmerged
    # result than the base is; how much nearer depends on the adapter's size against that rounding (seen: 0.26
    # of the base's distance; 1 would mean nothing merged)
    assert np.linalg.norm(lc_merged - unmerged) < 0.5 * np.linalg.norm(base - unmerged)

    with pytest.raises(ToolkitError, match="needs an importance matrix"):  # refused before anything is written
        export_lora(iq, tmp_path / "never.gguf", [(str(tmp_path / "lora-iq.gguf"), 1.0)], outtype="iq2_xxs")
    assert not (tmp_path / "never.gguf").exists()


def test_without_libggml_such_a_base_is_refused_with_one_line(iq_pair, monkeypatch):
    from toolkit.model import load

    monkeypatch.setattr(ggml_codec, "_load", lambda: (None, "llama-cpp-python is not installed"))
    with pytest.raises(ToolkitError) as e:
        load(iq_pair[0], device="cpu")
    assert "IQ3_S blocks are read by llama.cpp's libggml, which is not usable here: llama-cpp-python is not " \
           "installed" in str(e.value) and "tensor '" in str(e.value) and str(iq_pair[0]) in str(e.value)


def test_finetune_start_line_names_the_codec_of_each_type():
    from toolkit.qlinear import QuantLinear
    from toolkit.train.trainer import _codec_note

    layers = [QuantLinear(torch.from_numpy(random_blocks(t, 4, 256, seed=1)), t, 256, 4) for t in (Q.Q4_0, Q.IQ3_S)]
    model = torch.nn.Sequential(*layers)
    cpu = torch.device("cpu")
    assert _codec_note(model, cpu) == "; blocks dequantized by libggml"
    prev = ggml_codec.set_codec("torch")
    try:  # the torch codec takes its own types; IQ3_S has none there, so libggml still reads it
        assert _codec_note(model, cpu) == "; blocks dequantized by Q4_0 torch, IQ3_S libggml"
        assert _codec_note(torch.nn.Sequential(layers[0]), cpu) == "; blocks dequantized by torch"
    finally:
        ggml_codec.set_codec(prev)
    assert _codec_note(torch.nn.Sequential(torch.nn.Linear(2, 2)), cpu) == ""
