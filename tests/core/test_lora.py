"""Unmerged LoRA on the model: against PEFT (same GGUF loaded by transformers, adapters made by PEFT itself) and
against llama.cpp (llama-cpp-python with the same GGUF adapters and scales); scale 0 is the base bit for bit."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import oracle_llama
import pytest
import torch
from tiny import make_tiny_gguf, random_lora
from torch import nn

from toolkit.adapter import (
    Adapter,
    BaseInfo,
    read_adapter,
    write_gguf_adapter,
    write_peft_adapter,
)
from toolkit.errors import ToolkitError
from toolkit.lora import LoRAEmbedding, LoRALinear
from toolkit.model import load

needs_llama = pytest.mark.skipif(not oracle_llama.available(), reason="llama-cpp-python not installed")
TOKENS = [1, 504, 3458, 314, 253, 1345, 28, 30, 2107, 17, 9, 1300, 80, 442, 7, 99]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lora")
    return {"tied": make_tiny_gguf(d / "tied.gguf", tied=True), "untied": make_tiny_gguf(d / "untied.gguf", tied=False)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].float()


# --- the layers --------------------------------------------------------------------------------------------

def test_lora_linear_on_linear_and_quant_base():
    from toolkit.qlinear import QuantLinear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(2, 3, 64, generator=g)
    A1, B1 = torch.randn(4, 64, generator=g), torch.randn(48, 4, generator=g)
    A2, B2 = torch.randn(8, 64, generator=g), torch.randn(48, 8, generator=g)
    for base in (nn.Linear(64, 48, bias=False), QuantLinear.from_float(w, "Q8_0")):
        if isinstance(base, nn.Linear):
            base.weight.data = w.clone()
        ref = base(x)
        storage = (base.weight if isinstance(base, nn.Linear) else base.qweight).data_ptr()
        m = LoRALinear(base)
        m.add("one", A1, B1, scale=0.5)
        m.add("two", A2, B2, scale=2.0, user_scale=0.25)
        want = ref + 0.5 * (x @ A1.T) @ B1.T + 0.5 * (x @ A2.T) @ B2.T
        assert torch.allclose(m(x), want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # the inference path (fused addmm) computes the same
            assert torch.allclose(m(x), want, rtol=1e-5, atol=1e-5)
        assert (m.base.weight if isinstance(base, nn.Linear) else m.base.qweight).data_ptr() == storage  # no copy
        wf = w if isinstance(base, nn.Linear) else base.weight_float()
        assert torch.allclose(m.merged_weight(), wf + 0.5 * B1 @ A1 + 0.5 * B2 @ A2, atol=1e-5)
        m.set_scale("one", 0.0)
        m.set_scale("two", 0.0)
        assert torch.equal(m(x), ref) and len(m._active) == 0  # scale 0: skipped, base bit for bit
        m.remove("one")
        assert m.names == ["two"]


def test_lora_embedding_matches_peft_embedding_layer():
    from peft import LoraConfig, get_peft_model

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 16)

        def forward(self, ids):
            return self.emb(ids)

    torch.manual_seed(0)
    m = M()
    pm = get_peft_model(M(), LoraConfig(r=4, lora_alpha=12, target_modules=["emb"], init_lora_weights=False))
    pm.base_model.model.emb.base_layer.weight.data = m.emb.weight.data.clone()
    A = pm.base_model.model.emb.lora_embedding_A["default"]  # [r, n_vocab]
    B = pm.base_model.model.emb.lora_embedding_B["default"]  # [n_embd, r]
    B.data = torch.randn_like(B)
    ids = torch.tensor([[3, 99, 0, 42, 42]])
    lm = LoRAEmbedding(m.emb)
    lm.add("x", A.data, B.data, scale=12 / 4)
    with torch.no_grad():
        assert torch.allclose(lm(ids), pm(ids), rtol=1e-6, atol=1e-6)
        assert torch.allclose(lm.merged_weight(), m.emb.weight + 3 * (B @ A).T, atol=1e-6)


# --- against PEFT on transformers -------------------------------------------------------------------------

_HF: dict[str, nn.Module] = {}


def hf_model(gguf_path: Path):
    """transformers' own GGUF loader (dequantizes, undoes llama.cpp's q/k permutation): a fresh copy each call.
    Loading parses the 49k-token vocabulary with gguf-py (~30 s), so each file is loaded once."""
    import copy

    from transformers import AutoModelForCausalLM

    key = str(gguf_path)
    if key not in _HF:
        _HF[key] = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                        dtype=torch.float32).eval()
    return copy.deepcopy(_HF[key])


def peft_adapter(gguf_path: Path, out: Path, seed: int = 0, std: float = 0.05, **cfg) -> tuple[torch.Tensor, Path]:
    """PEFT itself builds the adapter on the transformers model of this GGUF; random non-zero A and B.
    Returns (PEFT logits on TOKENS, adapter dir)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(hf_model(gguf_path), LoraConfig(init_lora_weights=False, **cfg))
    g = torch.Generator().manual_seed(seed)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * std
    pm.save_pretrained(str(out))
    with torch.no_grad():
        return pm(torch.tensor([TOKENS])).logits[0].float(), out


