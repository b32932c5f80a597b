"""`toolkit convert model`: HF folder <-> GGUF, against transformers (the HF side) and llama.cpp (the GGUF side).

Tiny HF models are made here with transformers (config + save_pretrained, SmolLM2's vocabulary); the real
SmolLM2 GGUF goes the other way. Tolerances are stated per test.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from toolkit.convert.model import convert_model, main, save_hf_tokenizer
from toolkit.gguf_io import open_gguf

pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")
from oracle_llama import llama_logits, llama_tokenize  # noqa: E402
from tiny import make_tiny_hf  # noqa: E402

TOKS = list(range(1000, 1064))


@pytest.fixture(scope="module")
def tokenizer_dir(smollm2_path, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    save_hf_tokenizer(open_gguf(smollm2_path), d)
    return d


@pytest.fixture(scope="module")
def transformers_tokenizer_dir(smollm2_path, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer as transformers builds it from the GGUF (gguf_file=) and saves it: what a user who
    loaded the model with transformers has. Unlike toolkit's own, it names no GGUF pre-tokenizer, so conversion
    back has to identify it as llama.cpp's converter does."""
    d = tmp_path_factory.mktemp("hftok")
    p = Path(smollm2_path)
    transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name).save_pretrained(str(d))
    assert "gguf_pre" not in (d / "tokenizer_config.json").read_text()
    return d


def tiny_hf(arch: str, folder: Path, tokenizer_dir: Path, seed: int = 0, tied: bool = False, **over) -> Path:
    """A 2-layer random model of `arch` saved with transformers' save_pretrained (safetensors)."""
    make_tiny_hf(arch, folder, tokenizer_dir, seed=seed, tied=tied, **over)
    return folder


