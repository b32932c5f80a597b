"""Adapter formats: GGUF adapter (gguf-py and llama.cpp as oracles), GGLA, old finetune checkpoints, PEFT dirs;
every rejection llama.cpp makes, with its message (and llama.cpp rejecting the same file)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import oracle_llama
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tiny import make_tiny_gguf, random_lora

from toolkit import names as N
from toolkit.adapter import (
    Adapter,
    BaseInfo,
    read_adapter,
    write_gguf_adapter,
    write_peft_adapter,
)
from toolkit.errors import ToolkitError
from toolkit.gguf_io import TensorSpec, write_gguf

needs_llama = pytest.mark.skipif(not oracle_llama.available(), reason="llama-cpp-python not installed")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_gguf(tmp_path_factory.mktemp("base") / "untied.gguf", tied=False)


def random_adapter(info: BaseInfo, names: list[str], r: int = 4, alpha: float = 8.0, seed: int = 0) -> Adapter:
    return Adapter(random_lora({n: info.shapes[n] for n in names}, r, seed, 0.1), alpha, info.arch)


LINEARS = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.ffn_down.weight", "output.weight", "token_embd.weight"]


def write_raw(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    specs = [TensorSpec(n, Q.F32, tuple(t.shape), t.float().contiguous()) for n, t in tensors.items()]
    write_gguf(path, {"general.architecture": "llama", **meta}, specs)
    return path


def gguf_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The tensors as llama.cpp's file holds them (torch order): a (r, in), b (out, r); token_embd a (n_vocab, r)."""
    out = {}
    for n, p in adapter.tensors.items():
        out[n + ".lora_a"] = p.a.T if n == "token_embd.weight" else p.a
        out[n + ".lora_b"] = p.b
    return out


GOOD_META = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0}


# --- GGUF adapter ------------------------------------------------------------------------------------------