VARIANTS = {
    "plain": {"r": 8, "lora_alpha": 16, "target_modules": ALL},
    "patterns": {"r": 4, "lora_alpha": 8, "target_modules": ALL + ["embed_tokens", "lm_head"],
                     "rank_pattern": {"model.layers.1.self_attn.q_proj": 8, "down_proj": 2},
                     "alpha_pattern": {"v_proj": 3, "model.layers.0.mlp.up_proj": 20}},
    "rslora": {"r": 4, "lora_alpha": 6, "target_modules": ["q_proj", "k_proj", "lm_head"], "use_rslora": True,
                   "rank_pattern": {"k_proj": 8}},
}


@pytest.mark.parametrize("kind,variant", [("untied", "plain"), ("untied", "patterns"), ("untied", "rslora"),
                                          ("tied", "patterns")])
def test_peft_dir_gives_peft_logits(tiny, tmp_path, kind, variant):
    want, d = peft_adapter(tiny[kind], tmp_path / "peft", **VARIANTS[variant])
    model, _ = load(tiny[kind], device="cpu", weights="float")
    base = logits(model)
    model.load_adapter(d)
    got = logits(model)
    assert rel(got, want) < 1e-4  # the bound; observed ~1e-7
    assert rel(got - base, want - base) < 1e-4  # the adapter's own effect, not just the base


# --- against llama.cpp -------------------------------------------------------------------------------------

def random_adapter(info: BaseInfo, names: list[str], r: int, alpha: float, seed: int, std: float = 0.05) -> Adapter:
    return Adapter(random_lora({n: info.shapes[n] for n in names}, r, seed, std), alpha, info.arch)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def check_like_llama(model_path: Path, files: list[tuple[Path, float]], tokens=TOKENS) -> None:
    model, _ = load(model_path, device="cpu", weights="float")
    base = logits(model, tokens).numpy()
    names = [model.load_adapter(f, scale=s) for f, s in files]
    got = logits(model, tokens).numpy()
    ref_base = oracle_llama.llama_logits(model_path, tokens)
    ref = oracle_llama.llama_logits(model_path, tokens, adapters=[(str(f), s) for f, s in files])
    c = cos(got - base, ref - ref_base)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    assert c >= 0.99, c
    assert top1 >= 0.95, top1
    model.set_adapters({names[0]: files[0][1]})  # the first alone moves logits as llama.cpp's first alone
    one = logits(model, tokens).numpy()
    ref_one = oracle_llama.llama_logits(model_path, tokens, adapters=[(str(files[0][0]), files[0][1])])
    assert cos(one - base, ref_one - ref_base) >= 0.99


