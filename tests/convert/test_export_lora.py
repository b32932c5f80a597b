"""`toolkit export-lora` against llama.cpp running the same adapters unmerged, gguf-py's dequantize, and toolkit.

Oracles: llama.cpp (llama-cpp-python ctypes, tests/oracle_llama.py) for logits of merged vs unmerged; gguf-py
(GGUFReader + gguf.quants.dequantize) for the merged values themselves; toolkit's model with the adapters
unmerged. Tolerances are stated per test.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from toolkit.adapter import Adapter, LoraPair, write_gguf_adapter, write_peft_adapter
from toolkit.config import parse_lora_flags
from toolkit.convert.export_lora import export_lora, main
from toolkit.gguf_io import open_gguf

pytest.importorskip("llama_cpp")
from oracle_llama import llama_logits, llama_tokenize  # noqa: E402
from tiny import make_tiny_gguf, random_lora  # noqa: E402

SMOL_A = ("attn_q", "attn_v", "attn_output", "ffn_down")  # enough to move the model; fewer tensors, faster tests
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
TEXT = ("The history of Paris begins with a small fishing village on an island in the Seine. Over the centuries it "
        "grew into the capital of France, a centre of art, science and trade, known today for its museums, cafes, "
        "wide boulevards and the iron tower built for the world fair of 1889. Millions of people visit every year.")


def random_adapter(base: Path, path: Path, targets=LINEAR, r: int = 8, alpha: float = 16.0, seed: int = 0,
                   std: float = 0.02) -> Path:
    """A GGUF adapter with random A and B (B non-zero, so the delta is real) on `targets` of every layer."""
    g = open_gguf(base)
    shapes = {name: ti.shape for name, ti in g.tensors.items() if any(name.endswith(f"{t}.weight") for t in targets)}
    write_gguf_adapter(Adapter(random_lora(shapes, r, seed, std, a_std=std * 5), alpha, g.arch), path)
    return path


def delta_stats(merged: np.ndarray, unmerged: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, cosine of the logit deltas against the base)."""
    top1 = float((merged.argmax(-1) == unmerged.argmax(-1)).mean())
    d1, d2 = (merged - base).ravel(), (unmerged - base).ravel()
    return top1, float(d1 @ d2 / np.linalg.norm(d1) / np.linalg.norm(d2))


@pytest.fixture(scope="module")
def smol(smollm2_path, tmp_path_factory):
    """SmolLM2 (Q4_1) and its F32 twin (toolkit quantize F32, byte-identical to llama.cpp's), two adapters, merged."""
    from toolkit.convert.quantize import quantize_model

    d = tmp_path_factory.mktemp("export")
    a = random_adapter(smollm2_path, d / "a.gguf", targets=SMOL_A, r=8, seed=1)
    b = random_adapter(smollm2_path, d / "b.gguf", targets=("attn_q", "attn_v"), r=4, seed=2)
    base32 = d / "smol-f32.gguf"
    quantize_model(smollm2_path, base32, "F32", progress=False)
    f32 = d / "merged-f32.gguf"  # llama-export-lora's flag forms
    assert main(["-m", str(base32), "-o", str(f32), "--lora", str(a), "--lora-scaled", str(b), "0.5",
                 "--outtype", "f32", "-t", "2", "--no-progress"]) == 0
    q41 = d / "merged-q41-f32.gguf"
    export_lora(smollm2_path, q41, [(str(a), 1.0), (str(b), 0.5)], "f32", progress=False)
    keep = d / "merged-keep.gguf"  # llama.cpp's newer FNAME:SCALE,... form
    assert main(["-m", str(smollm2_path), "-o", str(keep), "--lora-scaled", f"{a}:1,{b}:0.5", "--no-progress"]) == 0
    toks = llama_tokenize(smollm2_path, TEXT)
    ads = [(str(a), 1.0), (str(b), 0.5)]
    return {"a": a, "b": b, "f32": f32, "q41": q41, "keep": keep, "toks": toks, "base": smollm2_path,
            "base32": base32, "logits_base": llama_logits(smollm2_path, toks),
            "logits_unmerged": llama_logits(smollm2_path, toks, adapters=ads),
            "logits_base32": llama_logits(base32, toks), "logits_unmerged32": llama_logits(base32, toks, adapters=ads)}


