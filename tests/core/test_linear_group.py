"""Linears sharing an input run as one at inference (toolkit.linear_group): the same outputs as running each
module, with and without adapters, and never a stale copy after scales or trained weights change."""
from __future__ import annotations

import torch

from tiny import make_tiny_gguf, random_lora
from toolkit.linear_group import group_forward
from toolkit.model import load

QKV = ("attn_q", "attn_k", "attn_v")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def attach(model, name: str, r: int, scale: float, seed: int) -> None:
    """An in-memory adapter over every q/k/v/gate/up linear."""
    from toolkit.adapter import Adapter

    shapes = {f"blk.{i}.{n}.weight": (int(getattr(blk, n).out_features), int(getattr(blk, n).in_features))
              for i, blk in enumerate(model.blk) for n in QKV + ("ffn_gate", "ffn_up")}
    model.add_adapter(Adapter(random_lora(shapes, r, seed, 0.1), float(r), "llama"), name, scale)


def each(blk, names, x):
    return [getattr(blk, n)(x) for n in names]


def test_group_equals_each_module(tmp_path):
    path = make_tiny_gguf(tmp_path / "q.gguf", qtype="Q4_0")
    model, _ = load(path, device="cpu", weights="packed")
    blk = model.blk[0]
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        for names in (QKV, ("ffn_gate", "ffn_up")):
            for got, want in zip(group_forward(blk, names, x), each(blk, names, x)):
                assert rel(got, want) < 1e-6
        attach(model, "a", 4, 1.0, 0)
        attach(model, "b", 8, 0.5, 1)
        model.set_adapters({"a": 1.0, "b": -0.5})
        for got, want in zip(group_forward(blk, QKV, x), each(blk, QKV, x)):
            assert rel(got, want) < 1e-5
        before = group_forward(blk, QKV, x)[0]
        model.set_adapters({"a": 2.0})  # a new scale: the stacked copy is rebuilt
        after = group_forward(blk, QKV, x)[0]
        assert rel(after, each(blk, QKV, x)[0]) < 1e-5 and rel(after, before) > 1e-3
        model.set_adapters({})
        assert all(torch.equal(g, w) for g, w in zip(group_forward(blk, QKV, x), group_forward(blk, QKV, x)))
        base = load(path, device="cpu", weights="packed")[0].blk[0]
        for got, want in zip(group_forward(blk, QKV, x), group_forward(base, QKV, x)):
            assert torch.equal(got, want)  # adapters off: the base's output, bit for bit


def test_trainable_adapters_are_never_read_from_a_stale_copy(tmp_path):
    path = make_tiny_gguf(tmp_path / "q.gguf", qtype="Q4_0")
    model, _ = load(path, device="cpu", weights="packed")
    model.add_trainable_adapter("t", {f"blk.0.{n}.weight": 4 for n in QKV}, alpha=4.0)
    blk = model.blk[0]
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        first = group_forward(blk, QKV, x)[0]
        a, b = blk.attn_q.pair("t")
        b.add_(1.0)  # an optimizer step, in place
        second = group_forward(blk, QKV, x)[0]
        assert rel(second, each(blk, QKV, x)[0]) < 1e-6 and rel(second, first) > 1e-3


def test_bf16_mode_stacks_a_bf16_copy_for_many_rows(tmp_path):
    """weights="bf16": a q/k/v group multiplies a prefill-sized input through one stacked bf16 copy, with the
    same result as each member through its own bf16 copy (both are the dequantized weights rounded to bf16), and
    a one-row input through the stacked int4 kernel weight as in "packed"."""
    from toolkit import qkernels

    path = make_tiny_gguf(tmp_path / "q.gguf", qtype="Q4_0")
    model, _ = load(path, device="cpu", weights="bf16")
    packed, _ = load(path, device="cpu", weights="packed")
    blk = model.blk[0]
    many, one = torch.randn(1, qkernels.BF16_ROWS + 3, 64), torch.randn(1, 1, 64)
    with torch.inference_mode():
        attach(model, "a", 4, 1.0, 0)
        model.set_adapters({"a": 0.5})
        got = group_forward(blk, QKV, many)
        plan = blk.__dict__["_group_plans"][QKV]
        assert plan.base16.kind == "bf16" and plan.base.kind == "int4"
        for g, w in zip(got, each(blk, QKV, many)):
            assert rel(g, w) < 1e-5
        model.set_adapters({})
        for g, w in zip(group_forward(blk, QKV, one), group_forward(packed.blk[0], QKV, one)):
            assert torch.equal(g, w)  # few rows: the int4 kernel, as "packed" runs it


def test_group_ids_leave_with_their_model(tmp_path):
    """The row_adapters op's registry of group ids holds its owners weakly and drops an id with its block (a server
    that loads and drops models must not keep an entry per block it ever saw)."""
    import gc

    from toolkit import linear_group

    path = make_tiny_gguf(tmp_path / "q.gguf", qtype="Q4_0")
    model, _ = load(path, device="cpu", weights="packed")
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    ids = {i for blk in model.blk for i in blk.__dict__.get("_group_ids", {}).values()}
    assert ids and ids <= set(linear_group._groups)
    del model
    gc.collect()
    assert not ids & set(linear_group._groups)