@needs_llama
def test_two_gguf_adapters_like_llama_cpp_tiny(tiny, tmp_path):
    """Every linear, token_embd and output (untied base), two adapters at two scales."""
    info = BaseInfo.of(tiny["untied"])
    lin = [n for n, s in info.shapes.items() if len(s) == 2]
    a1 = random_adapter(info, lin, r=4, alpha=8, seed=1)
    a2 = random_adapter(info, [n for n in lin if "ffn" in n or "attn_v" in n], r=8, alpha=0, seed=2, std=0.03)
    write_gguf_adapter(a1, tmp_path / "a1.gguf", base=info)
    write_gguf_adapter(a2, tmp_path / "a2.gguf", base=info, outtype="f16")
    check_like_llama(tiny["untied"], [(tmp_path / "a1.gguf", 0.8), (tmp_path / "a2.gguf", -1.5)])


@needs_llama
def test_two_gguf_adapters_like_llama_cpp_smollm2(smollm2_path, tmp_path):
    info = BaseInfo.of(smollm2_path)
    lin = [n for n, s in info.shapes.items() if len(s) == 2 and n.startswith("blk.")]
    # llama.cpp rounds activations to Q8_1 for its Q4_1 matmuls, so its base logits differ from ours by ~3%
    # (relative norm); the adapters must move logits well beyond that for the deltas to be comparable
    a1 = random_adapter(info, lin, r=16, alpha=32, seed=1, std=0.05)
    a2 = random_adapter(info, [n for n in lin if "attn_q" in n or "ffn_up" in n], r=4, alpha=4, seed=2, std=0.1)
    write_gguf_adapter(a1, tmp_path / "a1.gguf", base=info)
    write_gguf_adapter(a2, tmp_path / "a2.gguf", base=info, outtype="q8_0")
    text = ("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers that changed "
            "physics: the photoelectric effect, Brownian motion, special relativity and the equivalence of mass and "
            "energy. Each of them")
    tokens = oracle_llama.llama_tokenize(smollm2_path, text)  # 48 tokens; base top-1 agreement is 46/48 already
    check_like_llama(Path(smollm2_path), [(tmp_path / "a1.gguf", 1.0), (tmp_path / "a2.gguf", 0.5)], tokens)


@needs_llama
def test_converted_peft_adapter_in_llama_cpp_moves_logits_like_peft(tiny, tmp_path):
    """PEFT -> GGUF (alpha_pattern and rsLoRA folded into B) -> llama.cpp agrees with PEFT's own delta."""
    want, d = peft_adapter(tiny["untied"], tmp_path / "peft", **VARIANTS["patterns"])
    info = BaseInfo.of(tiny["untied"])
    write_gguf_adapter(read_adapter(d, base=info), tmp_path / "c.gguf", base=info)
    hf_base = oracle_llama.llama_logits(tiny["untied"], TOKENS)
    ref = oracle_llama.llama_logits(tiny["untied"], TOKENS, adapters=[(str(tmp_path / "c.gguf"), 1.0)])
    with torch.no_grad():
        peft_base = hf_model(tiny["untied"])(torch.tensor([TOKENS])).logits[0].numpy()
    assert cos(ref - hf_base, want.numpy() - peft_base) >= 0.99


# --- switching, merging, training -------------------------------------------------------------------------

def test_set_adapters_is_fast_and_exact(tiny, tmp_path):
    info = BaseInfo.of(tiny["untied"])
    lin = [n for n, s in info.shapes.items() if len(s) == 2]
    for i in range(2):
        write_gguf_adapter(random_adapter(info, lin, 4, 8, seed=i), tmp_path / f"a{i}.gguf", base=info)
    model, _ = load(tiny["untied"], device="cpu", weights="float")
    base = logits(model)
    a = model.load_adapter(tmp_path / "a0.gguf")
    b = model.load_adapter(tmp_path / "a1.gguf", name="b", scale=0.0)
    assert b == "b" and model.adapters["b"].scale == 0.0 and model.adapters[a].ranks["blk.0.attn_q.weight"] == 4
    only_a = logits(model)
    assert not torch.equal(only_a, base)
    t0 = time.perf_counter()
    model.set_adapters({"b": 0.5})
    dt = time.perf_counter() - t0
    assert dt < 0.05, dt  # floats only, no base reload
    only_b = logits(model)
    model.set_adapters({a: 1.0})
    assert torch.equal(logits(model), only_a)
    model.set_adapters({})
    assert torch.equal(logits(model), base)  # bit for bit
    model.set_adapters({a: 0.0, "b": 0.0})
    assert torch.equal(logits(model), base)
    model.set_adapters({a: 1.0, "b": 0.5})
    both = logits(model)
    assert rel(both - base, (only_a - base) + (only_b - base)) < 0.5  # not linear in logits, but both act
    model.unload_adapter(a)
    assert torch.equal(logits(model), only_b)
    with pytest.raises(ToolkitError, match="no adapter named 'zz'"):
        model.set_adapters({"zz": 1.0})


