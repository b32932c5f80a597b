"""The real model (SmolLM2-135M: Q4_1 linears, Q8_0 tied embeddings) with a PEFT adapter made by PEFT itself on
transformers' dequantized copy of the same GGUF (transformers' GGUF loader alone takes ~60 s: its own file)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from toolkit.model import load

TOKENS = [1, 504, 3458, 314, 253, 1345, 28, 30, 2107, 17, 9, 1300, 80, 442, 7, 99]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_smollm2_peft_dir_gives_peft_logits(smollm2_path, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    p = Path(smollm2_path)
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=ALL, rank_pattern={"o_proj": 4},
                     alpha_pattern={"up_proj": 4}, init_lora_weights=False)  # lm_head on tied embeddings too
    pm = get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(0)
    for n, prm in pm.named_parameters():
        if "lora_" in n:
            prm.data = torch.randn(prm.shape, generator=g) * 0.02  # random non-zero A and B
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        want = pm(torch.tensor([TOKENS])).logits[0]
        with pm.disable_adapter():
            want_base = pm(torch.tensor([TOKENS])).logits[0]
    del pm, hf
    model, _ = load(p, device="cpu", weights="float")
    with torch.no_grad():
        base = model(torch.tensor([TOKENS]))[0]
        model.load_adapter(tmp_path / "peft")
        got = model(torch.tensor([TOKENS]))[0]
    assert rel(got, want) < 1e-4  # the bound
    assert rel(got - base, want - want_base) < 1e-3  # the adapter's own effect (base rounding counts here)