def test_f32_merge_matches_llama_cpp_unmerged(smol):
    """llama.cpp runs the merged file; its logits match llama.cpp's base + adapters unmerged (top-1 >= 95%, cosine
    of logit deltas >= 0.98), on the F32 base where both sides compute in f32."""
    merged = llama_logits(smol["f32"], smol["toks"])
    top1, cos = delta_stats(merged, smol["logits_unmerged32"], smol["logits_base32"])
    assert len(smol["toks"]) >= 60
    assert top1 >= 0.95 and cos >= 0.98, (top1, cos)
    # the adapters really move the model (otherwise the comparison says nothing)
    un, b = smol["logits_unmerged32"], smol["logits_base32"]
    assert np.linalg.norm(un - b) > 0.2 * np.linalg.norm(b) and (un.argmax(-1) != b.argmax(-1)).mean() > 0.05


def test_f32_merge_of_quantized_base_matches_llama_cpp_unmerged(smol):
    """On the Q4_1 base, llama.cpp's unmerged run multiplies Q4_1 weights by Q8_1-quantized activations while the
    merged F32 file does not: delta cosine >= 0.98 still, top-1 >= 90% (near-ties flip on that noise)."""
    merged = llama_logits(smol["q41"], smol["toks"])
    top1, cos = delta_stats(merged, smol["logits_unmerged"], smol["logits_base"])
    assert top1 >= 0.90 and cos >= 0.98, (top1, cos)


def test_f32_merge_matches_toolkit_unmerged(tmp_path):
    """The merged file in llama.cpp vs toolkit's model with the same adapters unmerged (top-1 >= 95%, delta cos
    >= 0.98), on a tiny Q8_0 model (all linear modules, two adapters)."""
    from tiny import make_tiny_gguf

    from toolkit.model import load

    base = make_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q8_0", n_layer=2, dim=64, ffn=128)
    a = random_adapter(base, tmp_path / "a.gguf", r=4, std=0.1, seed=5)
    b = random_adapter(base, tmp_path / "b.gguf", targets=("attn_k", "ffn_gate"), r=2, std=0.1, seed=6)
    out = tmp_path / "m.gguf"
    export_lora(base, out, [(str(a), 1.0), (str(b), -0.5)], "f32", progress=False)
    toks = list(range(300, 400))
    model, _ = load(base, device="cpu", weights="float", dtype="f32", adapters=[(str(a), 1.0), (str(b), -0.5)])
    with torch.no_grad():
        ours = model(torch.tensor([toks]))[0].numpy()
    top1, cos = delta_stats(llama_logits(out, toks), ours, llama_logits(base, toks))
    assert top1 >= 0.95 and cos >= 0.98, (top1, cos)