def test_merged_weights_give_the_unmerged_logits(tiny, tmp_path):
    info = BaseInfo.of(tiny["untied"])
    lin = [n for n, s in info.shapes.items() if len(s) == 2]
    write_gguf_adapter(random_adapter(info, lin, 4, 8, seed=5), tmp_path / "a.gguf", base=info)
    model, _ = load(tiny["untied"], device="cpu", weights="float")
    model.load_adapter(tmp_path / "a.gguf", scale=0.7)
    unmerged = logits(model)
    for name, mod in model.lora_targets().items():  # fold each adapter into a plain weight
        parent, _, attr = name[:-7].rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        w = mod.merged_weight()
        if isinstance(mod, LoRAEmbedding):
            new = nn.Embedding(*w.shape)
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias=False)
        new.weight = nn.Parameter(w, requires_grad=False)
        setattr(owner, attr, new)
    assert rel(logits(model), unmerged) < 1e-5


def test_trainable_adapter_inits_like_peft_and_exports_to_peft(tiny, tmp_path):
    model, _ = load(tiny["tied"], device="cpu", weights="float")
    base = logits(model)
    ranks = {f"blk.{i}.{m}.weight": 4 for i in range(2) for m in ("attn_q", "attn_v", "ffn_down")}
    ranks["output.weight"] = 2
    params = model.add_trainable_adapter("t", ranks, alpha=8.0)
    assert len(params) == 2 * len(ranks) and all(p.requires_grad for p in params)
    assert torch.equal(logits(model), base)  # B = 0
    a = model.blk[0].attn_q.pair("t")[0]
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    model.train()
    loss = model(torch.tensor([TOKENS])).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in params[1::2])  # B gets gradients
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    ours = logits(model)
    out = tmp_path / "peft"
    write_peft_adapter(model.export_adapter("t"), out, base=model.gguf)
    from peft import PeftModel

    pm = PeftModel.from_pretrained(hf_model(tiny["tied"]), str(out)).eval()
    with torch.no_grad():
        ref = pm(torch.tensor([TOKENS])).logits[0]
    assert rel(ours, ref) < 1e-4


def test_norm_weights_apply_and_switch_off(tiny, tmp_path):
    info = BaseInfo.of(tiny["untied"])
    ad = random_adapter(info, ["blk.0.attn_q.weight"], 4, 8, seed=3)
    new_norm = torch.linspace(0.5, 1.5, 64)
    ad.norms["blk.1.ffn_norm.weight"] = new_norm
    write_gguf_adapter(ad, tmp_path / "n.gguf", base=info)
    model, _ = load(tiny["untied"], device="cpu", weights="float")
    original = model.blk[1].ffn_norm.weight
    base = logits(model)
    with pytest.warns(UserWarning):
        name = model.load_adapter(tmp_path / "n.gguf")
    assert torch.equal(model.blk[1].ffn_norm.weight, new_norm)  # the saved norm, as PEFT's modules_to_save
    model.set_adapters({name: 0.5})
    assert torch.allclose(model.blk[1].ffn_norm.weight, original + 0.5 * (new_norm - original))
    model.set_adapters({})
    assert model.blk[1].ffn_norm.weight is original and torch.equal(logits(model), base)
