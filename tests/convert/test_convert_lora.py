"""`toolkit convert lora`: PEFT <-> GGUF round trips (adapters made by PEFT itself), HF-folder bases, old GGLA in,
refusals that write nothing. llama.cpp loading converted files is checked here and in tests/core/test_lora.py."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import oracle_llama
import pytest
import torch
from tiny import make_tiny_gguf
from toolkit.convert.lora import convert_lora

from toolkit.cli import main as toolkit_main

needs_llama = pytest.mark.skipif(not oracle_llama.available(), reason="llama-cpp-python not installed")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 77, 200, 3, 9, 140, 31]])


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    """A small random Llama in a Hugging Face folder (config.json + model.safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("hf") / "base"
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    return d


def make_peft(base_dir: Path, out: Path, seed: int = 0, **cfg):
    """An adapter made by PEFT on the HF base; random non-zero A and B. Returns (peft model, dir)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)), LoraConfig(init_lora_weights=False, **cfg))
    g = torch.Generator().manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    pm.save_pretrained(str(out))
    return pm.eval(), out


def peft_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)).eval()
    with torch.no_grad():
        return pm(IDS).logits


def st(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def cfg(d: Path) -> dict:
    return json.loads((d / "adapter_config.json").read_text())


EXACT = {
    "plain": {"r": 8, "lora_alpha": 16, "target_modules": ALL},
    "rank_pattern": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"],
                         "rank_pattern": {"model.layers.1.self_attn.k_proj": 8, "down_proj": 2}},
    "rslora": {"r": 4, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
}


@pytest.mark.parametrize("variant", list(EXACT))
def test_peft_gguf_peft_is_bit_exact(hf_base, tmp_path, variant):
    pm, src = make_peft(hf_base, tmp_path / "src", **EXACT[variant])
    assert toolkit_main(["convert", "lora", str(src), "-o", str(tmp_path / "a.gguf"), "--base", str(hf_base)]) == 0
    assert toolkit_main(["convert", "lora", str(tmp_path / "a.gguf"), "-o", str(tmp_path / "back"),
                         "--base", str(hf_base)]) == 0
    a, b = st(src), st(tmp_path / "back")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # q/k permuted and back, bit for bit
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules",
                "base_model_name_or_path"):
        assert cfg(src).get(key) == cfg(tmp_path / "back").get(key), key
    with torch.no_grad():
        assert torch.equal(peft_logits(hf_base, tmp_path / "back"), pm(IDS).logits)


def test_alpha_pattern_folds_into_b_and_keeps_peft_s_delta(hf_base, tmp_path):
    """GGUF has one alpha: alpha_pattern/rsLoRA with mixed ranks are folded into B; PEFT's output is kept."""
    pm, src = make_peft(hf_base, tmp_path / "src", r=4, lora_alpha=8, target_modules=ALL,
                        rank_pattern={"o_proj": 8}, alpha_pattern={"v_proj": 3, "model.layers.0.mlp.up_proj": 20},
                        use_rslora=False)
    convert_lora(src, tmp_path / "a.gguf", base=hf_base)
    convert_lora(tmp_path / "a.gguf", tmp_path / "back", base=hf_base)
    with torch.no_grad():
        want = pm(IDS).logits
    got = peft_logits(hf_base, tmp_path / "back")
    assert float((got - want).norm() / want.norm()) < 1e-6
    assert cfg(tmp_path / "back")["alpha_pattern"] == {}  # folded: one alpha describes every tensor


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_gguf_peft_gguf_is_bit_exact(hf_base, tmp_path, outtype):
    _, src = make_peft(hf_base, tmp_path / "src", r=4, lora_alpha=8, target_modules=ALL,
                       rank_pattern={"down_proj": 2})
    first, again = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert_lora(src, first, base=hf_base, outtype=outtype)
    convert_lora(first, tmp_path / "peft", base=hf_base)
    convert_lora(tmp_path / "peft", again, base=hf_base, outtype=outtype)
    r1, r2 = gguf.GGUFReader(first), gguf.GGUFReader(again)
    t1 = {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in r1.tensors}
    t2 = {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in r2.tensors}
    assert t1 == t2
    f1 = {k: (v.types, [bytes(p.tobytes()) for p in v.parts]) for k, v in r1.fields.items()}
    f2 = {k: (v.types, [bytes(p.tobytes()) for p in v.parts]) for k, v in r2.fields.items()}
    assert f1 == f2  # metadata too, byte for byte


def test_refusals_write_nothing(hf_base, tmp_path, capsys):
    _, src = make_peft(hf_base, tmp_path / "src", r=4, lora_alpha=8, target_modules=["q_proj"])
    c = cfg(src)
    c["use_dora"] = True
    (src / "adapter_config.json").write_text(json.dumps(c))
    out = tmp_path / "out.gguf"
    capsys.readouterr()  # transformers' loading bar
    assert toolkit_main(["convert", "lora", str(src), "-o", str(out), "--base", str(hf_base)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("toolkit: error: ") and "DoRA" in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))
    c["use_dora"] = False
    (src / "adapter_config.json").write_text(json.dumps(c))
    assert toolkit_main(["convert", "lora", str(src), "-o", str(out)]) == 1  # no base: no architecture
    assert "needs the base model" in capsys.readouterr().err
    assert toolkit_main(["convert", "lora", str(src), "-o", str(tmp_path / "p"), "--base", str(hf_base),
                         "--outtype", "f16"]) == 1
    assert "--outtype applies to GGUF output only" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_lm_head_on_tied_base_refused_for_gguf(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = tmp_path / "tied"
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, tie_word_embeddings=True)).save_pretrained(str(base))
    _, src = make_peft(base, tmp_path / "src", r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    out = tmp_path / "x.gguf"
    capsys.readouterr()
    assert toolkit_main(["convert", "lora", str(src), "-o", str(out), "--base", str(base)]) == 1
    assert "llama.cpp has no output tensor" in capsys.readouterr().err and not out.exists()
    assert toolkit_main(["convert", "lora", str(src), "-o", str(tmp_path / "peft2"), "--base", str(base)]) == 0
    assert st(src).keys() >= st(tmp_path / "peft2").keys()  # PEFT -> PEFT keeps it


@needs_llama
def test_ggla_to_gguf_loads_in_llama_cpp(tmp_path):
    base = make_tiny_gguf(tmp_path / "tiny.gguf", tied=False)
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
    path = tmp_path / "ggml-adapter-model.bin"
    with open(path, "wb") as f:  # convert-lora-to-ggml.py's layout
        f.write(b"algg" + struct.pack("iii", 1, 4, 8))
        for name, t in (("blk.0.attn_q.weight.loraA", A.T.contiguous().numpy()), ("blk.0.attn_q.weight.loraB", B.numpy())):
            f.write(struct.pack("iii", 2, len(name), 0) + struct.pack("ii", *t.shape[::-1]) + name.encode())
            f.seek((f.tell() + 31) & -32)
            t.astype(np.float32).tofile(f)
    assert toolkit_main(["convert", "lora", str(path), "-o", str(tmp_path / "a.gguf"), "--base", str(base)]) == 0
    toks = [1, 2, 3, 4, 5, 6]
    d = oracle_llama.llama_logits(base, toks, [(str(tmp_path / "a.gguf"), 1.0)]) - oracle_llama.llama_logits(base, toks)
    assert np.abs(d).max() > 1e-3  # llama.cpp loads it and it acts
    from toolkit.model import load

    model, _ = load(base, device="cpu", weights="float")
    with torch.no_grad():
        b0 = model(torch.tensor([toks]))[0].numpy()
        model.load_adapter(path)  # the GGLA file itself, as old llama.cpp applied it
        d2 = model(torch.tensor([toks]))[0].numpy() - b0
    c = float((d.ravel() @ d2.ravel()) / np.linalg.norm(d) / np.linalg.norm(d2))
    assert c >= 0.99


def test_gguf_metadata_survives_peft(hf_base, tmp_path):
    """A GGUF adapter's own keys (general.name, ...) ride along in the PEFT safetensors header and come back."""
    from toolkit.adapter import read_adapter, write_gguf_adapter
    from toolkit.gguf_io import infer_value

    _, src = make_peft(hf_base, tmp_path / "src", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    ad = read_adapter(src, base=hf_base)
    ad.extra["metadata"] = {"general.name": infer_value("my adapter"), "general.basename": infer_value("mine"),
                            "general.size_label": infer_value("F32"), "training.steps": infer_value(120)}
    first = tmp_path / "a.gguf"
    write_gguf_adapter(ad, first)
    convert_lora(first, tmp_path / "peft", base=hf_base)
    convert_lora(tmp_path / "peft", tmp_path / "b.gguf", base=hf_base)
    f1 = {k: (v.types, [bytes(p.tobytes()) for p in v.parts]) for k, v in gguf.GGUFReader(first).fields.items()}
    f2 = {k: (v.types, [bytes(p.tobytes()) for p in v.parts]) for k, v in gguf.GGUFReader(tmp_path / "b.gguf").fields.items()}
    assert f1 == f2 and "general.name" in f1