def test_f32_merged_values_equal_gguf_py_oracle(smol):
    """Merged tensor = gguf-py dequantize(base) + sum scale*alpha/r * B@A (atol 1e-5); the rest byte for byte."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    base, out = GGUFReader(str(smol["base"])), open_gguf(smol["q41"])
    ra, rb = GGUFReader(str(smol["a"])), GGUFReader(str(smol["b"]))
    ad = [({t.name: t for t in r.tensors}, s) for r, s in ((ra, 1.0), (rb, 0.5))]
    alpha = 16.0
    n_merged = 0
    check = {"blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.17.attn_output.weight", "blk.29.ffn_down.weight"}
    for t in base.tensors:
        o = out.tensors[t.name]
        if f"{t.name}.lora_a" not in ad[0][0]:
            raw = np.asarray(t.data).view(np.uint8).ravel()
            assert o.qtype == t.tensor_type and np.array_equal(o.raw().numpy().ravel(), raw)
            continue
        n_merged += 1
        if t.name not in check:  # dequantizing all 120 in numpy is slow; a sample of roles and layers
            continue
        want = dequantize(np.asarray(t.data), t.tensor_type).reshape(o.shape).astype(np.float64)
        for tensors, s in ad:
            if f"{t.name}.lora_a" in tensors:
                a = np.asarray(tensors[f"{t.name}.lora_a"].data, dtype=np.float64)  # [r, in]
                b = np.asarray(tensors[f"{t.name}.lora_b"].data, dtype=np.float64)  # [out, r]
                want += s * alpha / a.shape[0] * (b @ a)
        assert o.qtype == Q.F32
        np.testing.assert_allclose(np.asarray(o.data), want, rtol=0, atol=1e-5)
        check.discard(t.name)
    assert n_merged == 4 * 30 and not check


def test_keep_preserves_types_size_and_metadata(smol):
    """--outtype keep: every tensor keeps its type, size within 5% of the base, metadata (tokenizer, chat template,
    file_type) identical; llama.cpp runs it and it lands nearer the unmerged logits than the base does."""
    base, keep = open_gguf(smol["base"]), open_gguf(smol["keep"])
    assert {n: t.qtype for n, t in keep.tensors.items()} == {n: t.qtype for n, t in base.tensors.items()}
    assert abs(smol["keep"].stat().st_size / smol["base"].stat().st_size - 1) < 0.05
    assert keep.metadata == base.metadata
    assert not np.array_equal(keep.tensors["blk.0.attn_q.weight"].raw(), base.tensors["blk.0.attn_q.weight"].raw())
    merged = llama_logits(smol["keep"], smol["toks"])
    un, b = smol["logits_unmerged"], smol["logits_base"]
    assert np.linalg.norm(merged - un) < 0.8 * np.linalg.norm(b - un)


def test_forced_type_and_truthful_file_type(tmp_path):
    """--outtype q8_0 on a Q4_0 base: merged tensors become Q8_0 (bytes = quants.quantize of the f32 merge),
    untouched ones stay, general.file_type says MOSTLY_Q8_0 (now its most common weight type)."""
    from tiny import make_tiny_gguf

    from toolkit.quants import quantize

    base = make_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q4_0", n_layer=2, dim=64, ffn=128)
    a = random_adapter(base, tmp_path / "a.gguf", r=4, seed=7)
    export_lora(base, tmp_path / "q8.gguf", [(str(a), 1.0)], "q8_0", progress=False)
    export_lora(base, tmp_path / "f32.gguf", [(str(a), 1.0)], "f32", progress=False)
    g, f32 = open_gguf(tmp_path / "q8.gguf"), open_gguf(tmp_path / "f32.gguf")
    assert g.get("general.file_type") == 7 and f32.get("general.file_type") == 0
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
        assert g.tensors[name].qtype == Q.Q8_0
        assert torch.equal(g.tensors[name].raw(), quantize(torch.from_numpy(np.array(f32.tensors[name].data)), Q.Q8_0))
    assert g.tensors["token_embd.weight"].qtype == Q.Q4_0 and g.tensors["blk.0.attn_norm.weight"].qtype == Q.F32


def test_token_embd_and_output_on_untied_model(tmp_path):
    """token_embd's transposed LoRA form and output.weight, merged, match llama.cpp unmerged (untied tiny model:
    llama.cpp aborts on a token_embd LoRA when output is tied to it)."""
    from tiny import make_tiny_gguf

    base = make_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q8_0", tied=False, n_layer=2, dim=64, ffn=128)
    a = random_adapter(base, tmp_path / "a.gguf", targets=("token_embd", "output", "attn_q", "ffn_up"), r=4,
                       std=0.1, seed=3)
    out = tmp_path / "m.gguf"
    export_lora(base, out, [(str(a), 0.7)], "f32", progress=False)
    toks = list(range(100, 200))
    b0, un, m = llama_logits(base, toks), llama_logits(base, toks, adapters=[(str(a), 0.7)]), llama_logits(out, toks)
    top1, cos = delta_stats(m, un, b0)
    assert top1 >= 0.95 and cos >= 0.98, (top1, cos)


def test_peft_folder_gives_the_same_merge(tmp_path):
    """A PEFT folder holding the same adapter merges to the same tensors (atol 1e-5)."""
    from tiny import make_tiny_gguf

    from toolkit.adapter import read_adapter

    base = make_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q4_0", n_layer=2, dim=64, ffn=128)
    a = random_adapter(base, tmp_path / "a.gguf", targets=LINEAR, r=4, seed=4)
    write_peft_adapter(read_adapter(a), tmp_path / "peft", base=open_gguf(base))
    export_lora(base, tmp_path / "g.gguf", [(str(a), 1.0)], "f32", progress=False)
    export_lora(base, tmp_path / "p.gguf", [(str(tmp_path / "peft"), 1.0)], "f32", progress=False)
    g, p = open_gguf(tmp_path / "g.gguf"), open_gguf(tmp_path / "p.gguf")
    for name, t in g.tensors.items():
        np.testing.assert_allclose(np.asarray(p.tensors[name].data, dtype=np.float32),
                                   np.asarray(t.data, dtype=np.float32), rtol=0, atol=1e-5)


def test_lora_flag_forms():
    assert parse_lora_flags(["a.gguf,b.gguf"], [["c.gguf", "0.5"], ["d.gguf:2,e:f.gguf:-1"]]) == [
        ("a.gguf", 1.0), ("b.gguf", 1.0), ("c.gguf", 0.5), ("d.gguf", 2.0), ("e:f.gguf", -1.0)]


def _one_line_error(capsys, argv: list[str], must: str, out: Path) -> None:
    from toolkit.cli import main as cli

    assert cli(["export-lora", *argv, "-o", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and must in err[0], err
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_adapters_one_line_nothing_written(tmp_path, capsys, tiny_llama, smollm2_path):
    other = tmp_path / "other"
    other.mkdir()
    # another architecture
    qwen = tmp_path / "qwen.gguf"
    ad = Adapter({"blk.0.attn_q.weight": LoraPair(torch.zeros(2, 64), torch.zeros(64, 2))}, 4.0, "qwen2")
    write_gguf_adapter(ad, qwen)
    _one_line_error(capsys, ["-m", str(tiny_llama), "--lora", str(qwen)], "architecture", other / "x.gguf")
    # shapes of another model (tiny's 64-wide adapter on SmolLM2)
    tiny_ad = random_adapter(tiny_llama, tmp_path / "tiny-a.gguf", r=2)
    _one_line_error(capsys, ["-m", str(smollm2_path), "--lora", str(tiny_ad)], "shape", other / "y.gguf")
    # conflicting adapters: both replace the same norm with different weights
    n1, n2 = tmp_path / "n1.gguf", tmp_path / "n2.gguf"
    for path, v in ((n1, 1.0), (n2, 2.0)):
        write_gguf_adapter(Adapter({}, 0.0, "llama", norms={"blk.0.attn_norm.weight": torch.full((64,), v)}), path)
    with pytest.warns(UserWarning):
        _one_line_error(capsys, ["-m", str(tiny_llama), "--lora", f"{n1},{n2}"], "both replace", other / "z.gguf")
    # no adapter at all; a missing file
    _one_line_error(capsys, ["-m", str(tiny_llama)], "no adapters", other / "w.gguf")
    _one_line_error(capsys, ["-m", str(tiny_llama), "--lora", str(tmp_path / "nope.gguf")], "nope.gguf",
                    other / "v.gguf")


def test_outtype_hf_writes_the_merged_model_for_transformers(tmp_path):
    """--outtype hf -o DIR: transformers loads the merged model; its logits equal llama.cpp's on the --outtype f32
    merge (top-1 >= 95%, max |diff| < 1e-2 * max |logit|). F32 base: with a quantized one, llama.cpp's untouched
    quantized matmuls would quantize activations and blur the comparison."""
    import transformers
    from tiny import make_tiny_gguf

    base = make_tiny_gguf(tmp_path / "tiny.gguf", qtype="F32", n_layer=2, dim=64, ffn=128)
    a = random_adapter(base, tmp_path / "a.gguf", r=4, std=0.1, seed=8)
    assert main(["-m", str(base), "-o", str(tmp_path / "hf"), "--lora-scaled", f"{a}:0.8", "--outtype", "hf",
                 "--no-progress"]) == 0
    export_lora(base, tmp_path / "m.gguf", [(str(a), 0.8)], "f32", progress=False)
    toks = list(range(500, 560))
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    with torch.no_grad():
        got = m(torch.tensor([toks])).logits[0].numpy()
    ref = llama_logits(tmp_path / "m.gguf", toks)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()


RSS_SCRIPT = """
import resource, sys
import torch
from toolkit.convert.export_lora import export_lora
import toolkit.model, toolkit.qlinear, toolkit.quants  # imported before the baseline: their size is not the merge's
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
export_lora(sys.argv[1], sys.argv[2], [(sys.argv[3], 1.0)], "f32", progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_merge_streams_tensor_by_tensor(smollm2_path, tmp_path):
    """Merging into SmolLM2 with --outtype f32 writes ~460 MB; peak RSS grows by less than 250 MB (the mapped
    ~100 MB base, one tensor, the adapter), i.e. nothing holds the output model."""
    import subprocess
    import sys

    a = random_adapter(smollm2_path, tmp_path / "a.gguf", r=8, seed=9)
    out = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(smollm2_path), str(out), str(a)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    grew = int(r.stdout.strip().splitlines()[-1])
    assert out.stat().st_size > 400e6
    assert grew < 250e6, grew


# --- PEFT modules_to_save (full weights) and a vocabulary grown for new tokens --------------------------------

MTS_TOKENS = [1, 504, 3458, 314, 253, 1345, 28, 30, 2107, 17, 9, 1300, 80, 442]
NEW_TOKENS = ["<tool_call>", "<|scratch|>", "planetoid"]


def _rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).float(), torch.as_tensor(np.asarray(b)).float()
    return float((a - b).norm() / b.norm())


