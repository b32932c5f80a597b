"""HF <-> GGUF names against gguf-py's TensorNameMap (llama.cpp's converter tables), and the Q/K permutation
against transformers' GGUF loader (which undoes llama.cpp's permutation)."""
from __future__ import annotations

import gguf
import pytest
import torch

from toolkit import names as N

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "phi3": gguf.MODEL_ARCH.PHI3, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}


def all_hf_names(arch: str, n_layer: int = 3) -> list[str]:
    out = [m + ".weight" for m in N.GLOBAL_MODULES
           if not (m == "lm_head" and gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[ARCHS[arch]])]
    for i in range(n_layer):
        for hf in N.LAYER_MODULES[arch]:
            out.append(f"model.layers.{i}.{hf}.weight")
            if hf.endswith("_proj"):
                out.append(f"model.layers.{i}.{hf}.bias")
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_to_gguf_matches_gguf_py(arch):
    tmap = gguf.get_tensor_name_map(ARCHS[arch], 3)
    names = all_hf_names(arch)
    assert len(names) > 20
    for hf in names:
        want = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert want is not None, hf
        assert N.hf_to_gguf(arch, hf) == want, hf
        assert N.gguf_to_hf(arch, want) == hf  # and back


def test_every_gguf_tensor_of_the_arch_is_named():
    # every dense per-layer tensor gguf-py lists for these archs has a mapping (MoE and rotary tables aside;
    # HF phi3 only has the fused qkv_proj)
    skip = {"ffn_gate_inp", "ffn_gate_exps", "ffn_down_exps", "ffn_up_exps", "attn_rot_embd"}
    for arch, march in ARCHS.items():
        mapped = set(N.LAYER_MODULES[arch].values())
        for t in gguf.MODEL_TENSORS[march]:
            name = gguf.TENSOR_NAMES[t]
            leaf = name[len("blk.{bid}."):]
            if not name.startswith("blk.{bid}.") or leaf in skip or (arch == "phi3" and leaf in ("attn_q", "attn_k", "attn_v")):
                continue
            assert leaf in mapped, (arch, name)


def test_multimodal_prefix_and_unknown():
    assert N.hf_to_gguf("gemma3", "model.language_model.layers.2.self_attn.q_proj.weight") == "blk.2.attn_q.weight"
    assert N.hf_to_gguf("llama", "model.layers.0.mlp.gate_up_proj.weight") is None
    assert N.hf_to_gguf("phi3", "model.layers.0.mlp.gate_up_proj.weight") == "blk.0.ffn_up.weight"


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (8, 1)])
def test_qk_permutation_is_llama_cpp_s(n_head, n_kv):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    hd = 8
    for heads, rows in ((n_head, n_head * hd), (n_kv, n_kv * hd)):
        w = torch.randn(rows, 5)
        gg = N.permute_rows(w, heads)
        assert not torch.equal(gg, w)
        # transformers' GGUF loader reverses llama.cpp's permutation: it must give back the HF rows
        back = LlamaTensorProcessor()._reverse_permute_weights(gg.numpy(), heads, heads)
        assert torch.equal(torch.from_numpy(back), w)
        assert torch.equal(N.unpermute_rows(gg, heads), w)
        b = torch.randn(rows)  # biases too
        assert torch.equal(N.unpermute_rows(N.permute_rows(b, heads), heads), b)
    assert N.qk_heads("blk.0.attn_q.weight", n_head, n_kv) == n_head
    assert N.qk_heads("blk.0.attn_k.bias", n_head, n_kv) == n_kv
    assert N.qk_heads("blk.0.attn_v.weight", n_head, n_kv) is None
