"""DoRA (PEFT use_dora=True), which llama.cpp's converter refuses: unmerged in toolkit's model against PEFT on
transformers (the same GGUF through transformers' GGUF loader), merged by export-lora and run by llama.cpp
against PEFT's own merge_and_unload, and refused with one line by the GGUF adapter writer."""
from __future__ import annotations

import copy

import numpy as np
import oracle_hf
import oracle_llama
import pytest
import torch
from tiny import make_tiny_gguf

from toolkit.adapter import read_adapter
from toolkit.cli import main as cli
from toolkit.convert.export_lora import export_lora
from toolkit.gguf_io import open_gguf
from toolkit.model import load

needs_llama = pytest.mark.skipif(not oracle_llama.available(), reason="llama-cpp-python not installed")
TOKENS = [1, 504, 3458, 314, 253, 1345, 28, 30, 2107, 17, 9, 1300, 80, 442, 7, 99]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).float(), torch.as_tensor(np.asarray(b)).float()
    return float((a - b).norm() / b.norm())


def ours(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].float()


@pytest.fixture(scope="module")
def dora(tmp_path_factory) -> dict:
    """A tiny untied llama GGUF (F32) and a DoRA adapter PEFT made on transformers' load of it: random A, B and
    magnitudes (so m / ||W + s B A|| is far from 1), a rank and an alpha pattern (scales folded into B)."""
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("dora")
    base = make_tiny_gguf(d / "base.gguf", tied=False, seed=3)
    hf = copy.deepcopy(oracle_hf.hf_model(str(base)))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, use_dora=True, init_lora_weights=False,
                     rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3})
    pm = get_peft_model(hf, cfg).eval()
    g = torch.Generator().manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
        elif "lora_magnitude_vector" in n:
            p.data = p.data * (1 + 0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(d / "peft"))
    with torch.no_grad():
        unmerged = pm(torch.tensor([TOKENS])).logits[0].float()
        merged_model = pm.merge_and_unload()
        merged = merged_model(torch.tensor([TOKENS])).logits[0].float()
    return {"base": base, "peft": d / "peft", "logits": unmerged, "merged_logits": merged, "dir": d}


def test_reader_keeps_magnitudes_in_gguf_row_order(dora):
    from toolkit import names as N

    ad = read_adapter(dora["peft"], base=dora["base"])
    assert ad.is_dora and all(p.magnitude is not None for p in ad.tensors.values())
    assert len(ad.tensors) == 2 * len(ALL)
    from safetensors.torch import load_file

    st = load_file(str(dora["peft"] / "adapter_model.safetensors"))
    m_hf = st["base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"]
    m = ad.tensors["blk.1.attn_q.weight"].magnitude  # rows permuted like llama.cpp's q (4 heads)
    heads = N.qk_heads("blk.1.attn_q.weight", 4, 2)
    assert torch.equal(m, N.permute_rows(m_hf.reshape(-1, 1), heads).reshape(-1))
    assert not torch.equal(m, m_hf)


def test_unmerged_matches_peft(dora):
    """Exact float weights: the same float32 arithmetic up to summation order; PEFT adapters reach ~1e-7."""
    model, _ = load(dora["base"], device="cpu", weights="float")
    base = ours(model)
    name = model.load_adapter(dora["peft"])
    got = ours(model)
    print(f"unmerged vs PEFT rel {rel(got, dora['logits']):.2e}")
    assert rel(got, dora["logits"]) < 1e-4, rel(got, dora["logits"])
    assert rel(got, base) > 0.05  # the adapter moves the logits a lot, so the check above means something
    model.set_adapters({name: 0.0})
    assert torch.equal(ours(model), base)  # scale 0: the base bit for bit (DoRA's row scale off too)
    model.set_adapters({name: 1.0})
    assert torch.equal(ours(model), got)


def test_unmerged_on_packed_quant_base(dora, tmp_path):
    """The CPU kernel path (stacked q/k/v and gate/up bases, each member adding its own DoRA terms) agrees with
    exact float weights on a Q8_0 base; the kernels round activations to bfloat16 (2^-8), hence 2e-2."""
    q8 = make_tiny_gguf(tmp_path / "q8.gguf", tied=False, seed=3, qtype="Q8_0")
    exact, _ = load(q8, device="cpu", weights="float", adapters=[(str(dora["peft"]), 1.0)])
    packed, _ = load(q8, device="cpu", weights="packed", adapters=[(str(dora["peft"]), 1.0)])
    print(f"packed vs float rel {rel(ours(packed), ours(exact)):.2e}")
    assert rel(ours(packed), ours(exact)) < 2e-2