def _peft_full_weights(base: Path, out: Path, grow: bool, rows: bool = False) -> tuple[torch.Tensor, list[int]]:
    """PEFT adapter with modules_to_save=[embed_tokens, lm_head] (trained copies: the base's plus noise), or with
    `rows` trainable_token_indices on embed_tokens (the new tokens and three old ones), and a LoRA on q/v, made
    on transformers' load of the tied GGUF `base`; with `grow`, the vocabulary first gains NEW_TOKENS
    (tokenizer.add_tokens + resize_token_embeddings, the tokenizer saved beside the adapter).
    Returns (PEFT's logits, the token ids used)."""
    import copy

    import oracle_hf
    from peft import LoraConfig, get_peft_model
    from transformers import PreTrainedTokenizerFast

    from toolkit.hf_dir import save_hf_tokenizer

    hf = copy.deepcopy(oracle_hf.hf_model(str(base)))
    tokens = list(MTS_TOKENS)
    if grow:
        save_hf_tokenizer(open_gguf(base), out.parent / "tok")
        tok = PreTrainedTokenizerFast.from_pretrained(str(out.parent / "tok"))
        tok.add_tokens(NEW_TOKENS[:2], special_tokens=True)
        tok.add_tokens(NEW_TOKENS[2:])
        hf.resize_token_embeddings(len(tok), mean_resizing=False)
        tokens += tok.convert_tokens_to_ids(NEW_TOKENS)
    full = {"trainable_token_indices": {"embed_tokens": [504, 28, 80, *tokens[len(MTS_TOKENS):]]}} if rows else \
        {"modules_to_save": ["embed_tokens", "lm_head"]}
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **full)
    pm = get_peft_model(hf, cfg).eval()
    g = torch.Generator().manual_seed(5)
    for n, p in pm.named_parameters():
        if "modules_to_save" in n or "trainable_tokens_delta" in n:
            p.data = p.data + torch.randn(p.shape, generator=g) * 0.3
        elif "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    pm.save_pretrained(str(out))
    if grow:
        tok.save_pretrained(str(out))
    with torch.no_grad():
        return pm(torch.tensor([tokens])).logits[0].float(), tokens


