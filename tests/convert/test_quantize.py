"""`toolkit quantize` against llama.cpp's own `llama_model_quantize` (through llama-cpp-python).

Oracle: llama.cpp quantizes the same input in a subprocess (a failed GGML_ASSERT there aborts the process, not
pytest). Exactness: every tensor's type and bytes equal llama.cpp's (tolerance: none, bytes compared).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from toolkit.convert.quantize import FTYPES, main, parse_ftype, plan_types, quantize_model
from toolkit.gguf_io import open_gguf

pytest.importorskip("llama_cpp")

ORACLE = textwrap.dedent("""
    import sys, llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.pure, p.nthread = int(sys.argv[3]), sys.argv[4] == "1", 2
    p.allow_requantize = True  # SmolLM2 is Q4_1/Q8_0: llama.cpp dequantizes and requantizes, as we do
    sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
""")


def llama_quantize(src: Path, dst: Path, qtype: str, pure: bool) -> Path:
    ftype, _ = parse_ftype(qtype)
    r = subprocess.run([sys.executable, "-c", ORACLE, str(src), str(dst), str(int(ftype)), "1" if pure else "0"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return dst


def assert_same_tensors(ours: Path, ref: Path) -> None:
    a, b = open_gguf(ours), open_gguf(ref)
    assert list(a.tensors) == list(b.tensors)  # llama.cpp's order (layer, then name)
    diffs = [(n, ta.qtype.name, b.tensors[n].qtype.name) for n, ta in a.tensors.items()
             if ta.qtype != b.tensors[n].qtype or not np.array_equal(ta.raw().numpy(), b.tensors[n].raw().numpy())]
    assert not diffs, f"{len(diffs)} tensors differ from llama.cpp, e.g. {diffs[:3]}"
    assert a.metadata == b.metadata  # everything carried, file_type and quantization_version set alike


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory) -> Path:
    """8 layers (so the use_more_bits layer pattern shows), rows of 256/512 so K-quants apply without fallback,
    untied output, GQA 4, and a 512-token dummy vocabulary (llama_model_quantize reads hparams, not the vocab):
    small enough that the K-quant searches run in seconds."""
    from tiny import llama_tensors

    from toolkit.gguf_io import TensorSpec, write_gguf

    n_layer, dim, n_head, n_kv, ffn, vocab = 8, 256, 4, 1, 512, 512
    meta = {"general.architecture": "llama", "general.name": "tiny-quant", "llama.block_count": n_layer,
            "llama.context_length": 256, "llama.embedding_length": dim, "llama.feed_forward_length": ffn,
            "llama.attention.head_count": n_head, "llama.attention.head_count_kv": n_kv,
            "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.rope.dimension_count": dim // n_head, "llama.vocab_size": vocab, "general.file_type": 0,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(vocab)]}
    t = llama_tensors(n_layer, dim, n_head, n_kv, ffn, vocab, tied=False, seed=0)
    path = tmp_path_factory.mktemp("q") / "tiny256.gguf"
    write_gguf(path, meta, [TensorSpec(n, Q.F32, tuple(x.shape), x) for n, x in t.items()])
    return path


def _supported(qtype: str) -> bool:
    from toolkit.quants import quantize_problem

    return quantize_problem(FTYPES[qtype][1]) is None


LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32"]
KQUANTS = ["Q3_K_S", "Q4_K_S", "Q5_K_S", "Q6_K"]


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q3_K_L", "Q2_K", "IQ4_XS", "IQ3_M"])
def test_mix_is_byte_identical_to_llama_cpp(tiny256, tmp_path, qtype):
    """The whole mix (types and bytes of every tensor, metadata) equals llama.cpp's output."""
    if not _supported("Q6_K") or not _supported(qtype):
        pytest.skip(f"toolkit.quants cannot quantize {qtype}'s types here")
    ref = llama_quantize(tiny256, tmp_path / "ref.gguf", qtype, pure=False)
    ours = tmp_path / "ours.gguf"
    quantize_model(tiny256, ours, qtype, progress=False)
    assert_same_tensors(ours, ref)
MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q4_0", "Q8_0",
         "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_M"]


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_pure_is_byte_identical_to_llama_cpp(tiny256, tmp_path, qtype):
    if not _supported(qtype):
        pytest.skip(f"toolkit.quants cannot quantize {qtype} yet")
    ref = llama_quantize(tiny256, tmp_path / "ref.gguf", qtype, pure=True)
    ours = tmp_path / "ours.gguf"
    quantize_model(tiny256, ours, qtype, pure=True, progress=False)
    assert_same_tensors(ours, ref)