@needs_llama
def test_export_lora_merges_for_llama_cpp(dora):
    """F32 merge run by llama.cpp against PEFT's merge_and_unload (5e-3: llama.cpp's own float32 kernels against
    torch's, as in the model tests); --lora-scaled 0.5 merged equals toolkit's unmerged at scale 0.5."""
    out = dora["dir"] / "merged-f32.gguf"
    export_lora(dora["base"], out, [(str(dora["peft"]), 1.0)], outtype="f32", progress=False)
    llama = oracle_llama.llama_logits(out, TOKENS)
    print(f"f32: llama.cpp vs PEFT merged rel {rel(llama, dora['merged_logits']):.2e}")
    assert rel(llama, dora["merged_logits"]) < 5e-3, rel(llama, dora["merged_logits"])
    half = dora["dir"] / "merged-half.gguf"
    export_lora(dora["base"], half, [(str(dora["peft"]), 0.5)], outtype="f32", progress=False)
    model, _ = load(dora["base"], device="cpu", weights="float", adapters=[(str(dora["peft"]), 0.5)])
    unmerged_half = ours(model)
    assert rel(oracle_llama.llama_logits(half, TOKENS), unmerged_half) < 5e-3
    assert rel(unmerged_half, dora["logits"]) > 0.02  # half is not the full adapter


@needs_llama
def test_export_lora_keep_requantizes(dora, tmp_path):
    """--outtype keep on a Q8_0 base: every tensor keeps its type; llama.cpp runs it and follows PEFT's merged
    model on the dequantized base, within twice what the base alone differs by between the two."""
    q8 = make_tiny_gguf(tmp_path / "q8.gguf", tied=False, seed=3, qtype="Q8_0")
    out = tmp_path / "merged-keep.gguf"
    export_lora(q8, out, [(str(dora["peft"]), 1.0)], outtype="keep", progress=False)
    g, base = open_gguf(out), open_gguf(q8)
    assert {n: t.qtype for n, t in g.tensors.items()} == {n: t.qtype for n, t in base.tensors.items()}
    llama = oracle_llama.llama_logits(out, TOKENS)
    # the oracle: PEFT's merge on transformers' load of this Q8_0 base (same adapter, m applies to its weights)
    from peft import PeftModel

    hf = copy.deepcopy(oracle_hf.hf_model(str(q8)))
    with torch.no_grad():
        want = PeftModel.from_pretrained(hf, str(dora["peft"])).merge_and_unload()(torch.tensor([TOKENS])).logits[0]
        base_hf = oracle_hf.hf_model(str(q8))(torch.tensor([TOKENS])).logits[0]
    # the floor: llama.cpp and transformers on the unmerged Q8_0 base already differ (Q8 activations in ggml's
    # dot products); requantizing the merged weights may add about as much again
    floor = rel(oracle_llama.llama_logits(q8, TOKENS), base_hf)
    print(f"keep: llama.cpp vs PEFT merged rel {rel(llama, want):.2e} (base alone {floor:.2e})")
    assert rel(llama, want) < 2 * floor + 5e-3, (rel(llama, want), floor)
    assert rel(llama, want) < 0.1 * rel(base_hf, want)  # far closer to the merged model than the base is


def test_convert_to_gguf_adapter_refuses_in_one_line(dora, tmp_path, capsys):
    rc = cli(["convert", "lora", str(dora["peft"]), "-o", str(tmp_path / "a.gguf"), "--base", str(dora["base"])])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and not (tmp_path / "a.gguf").exists()
    assert "llama.cpp cannot apply a DoRA adapter unmerged" in err and "toolkit export-lora" in err


def test_peft_round_trip_from_the_model(dora, tmp_path):
    """export_adapter -> write_peft_adapter keeps use_dora and the magnitudes in HF row order: PEFT loads it and
    computes the same logits (1e-4 as above)."""
    from peft import PeftModel

    from toolkit.adapter import write_peft_adapter

    model, _ = load(dora["base"], device="cpu", weights="float", adapters=[(str(dora["peft"]), 1.0)])
    name = next(iter(model.adapters))
    write_peft_adapter(model.export_adapter(name), tmp_path / "rt", base=model.gguf)
    hf = copy.deepcopy(oracle_hf.hf_model(str(dora["base"])))
    with torch.no_grad():
        ref = PeftModel.from_pretrained(hf, str(tmp_path / "rt")).eval()(torch.tensor([TOKENS])).logits[0]
    assert rel(ref, dora["logits"]) < 1e-4
