"""PEFT adapters on every supported architecture, end to end: PEFT trains on the Hugging Face model, the model goes
to GGUF (`toolkit convert model`), and toolkit runs the GGUF with the PEFT folder (names, phi3's fused qkv/gate_up,
gemma norms, qwen biases in the base, llama's q/k permutation) and with its GGUF conversion in llama.cpp."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import oracle_llama
import pytest
import torch

from tiny import make_tiny_hf

from toolkit.adapter import BaseInfo, read_adapter, write_gguf_adapter
from toolkit.gguf_io import open_gguf
from toolkit.model import load

TOKS = list(range(1000, 1024))
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer_dir(smollm2_path, tmp_path_factory) -> Path:
    from toolkit.convert.model import save_hf_tokenizer

    d = tmp_path_factory.mktemp("tok")
    save_hf_tokenizer(open_gguf(smollm2_path), d)
    return d


def tiny_hf(arch: str, folder: Path, tokenizer_dir: Path):
    return make_tiny_hf(arch, folder, tokenizer_dir, tied=arch.startswith("gemma"))


def cos(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_peft_adapter_on_converted_model(arch, tokenizer_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from toolkit.convert.model import convert_model

    hf_dir = tmp_path / "hf"
    hf = tiny_hf(arch, hf_dir, tokenizer_dir)
    with torch.no_grad():
        hf_base = hf(torch.tensor([TOKS])).logits[0]
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS.get(arch, DEFAULT),
                                       rank_pattern={"down_proj": 8}, init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        want = pm(torch.tensor([TOKS])).logits[0]
    gguf_path = tmp_path / "m.gguf"
    convert_model(hf_dir, gguf_path, "f32", progress=False)
    model, _ = load(gguf_path, device="cpu", weights="float")
    with torch.no_grad():
        base = model(torch.tensor([TOKS]))[0]
        model.load_adapter(tmp_path / "peft")
        got = model(torch.tensor([TOKS]))[0]
    d_got, d_want = (got - base), (want - hf_base)
    assert float((d_got - d_want).norm() / d_want.norm()) < 1e-3, arch  # the adapter's effect, as PEFT's
    assert float((got - want).norm() / want.norm()) < 1e-3
    if oracle_llama.available():  # and its GGUF form in llama.cpp moves logits the same way
        info = BaseInfo.of(gguf_path)
        write_gguf_adapter(read_adapter(tmp_path / "peft", base=info), tmp_path / "a.gguf", base=info)
        lb = oracle_llama.llama_logits(gguf_path, TOKS)
        la = oracle_llama.llama_logits(gguf_path, TOKS, adapters=[(str(tmp_path / "a.gguf"), 1.0)])
        assert cos(la - lb, d_want.numpy()) >= 0.99
