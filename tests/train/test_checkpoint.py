"""Checkpoints: GGUF (read back by gguf-py's own reader), optimizer state round trips exactly, no pickle."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from toolkit.errors import ToolkitError
from toolkit.train.checkpoint import (Checkpoint, TrainState, load_checkpoint, rng_state, save_checkpoint,
                                      save_with_latest, set_rng_state, train_filename)
from toolkit.train.data import ShuffleState, mt19937_seed_state


def _trained_optimizer(kind: str):
    torch.manual_seed(0)
    params = {"blk.0.attn_q.weight.lora_a": torch.nn.Parameter(torch.randn(4, 16)),
              "blk.0.attn_q.weight.lora_b": torch.nn.Parameter(torch.zeros(8, 4))}
    ps = list(params.values())
    if kind == "adam":
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    else:
        opt = torch.optim.LBFGS(ps, lr=1, max_iter=2, history_size=3)
    target = torch.randn(8, 16)

    def closure():
        opt.zero_grad()
        loss = ((ps[1] @ ps[0] - target) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return params, opt, closure


@pytest.mark.parametrize("kind", ["adam", "lbfgs"])
def test_round_trip_continues_identically(tmp_path, kind):
    params, opt, closure = _trained_optimizer(kind)
    state = TrainState(iteration=3, tokens=3 * 512, shuffle=ShuffleState(123, 7, 2, mt19937_seed_state(5), 1, 9),
                       best_loss=0.5, prev_loss=0.625, past_losses=[1.0, 0.75])
    torch.manual_seed(42)
    snap = Checkpoint({n: p.detach().clone() for n, p in params.items()}, opt.state_dict(), kind, state,
                      {"ctx": 64, "lora": {"ranks": {"blk.0.attn_q.weight": 4}, "alpha": 4.0}}, rng_state(), "llama")
    path = tmp_path / "ck.gguf"
    save_checkpoint(path, snap)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.gguf"]  # atomic: no temp file left

    # gguf-py reads it and sees llama.cpp's key names with llama.cpp's types
    r = GGUFReader(path)
    f = r.fields
    assert f["training.iteration_count"].parts[-1][0] == 3 and f["training.iteration_count"].types[0].name == "UINT64"
    assert bytes(f["training.shuffle.rng_state"].parts[-1]).decode() == mt19937_seed_state(5)
    assert bytes(f["optimizer.type"].parts[-1]).decode() == kind
    assert {t.name for t in r.tensors} >= set(params)

    # continue both: the original and the reloaded copy take identical steps
    expected_next = torch.rand(3)  # the RNG continues from the saved state
    back = load_checkpoint(path)
    assert back.state == state and back.config["ctx"] == 64 and back.arch == "llama"
    for n in params:
        assert torch.equal(back.lora[n], params[n].detach())
    params2 = {n: torch.nn.Parameter(t.clone()) for n, t in back.lora.items()}
    ps2 = list(params2.values())
    opt2 = torch.optim.AdamW(ps2, lr=1e-2, weight_decay=0.1) if kind == "adam" else \
        torch.optim.LBFGS(ps2, lr=1, max_iter=2, history_size=3)
    opt2.load_state_dict(back.optimizer)
    target = torch.randn(8, 16)
    for o, ps in ((opt, list(params.values())), (opt2, ps2)):
        def cl(o=o, ps=ps):
            o.zero_grad()
            loss = ((ps[1] @ ps[0] - target) ** 2).mean()
            loss.backward()
            return loss
        for _ in range(2):
            o.step(cl)
    for a, b in zip(params.values(), ps2):
        assert torch.equal(a.detach(), b.detach())  # bit for bit
    set_rng_state(back.rng)
    assert torch.equal(torch.rand(3), expected_next)


def test_file_names_and_latest_copy(tmp_path):
    assert train_filename("ck-ITERATION.gguf", "ITERATION", "LATEST", 12) == "ck-12.gguf"
    assert train_filename("ck-ITERATION.gguf", "ITERATION", "LATEST", None) == "ck-LATEST.gguf"
    assert train_filename("ck.gguf", "ITERATION", "LATEST", 3) == "ck.gguf"
    out = save_with_latest(str(tmp_path / "a-ITERATION.bin"), "ITERATION", "LATEST", 7,
                           lambda p: open(p, "wb").write(b"x7"))
    assert out == [str(tmp_path / "a-7.bin"), str(tmp_path / "a-LATEST.bin")]
    assert (tmp_path / "a-LATEST.bin").read_bytes() == b"x7"


def test_not_a_checkpoint_is_one_clear_error(tmp_path, tiny_llama):
    with pytest.raises(ToolkitError, match="not a toolkit finetune checkpoint"):
        load_checkpoint(tiny_llama)
    with pytest.raises(ToolkitError, match="no such file"):
        load_checkpoint(tmp_path / "nope.gguf")