@pytest.mark.parametrize("grow,rows", [(False, False), (True, False), (True, True)],
                         ids=["same-vocab", "grown-vocab", "trainable-tokens"])
def test_modules_to_save_merged_and_unmerged_match_peft(tmp_path, grow, rows):
    """PEFT's trained embed_tokens / lm_head copies, or trainable token rows (llama.cpp's converter refuses
    both) on a tied base: merged into a GGUF (token_embd replaced, output.weight added, vocabulary arrays grown)
    that llama.cpp runs, and unmerged in toolkit's model. Tolerances: 1e-4 for toolkit's float32 against PEFT's (seen ~1e-7), 5e-3 for
    llama.cpp's float32 kernels against torch (the model tests' bound)."""
    from toolkit.model import load

    base = make_tiny_gguf(tmp_path / "base.gguf", tied=True, seed=4)
    want, tokens = _peft_full_weights(base, tmp_path / "peft", grow, rows)
    out = tmp_path / "merged.gguf"
    export_lora(base, out, [(str(tmp_path / "peft"), 1.0)], outtype="f32", progress=False)
    g, b = open_gguf(out), open_gguf(base)
    assert "output.weight" in g.tensors and "output.weight" not in b.tensors
    n_vocab = g.tensors["token_embd.weight"].shape[0]
    assert n_vocab == b.tensors["token_embd.weight"].shape[0] + (len(NEW_TOKENS) if grow else 0)
    assert len(g.get("tokenizer.ggml.tokens")) == len(g.get("tokenizer.ggml.token_type")) == n_vocab
    llama = llama_logits(out, tokens)
    print(f"grow={grow} rows={rows}: llama.cpp merged vs PEFT {_rel(llama, want):.2e}")
    assert llama.shape == tuple(want.shape) and _rel(llama, want) < 5e-3, _rel(llama, want)
    model, tok = load(base, device="cpu", weights="float", adapters=[(str(tmp_path / "peft"), 1.0)])
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0]
    print(f"grow={grow} rows={rows}: toolkit unmerged vs PEFT {_rel(ours, want):.2e}")
    assert _rel(ours, want) < 1e-4, _rel(ours, want)
    if grow:  # the new tokens' text: llama.cpp (from the merged GGUF) and toolkit (grown at load) read them alike
        text = "hi <tool_call> there<|scratch|> planetoid"
        ids = llama_tokenize(out, text, add_bos=False)
        assert tok.encode(text, add_bos=False) == ids and set(tokens[-3:]) <= set(ids)
        assert g.get("tokenizer.ggml.token_type")[-3:] == [3, 3, 4]  # CONTROL, CONTROL, USER_DEFINED
        from toolkit.errors import ToolkitError
        from toolkit.infer.server_backend import ModelBackend

        backend = ModelBackend(model, tok, 256, "tiny")  # serve: one tokenizer for all requests' adapter sets
        with pytest.raises(ToolkitError, match="grows the vocabulary"):
            backend.load_adapter(str(tmp_path / "peft"), "grown")
        assert "grown" not in model.adapters
    base_model, _ = load(base, device="cpu", weights="float")
    model.set_adapters({})  # off: the original modules are back, so the base's logits bit for bit
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([MTS_TOKENS]))[0], base_model(torch.tensor([MTS_TOKENS]))[0])