def hf_logits(folder: Path, toks: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return m(torch.tensor([toks])).logits[0].float().numpy()


def top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


TOKENIZER_TEXT = "Hello world! 12345 3.14 <|im_start|>user\nnaïve café 🦙 don't"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_hf_to_gguf_logits_match_transformers(arch, tokenizer_dir, transformers_tokenizer_dir, tmp_path):
    """llama.cpp runs the converted model; logits vs transformers on the same weights: f32 top-1 >= 95% and
    max |diff| < 1e-2 * max |logit|; q8_0: mean cosine >= 0.995 (random weights give near-tied top-1s among
    49152 tokens, so top-1 is only required >= 80% there). The tokenizer is SmolLM2's as transformers saved it:
    its pre-tokenizer is identified by llama.cpp's check-text hash (smollm), llama.cpp loads the file and its ids
    equal transformers' on the same text. qwen2 keeps toolkit's own tokenizer folder (which names its
    pre-tokenizer): transformers gives any qwen2 folder Qwen2's split regex, and SmolLM2's vocabulary with that
    regex is a tokenizer llama.cpp's table does not know (test_unknown_bpe_pre_tokenizer_is_one_line)."""
    hf = tiny_hf(arch, tmp_path / "hf", tokenizer_dir if arch == "qwen2" else transformers_tokenizer_dir,
                 tied=arch.startswith("gemma"))
    ref = hf_logits(hf, TOKS)
    out = tmp_path / "m.gguf"
    assert main([str(hf), "-o", str(out), "--outtype", "f32", "--no-progress"]) == 0
    assert open_gguf(out).get("tokenizer.ggml.pre") == "smollm"
    if arch != "qwen2":
        tok = transformers.AutoTokenizer.from_pretrained(str(hf))
        assert llama_tokenize(out, TOKENIZER_TEXT) == tok(TOKENIZER_TEXT)["input_ids"]
    got = llama_logits(out, TOKS)
    assert top1(got, ref) >= 0.95
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max(), np.abs(got - ref).max()
    q8 = tmp_path / "q8.gguf"
    convert_model(hf, q8, "q8_0", progress=False)
    g = open_gguf(q8)
    assert g.tensors["blk.0.ffn_down.weight"].qtype == Q.Q8_0 and g.get("general.file_type") == 7
    q = llama_logits(q8, TOKS)
    cos = (q * ref).sum(-1) / np.linalg.norm(q, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.mean() >= 0.995 and top1(q, ref) >= 0.8, (cos.mean(), top1(q, ref))


def test_hf_gguf_hf_round_trip_is_exact(tokenizer_dir, tmp_path):
    """HF -> GGUF (f32) -> HF: every tensor bit-identical (q/k permutation undone), config and vocabulary kept."""
    from safetensors.numpy import load_file

    hf = tiny_hf("llama", tmp_path / "hf", tokenizer_dir, seed=3)
    convert_model(hf, tmp_path / "m.gguf", "f32", progress=False)
    convert_model(tmp_path / "m.gguf", tmp_path / "back", "f32", progress=False)
    a, b = load_file(hf / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    ca, cb = json.loads((hf / "config.json").read_text()), json.loads((tmp_path / "back" / "config.json").read_text())
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "tie_word_embeddings", "rms_norm_eps"):
        assert ca[k] == cb[k], k
    ta = transformers.AutoTokenizer.from_pretrained(str(hf))
    tb = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    text = "Hello world! 12345 <|im_start|>user\nnaïve café"
    assert ta(text)["input_ids"] == tb(text)["input_ids"]
    assert ta.chat_template == tb.chat_template


def test_smollm2_gguf_to_hf_runs_in_transformers(smollm2_path, tmp_path):
    """SmolLM2 Q4_1 -> HF folder: transformers loads it; its logits equal llama.cpp's on the dequantized (F32)
    model (top-1 >= 95%, max |diff| < 1e-2 * max |logit|); tokenizer ids and chat template equal llama.cpp's."""
    from toolkit.convert.quantize import quantize_model

    out = tmp_path / "hf"
    convert_model(smollm2_path, out, "f32", progress=False)
    text = "The history of Paris begins with a small fishing village on an island in the Seine. 2024 <|im_end|>"
    ids = llama_tokenize(smollm2_path, text)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok(text)["input_ids"] == ids
    assert tok.chat_template == open_gguf(smollm2_path).get("tokenizer.chat_template")
    f32 = tmp_path / "f32.gguf"
    quantize_model(smollm2_path, f32, "F32", progress=False)
    ref = llama_logits(f32, ids)
    got = hf_logits(out, ids)
    assert top1(got, ref) >= 0.95
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()


def test_unknown_bpe_pre_tokenizer_is_one_line(transformers_tokenizer_dir, tmp_path, capsys):
    """A byte-level BPE tokenizer whose check-text hash llama.cpp does not know is refused with one line naming
    the folder, not written with a guessed pre-tokenizer llama.cpp would split text differently with: SmolLM2's
    vocabulary with every character split apart first, and (as transformers builds it for any qwen2 folder) with
    Qwen2's split regex."""
    from toolkit.cli import main as cli

    hf = tiny_hf("llama", tmp_path / "hf", transformers_tokenizer_dir)
    tj = json.loads((hf / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": False}, tj["pre_tokenizer"]]}
    (hf / "tokenizer.json").write_text(json.dumps(tj))
    q2 = tiny_hf("qwen2", tmp_path / "q2", transformers_tokenizer_dir)
    for folder in (hf, q2):
        capsys.readouterr()  # save_pretrained's progress bars
        assert cli(["convert", "model", str(folder), "-o", str(tmp_path / "x.gguf")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(folder) in err[0] and "pre-tokenizer" in err[0], err
        assert not (tmp_path / "x.gguf").exists()


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch
    from toolkit.convert.model import convert_model
    import transformers, tokenizers  # imported before the baseline: their size is not the conversion's
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    convert_model(sys.argv[1], sys.argv[2], "f16", progress=False)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
""")


def test_conversion_streams_tensor_by_tensor(tokenizer_dir, tmp_path):
    """A ~420 MB f32 model whose largest tensor is 25 MB converts with peak RSS growth under 160 MB (the
    vocabulary, one tensor and its f16 copy), i.e. well under the model's size: nothing holds the whole model."""
    hf = tmp_path / "big"
    hf.mkdir()
    tiny = tiny_hf("llama", hf, tokenizer_dir, num_hidden_layers=32, hidden_size=128, intermediate_size=16384,
                   num_attention_heads=4, num_key_value_heads=4)
    size = (tiny / "model.safetensors").stat().st_size
    assert size > 400e6
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(hf), str(tmp_path / "big.gguf")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    grew = int(r.stdout.strip().splitlines()[-1])
    assert grew < 160e6 and grew < size / 2.5, (grew, size)
    assert open_gguf(tmp_path / "big.gguf").tensors["blk.31.ffn_up.weight"].qtype == Q.F16


def test_pickle_checkpoints_are_refused(tmp_path, capsys):
    from toolkit.cli import main as cli

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02not really")
    assert cli(["convert", "model", str(d), "-o", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pickle" in err[0] and "pytorch_model.bin" in err[0]
    assert not (tmp_path / "x.gguf").exists()


def test_hf_to_iq4_gguf_is_libggml_bytes_and_imatrix_types_are_refused(tokenizer_dir, tmp_path, capsys):
    """--outtype iq4_xs: 2-D weights whose rows do not split into 256-blocks fall back to IQ4_NL (llama.cpp's
    rule), their bytes are ggml_quantize_chunk's of the HF weight; a type that needs an importance matrix is one
    line before anything is written."""
    from oracle_ggml import available, ggml_quantize
    from safetensors.numpy import load_file

    from toolkit.cli import main as cli

    if not available():
        pytest.skip("llama-cpp-python's libggml not available")
    hf = tiny_hf("llama", tmp_path / "hf", tokenizer_dir, seed=5)
    convert_model(hf, tmp_path / "m.gguf", "iq4_xs", progress=False)
    g = open_gguf(tmp_path / "m.gguf")
    w = load_file(hf / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    t = g.tensors["blk.0.ffn_down.weight"]
    assert t.qtype == Q.IQ4_NL and w.shape[-1] % 256  # the fallback taken
    assert t.raw().numpy().tobytes() == ggml_quantize(w.astype(np.float32), Q.IQ4_NL)
    assert g.metadata["general.file_type"] == 25  # LLAMA_FTYPE_MOSTLY_IQ4_NL: the most common weight type

    capsys.readouterr()
    assert cli(["convert", "model", str(hf), "-o", str(tmp_path / "x.gguf"), "--outtype", "iq2_xxs"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "IQ2_XXS needs an importance matrix" in err[0], err
    assert not (tmp_path / "x.gguf").exists()