@pytest.mark.parametrize("qtype", MIXES)
def test_mix_types_match_llama_cpp(tiny256, tmp_path, qtype):
    """The per-tensor choices (attn_v / ffn_down bumps by layer, output Q6_K, 1-D kept F32) equal llama.cpp's."""
    ref = open_gguf(llama_quantize(tiny256, tmp_path / "ref.gguf", qtype, pure=False))
    ftype, default = parse_ftype(qtype)
    ours = plan_types(open_gguf(tiny256), ftype, default)
    assert {n: t.name for n, t in ours.items()} == {n: t.qtype.name for n, t in ref.tensors.items()}
    assert len(set(ours.values())) > 1  # a mix, not one type (1-D norms stay F32 at least)


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q3_K_M", "Q5_K_S", "Q2_K", "IQ4_XS", "IQ3_S"])
def test_mix_types_match_llama_cpp_on_smollm2(smollm2_path, tmp_path, qtype):
    """SmolLM2's 576-wide rows do not split into 256-blocks: llama.cpp's fallback types must be chosen too."""
    ref = open_gguf(llama_quantize(smollm2_path, tmp_path / "ref.gguf", qtype, pure=False))
    ftype, default = parse_ftype(qtype)
    ours = plan_types(open_gguf(smollm2_path), ftype, default)
    assert {n: t.name for n, t in ours.items()} == {n: t.qtype.name for n, t in ref.tensors.items()}


@pytest.mark.parametrize("qtype,pure", [("Q4_0", True), ("Q8_0", False), ("Q5_1", False), ("Q4_K_M", False),
                                        ("IQ4_XS", False)])
def test_smollm2_requantized_is_byte_identical(smollm2_path, tmp_path, qtype, pure):
    """From SmolLM2's Q4_1/Q8_0 blocks: dequantize + quantize as llama.cpp does; tied output rules apply."""
    mix_needs_k = not pure and qtype.endswith("_M") and not _supported("Q6_K")
    if not all(_supported(t) for t in {qtype, "Q8_0"}) or mix_needs_k:
        pytest.skip(f"toolkit.quants cannot quantize {qtype}'s types yet")
    ref = llama_quantize(smollm2_path, tmp_path / "ref.gguf", qtype, pure=pure)
    ours = tmp_path / "ours.gguf"
    quantize_model(smollm2_path, ours, qtype, pure=pure, progress=False)
    assert_same_tensors(ours, ref)


def test_llama_cpp_runs_our_quantized_model(smollm2_path, tmp_path):
    """The file we write loads in llama.cpp; its logits equal those of llama.cpp's own Q8_0 file exactly, and stay
    close to the source's (mean cosine >= 0.99: Q4_1 -> Q8_0 loses little)."""
    import llama_cpp

    out = tmp_path / "q8.gguf"
    assert main([str(smollm2_path), str(out), "q8_0", "--no-progress"]) == 0
    g = open_gguf(out)
    assert g.get("general.file_type") == 7 and g.tensors["blk.0.attn_norm.weight"].qtype == Q.F32
    ref = llama_quantize(smollm2_path, tmp_path / "ref.gguf", "Q8_0", pure=False)

    def logits(path: Path) -> np.ndarray:
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog because it wanted to", add_bos=True)
        llm.eval(toks)
        out = np.array(llm.scores[: len(toks)])
        llm.close()
        return out

    src, ours, theirs = logits(smollm2_path), logits(out), logits(ref)
    assert np.array_equal(ours, theirs)
    cos = (src * ours).sum(-1) / np.linalg.norm(src, axis=-1) / np.linalg.norm(ours, axis=-1)
    assert cos.mean() >= 0.99, cos


def test_bad_type_is_one_line_and_writes_nothing(tiny_llama, tmp_path, capsys):
    from toolkit.cli import main as cli

    out = tmp_path / "x.gguf"
    assert cli(["quantize", str(tiny_llama), str(out), "Q9_9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Q9_9" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_iq_type_without_libggml_is_one_line_and_writes_nothing(tiny256, tmp_path, monkeypatch, capsys):
    from toolkit import ggml_codec
    from toolkit.cli import run_command

    monkeypatch.setattr(ggml_codec, "_load", lambda: (None, "llama-cpp-python is not installed"))
    out = tmp_path / "never.gguf"

    assert run_command("toolkit.convert.quantize", [str(tiny256), str(out), "IQ4_XS"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-> IQ4_XS): llama-cpp-python is not installed" in err[0] and str(tiny256) in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