@needs_llama
def test_gguf_adapter_layout_matches_gguf_py_and_llama_cpp_loads_it(base, tmp_path):
    info = BaseInfo.of(base)
    ad = random_adapter(info, LINEARS)
    path = tmp_path / "a.gguf"
    write_gguf_adapter(ad, path, base=info)
    r = gguf.GGUFReader(path)
    f = {k: v for k, v in r.fields.items()}
    assert bytes(f["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(f["adapter.type"].parts[-1]).decode() == "lora"
    assert f["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]  # llama.cpp reads it with get_val_f32
    assert float(f["adapter.lora.alpha"].parts[-1][0]) == 8.0
    ne = {t.name: list(t.shape) for t in r.tensors}  # ggml order
    assert ne["blk.0.attn_q.weight.lora_a"] == [64, 4]  # [n_in, r]
    assert ne["blk.0.attn_k.weight.lora_b"] == [4, 32]  # [r, n_out]
    vocab = info.shapes["token_embd.weight"][0]
    assert ne["token_embd.weight.lora_a"] == [4, vocab]  # rows gathered by token
    assert ne["token_embd.weight.lora_b"] == [4, 64]
    back = read_adapter(path, base=info)
    for n, p in ad.tensors.items():
        assert torch.equal(back.tensors[n].a, p.a) and torch.equal(back.tensors[n].b, p.b)
        assert torch.allclose(back.delta(n), ad.delta(n))
    assert back.alpha == 8.0 and back.scale("blk.0.attn_q.weight") == 2.0
    oracle_llama._adapter(str(base), str(path))  # llama.cpp accepts it (raises otherwise)


@needs_llama
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_outtypes_are_gguf_py_values_and_load_in_llama_cpp(base, tmp_path, outtype):
    info = BaseInfo.of(base)
    ad = random_adapter(info, ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"], r=32 if outtype == "q8_0" else 4)
    path = tmp_path / f"a-{outtype}.gguf"
    write_gguf_adapter(ad, path, outtype=outtype, base=info)
    qt = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == qt
    back = read_adapter(path, base=info)
    for n, p in ad.tensors.items():
        for mine, ref in ((back.tensors[n].a, p.a), (back.tensors[n].b, p.b)):
            want = gguf.quants.dequantize(gguf.quants.quantize(ref.numpy(), qt), qt)  # gguf-py round trip
            assert np.array_equal(mine.numpy(), want.reshape(ref.shape))
    oracle_llama._adapter(str(base), str(path))


def test_q8_0_falls_back_to_f16_where_rows_do_not_fit(base, tmp_path):
    info = BaseInfo.of(base)
    ad = random_adapter(info, ["blk.0.attn_q.weight"], r=4)  # lora_b rows of 4 values: no Q8_0 block
    path = tmp_path / "a.gguf"
    write_gguf_adapter(ad, path, outtype="q8_0", base=info)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types == {"blk.0.attn_q.weight.lora_a": Q.Q8_0, "blk.0.attn_q.weight.lora_b": Q.F16}


def _mutations(info: BaseInfo):
    ad = random_adapter(info, ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"])
    t = gguf_tensors(ad)
    a_q, b_q = t["blk.0.attn_q.weight.lora_a"], t["blk.0.attn_q.weight.lora_b"]
    return {
        "general.type": ({**GOOD_META, "general.type": "model"}, t, "general.type is 'model', expected 'adapter'"),
        "adapter.type": ({**GOOD_META, "adapter.type": "prompt"}, t, "adapter.type is 'prompt', expected 'lora'"),
        "arch": ({**GOOD_META, "general.architecture": "qwen2"}, t,
                 "adapter is for architecture 'qwen2' but the base model is 'llama'"),
        "pair": (GOOD_META, {k: v for k, v in t.items() if k != "blk.1.ffn_down.weight.lora_b"},
                 "LoRA tensor pair for 'blk.1.ffn_down.weight' is missing one component (lora_b)"),
        "suffix": (GOOD_META, {**t, "blk.0.attn_q.weight.lora_c": a_q},
                   "LoRA tensor 'blk.0.attn_q.weight.lora_c' has unexpected suffix"),
        "missing": (GOOD_META, {**t, "blk.7.attn_q.weight.lora_a": a_q, "blk.7.attn_q.weight.lora_b": b_q},
                    "LoRA tensor 'blk.7.attn_q.weight' does not exist in base model (hint: maybe wrong base model?)"),
        "shape": (GOOD_META, {**t, "blk.0.attn_q.weight.lora_a": torch.randn(4, 32)},
                  "tensor 'blk.0.attn_q.weight' has incorrect shape (hint: maybe wrong base model?)"),
        "old_layout": (GOOD_META, {**t, "blk.1.ffn_down.weight.lora_a": torch.randn(128, 4)},
                       "this is the old finetune layout"),
    }


@needs_llama
@pytest.mark.parametrize("case", ["general.type", "adapter.type", "arch", "pair", "suffix", "missing", "shape",
                                  "old_layout"])
def test_rejects_what_llama_cpp_rejects(base, tmp_path, case):
    info = BaseInfo.of(base)
    meta, tensors, msg = _mutations(info)[case]
    meta = dict(meta)
    arch = meta.pop("general.architecture", "llama")
    specs = [TensorSpec(n, Q.F32, tuple(v.shape), v.float().contiguous()) for n, v in tensors.items()]
    path = tmp_path / f"{case}.gguf"
    write_gguf(path, {"general.architecture": arch, **meta}, specs)
    with pytest.raises(ToolkitError) as e:
        read_adapter(path, base=base)
    line = str(e.value)
    assert msg in line and "\n" not in line and str(path) in line
    with pytest.raises(RuntimeError):  # llama.cpp refuses the same file
        oracle_llama._adapter(str(base), str(path))


@needs_llama
def test_norm_tensors_are_kept_and_llama_cpp_skips_them(base, tmp_path):
    info = BaseInfo.of(base)
    ad = random_adapter(info, ["blk.0.attn_q.weight"])
    ad.norms["blk.0.attn_norm.weight"] = torch.linspace(0.5, 1.5, 64)  # mergekit-style full norm weight
    path = tmp_path / "n.gguf"
    write_gguf_adapter(ad, path, base=info)
    with pytest.warns(UserWarning, match="llama.cpp ignores"):
        back = read_adapter(path, base=info)
    assert torch.equal(back.norms["blk.0.attn_norm.weight"], ad.norms["blk.0.attn_norm.weight"])
    oracle_llama._adapter(str(base), str(path))  # loads (skips the norm)


# --- old formats -------------------------------------------------------------------------------------------

def write_ggla(path: Path, r: int, alpha: int, tensors: dict[str, np.ndarray]) -> Path:
    """convert-lora-to-ggml.py's writer: header, then per tensor (n_dims, name_len, ftype, reversed shape,
    name, pad to 32, data). Its A tensors are PEFT's lora_A transposed."""
    with open(path, "wb") as f:
        f.write(b"ggla"[::-1])
        f.write(struct.pack("iii", 1, r, alpha))
        for name, t in tensors.items():
            sname = name.encode()
            f.write(struct.pack("iii", t.ndim, len(sname), 0 if t.dtype == np.float32 else 1))
            f.write(struct.pack("i" * t.ndim, *t.shape[::-1]))
            f.write(sname)
            f.seek((f.tell() + 31) & -32)
            t.tofile(f)
    return path


@pytest.mark.parametrize("names", ["gguf", "ggml"])
def test_ggla_reads_as_old_llama_cpp_applied_it(base, tmp_path, names):
    info = BaseInfo.of(base)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 64, generator=g)  # PEFT lora_A [r, in]
    B = torch.randn(32, 4, generator=g)  # PEFT lora_B [out, r] (attn_k: 32 rows)
    stem = "blk.1.attn_k.weight" if names == "gguf" else "layers.1.attention.wk.weight"
    path = write_ggla(tmp_path / "a.bin", 4, 16, {stem + ".loraA": A.T.numpy().copy(),
                                                   stem + ".loraB": B.numpy().astype(np.float16)})
    ad = read_adapter(path, base=info)
    d = ad.delta("blk.1.attn_k.weight")
    want = (B.half().float() @ A) * (16 / 4)  # old llama.cpp: W += alpha / r * B A, as stored
    assert torch.allclose(d, want, rtol=1e-6, atol=1e-6)


def test_ggla_errors(tmp_path):
    p = write_ggla(tmp_path / "x.bin", 4, 8, {"blk.0.attn_q.weight.loraA": np.zeros((64, 4), np.float32)})
    with pytest.raises(ToolkitError, match="missing one component"):
        read_adapter(p)
    p.write_bytes(b"algg" + struct.pack("iii", 2, 4, 8))
    with pytest.raises(ToolkitError, match="unsupported GGLA version 2"):
        read_adapter(p)


def test_old_finetune_checkpoint_lora(base, tmp_path):
    """finetune's checkpoints: training.type=finetune_lora, ggml a ne [r, in], b ne [r, out], delta = a^T b
    applied unscaled (finetune's add_to_f32(w, mul_mat(a, b)))."""
    g = torch.Generator().manual_seed(2)
    a_t, b_t = torch.randn(64, 4, generator=g), torch.randn(32, 4, generator=g)  # torch (in, r), (out, r)
    na, nb = torch.randn(64, 1, generator=g), torch.randn(1, 1, generator=g)  # norm: rank 1
    path = write_raw(tmp_path / "ckpt.gguf", {"training.type": "finetune_lora"},
                     {"blk.0.attn_k.weight.lora_a": a_t, "blk.0.attn_k.weight.lora_b": b_t,
                      "blk.0.ffn_norm.weight.lora_a": na, "blk.0.ffn_norm.weight.lora_b": nb})
    with pytest.warns(UserWarning):
        ad = read_adapter(path, base=base)
    assert torch.allclose(ad.delta("blk.0.attn_k.weight"), b_t @ a_t.T)
    assert torch.allclose(ad.delta("blk.0.ffn_norm.weight").reshape(-1), (nb @ na.T).reshape(-1))


# --- PEFT --------------------------------------------------------------------------------------------------

def write_peft(d: Path, cfg: dict, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    base_cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (d / "adapter_config.json").write_text(json.dumps({**base_cfg, **cfg}))
    save_file(state, str(d / "adapter_model.safetensors"))
    return d


def q_state(r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    pre = "base_model.model.model.layers.0.self_attn."
    return {pre + "q_proj.lora_A.weight": torch.randn(r, 64, generator=g),
            pre + "q_proj.lora_B.weight": torch.randn(64, r, generator=g)}


def test_peft_q_rows_are_permuted_like_llama_cpp(base, tmp_path):
    st = q_state()
    ad = read_adapter(write_peft(tmp_path / "p", {}, st), base=base)
    B = st["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(ad.tensors["blk.0.attn_q.weight"].b, N.permute_rows(B, 4))
    assert ad.scale("blk.0.attn_q.weight") == 2.0
    out = tmp_path / "back"
    write_peft_adapter(ad, out, base=base)  # and back, bit for bit
    from safetensors.torch import load_file

    assert all(torch.equal(load_file(str(out / "adapter_model.safetensors"))[k], v) for k, v in st.items())


@pytest.mark.parametrize("cfg,state_extra,msg", [
    ({"use_dora": True}, {}, "DoRA config (use_dora: true) but some modules have no lora_magnitude_vector"),
    ({"trainable_token_indices": {"embed_tokens": [3]}},
     {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(2, 64)},
     "2 trainable token rows for 1 indices"),
    ({"trainable_token_indices": [49153]},
     {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(1, 64)},
     "token 49152 is past the base's 49152 rows and not trained"),
    ({"bias": "all"}, {}, "adapters that train biases"),
    ({"peft_type": "IA3"}, {}, "peft_type 'IA3' is not supported"),
    ({}, {"base_model.model.model.embed_tokens.base_layer.weight": torch.zeros(49160, 64)},
     "embeddings resized for new tokens are not supported"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)},
     "DoRA magnitude has shape [32], the base weight has 64 rows"),
    ({}, {"base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector": torch.ones(32)},
     "has a DoRA magnitude but no lora_A / lora_B"),
    ({}, {"base_model.model.model.embed_tokens.weight": torch.zeros(49160, 32)},
     "full weight 'token_embd.weight' has shape [49160, 32], the base [49152, 64]"),
    ({}, {"base_model.model.lm_head.weight": torch.zeros(49160, 64)},
     "grows the vocabulary but holds 49152 embedding rows and 49160 lm_head rows"),
    ({}, {"base_model.model.lm_head.weight": torch.zeros(49160, 64),
          "base_model.model.model.embed_tokens.weight": torch.zeros(49160, 64)},
     "grows the vocabulary from 49152 to 49160 tokens but its folder has no tokenizer.json"),
    ({"rank_pattern": {"q_proj": 8}}, {}, "config says rank 8 but lora_A has 4 rows"),
])
def test_peft_refusals(base, tmp_path, cfg, state_extra, msg):
    d = write_peft(tmp_path / "p", cfg, {**q_state(), **state_extra})
    with pytest.raises(ToolkitError) as e:
        read_adapter(d, base=base)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_peft_needs_base_and_safetensors(base, tmp_path):
    d = write_peft(tmp_path / "p", {}, q_state())
    with pytest.raises(ToolkitError, match="needs the base model"):
        read_adapter(d)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(ToolkitError, match="never loads"):
        read_adapter(d, base=base)


def test_alpha_pattern_and_rslora_fold_into_b(base, tmp_path):
    """GGUF holds one alpha: per-module alpha and rsLoRA scale must come out exactly as PEFT's."""
    g = torch.Generator().manual_seed(4)
    pre = "base_model.model.model.layers.0."
    st = {pre + "self_attn.q_proj.lora_A.weight": torch.randn(4, 64, generator=g),
          pre + "self_attn.q_proj.lora_B.weight": torch.randn(64, 4, generator=g),
          pre + "mlp.down_proj.lora_A.weight": torch.randn(8, 128, generator=g),
          pre + "mlp.down_proj.lora_B.weight": torch.randn(64, 8, generator=g)}
    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {"down_proj": 8}, "alpha_pattern": {"down_proj": 3},
           "use_rslora": True, "target_modules": ["q_proj", "down_proj"]}
    ad = read_adapter(write_peft(tmp_path / "p", cfg, st), base=base)
    import math

    d = ad.delta("blk.0.ffn_down.weight")
    want = st[pre + "mlp.down_proj.lora_B.weight"] @ st[pre + "mlp.down_proj.lora_A.weight"] * (3 / math.sqrt(8))
    assert torch.allclose(d, want, rtol=1e-6, atol=1e-6)
    dq = ad.delta("blk.0.attn_q.weight")
    wq = N.permute_rows(st[pre + "self_attn.q_proj.lora_B.weight"], 4) @ st[pre + "self_attn.q_proj.lora_A.weight"]
    assert torch.allclose(dq, wq * (8 / math.sqrt(4)), rtol=1e-6, atol=1e-6)


def test_modules_to_save_and_dora_round_trip_peft_and_refuse_gguf(base, tmp_path):
    """Full weights (modules_to_save, both the stripped and the `.modules_to_save.default` key forms) and DoRA
    magnitudes read into GGUF names and row order (q's magnitude permuted like B), come back from
    write_peft_adapter bit for bit, and the GGUF adapter writer refuses each with one line naming export-lora."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(7)
    pre = "base_model.model.model.layers.0.self_attn."
    st = {**q_state(), pre + "q_proj.lora_magnitude_vector": torch.rand(64, generator=g) + 0.5,
          "base_model.model.lm_head.modules_to_save.default.weight": torch.randn(49152, 64, generator=g),
          "base_model.model.model.embed_tokens.weight": torch.randn(49152, 64, generator=g)}
    d = write_peft(tmp_path / "p", {"use_dora": True, "modules_to_save": ["lm_head", "embed_tokens"]}, st)
    ad = read_adapter(d, base=base)
    assert set(ad.weights) == {"output.weight", "token_embd.weight"} and ad.is_dora and not ad.added_tokens
    assert torch.equal(ad.weights["output.weight"], st["base_model.model.lm_head.modules_to_save.default.weight"])
    m = ad.tensors["blk.0.attn_q.weight"].magnitude
    assert torch.equal(m, N.permute_rows(st[pre + "q_proj.lora_magnitude_vector"].reshape(-1, 1), 4).reshape(-1))
    write_peft_adapter(ad, tmp_path / "rt", base=base)
    back = load_file(str(tmp_path / "rt" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "rt" / "adapter_config.json").read_text())
    assert cfg["use_dora"] and sorted(cfg["modules_to_save"]) == ["embed_tokens", "lm_head"]
    assert torch.equal(back[pre + "q_proj.lora_magnitude_vector"], st[pre + "q_proj.lora_magnitude_vector"])
    assert torch.equal(back["base_model.model.lm_head.weight"],
                       st["base_model.model.lm_head.modules_to_save.default.weight"])
    for adapter, must in ((ad, "DoRA"), (Adapter({}, 0.0, "llama", weights=ad.weights, path=str(d)), "full weights")):
        with pytest.raises(ToolkitError) as e:
            write_gguf_adapter(adapter, tmp_path / "x.gguf", base=base)
        assert must in str(e.value) and "toolkit export-lora" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()
