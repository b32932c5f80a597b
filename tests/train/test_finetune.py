"""toolkit finetune on a tiny GGUF llama: stop/resume is bit-exact, llama.cpp loads the adapter and agrees,
bad input is one line before any work, records/validation/test/log, L-BFGS, ggml's AdamW update."""
from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from toolkit.gguf_io import open_gguf
from toolkit.train.finetune import FinetuneConfig, finetune, make_optimizer, param_groups

TEXT = "".join(f"<q>what is {a} times {b}?\n{a * b}\n" for a in range(2, 7) for b in range(2, 5))


def cfg(tmp, model, **kw) -> FinetuneConfig:
    base = dict(model_base=str(model), train_data=str(tmp / "data.txt"), sample_start="<q>", ctx=24, batch=3,
                adam_iter=6, adam_alpha=0.01, warmup=2, cos_decay_steps=10, lora_r=4, lora_alpha=8,
                checkpoint_in=str(tmp / "none.gguf"), checkpoint_out=str(tmp / "ck-ITERATION.gguf"),
                lora_out=str(tmp / "lora-ITERATION.gguf"), log_file=str(tmp / "log.jsonl"), save_every=0,
                threads=1, seed=11, quiet=True)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """One uninterrupted 6-iteration run that exercises every source of state: dropout (torch RNG), grad
    accumulation, shuffling with random offsets across epochs, fill-with-next-samples."""
    tmp = tmp_path_factory.mktemp("full")
    (tmp / "data.txt").write_text(TEXT)
    c = cfg(tmp, tiny_llama, lora_dropout=0.1, grad_acc=2, sample_random_offsets=True, fill_with_next_samples=True,
            peft_out=str(tmp / "peft"))
    return tmp, c, finetune(c)


def _lora_tensors(path) -> dict[str, np.ndarray]:
    return {n: np.array(t.data) for n, t in open_gguf(path).tensors.items()}


def test_stop_with_ctrl_c_and_resume_equals_uninterrupted(tmp_path, tiny_llama, trained):
    full_dir, full_cfg, full = trained
    assert full.iteration == 6 and len(full.losses) == 6
    (tmp_path / "data.txt").write_text(TEXT)
    kw = dict(lora_dropout=0.1, grad_acc=2, sample_random_offsets=True, fill_with_next_samples=True)

    def ctrl_c(it: int, loss: float) -> None:
        if it == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C: finish the iteration, save, stop

    first = finetune(cfg(tmp_path, tiny_llama, **kw), on_iteration=ctrl_c)
    assert first.interrupted and first.iteration == 2
    latest = tmp_path / "ck-LATEST.gguf"
    assert latest.is_file() and (tmp_path / "ck-2.gguf").is_file()
    # --adam-iter N: N more iterations on top of the checkpoint's count
    second = finetune(cfg(tmp_path, tiny_llama, checkpoint_in=str(latest), adam_iter=4, seed=999, **kw))
    assert second.iteration == 6
    assert first.losses + second.losses == full.losses  # bit for bit, not approximately
    a = _lora_tensors(full_dir / "lora-6.gguf")
    b = _lora_tensors(tmp_path / "lora-6.gguf")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.llamacpp
def test_llama_cpp_loads_the_adapter_and_agrees(trained, tiny_llama):
    oracle = pytest.importorskip("oracle_llama")
    from toolkit.model import load

    tmp, _, _ = trained
    lora = tmp / "lora-LATEST.gguf"
    tokens = [1, 500, 2000, 31, 7000, 42, 9, 12000]
    ref = oracle.llama_logits(tiny_llama, tokens, adapters=[(str(lora), 1.0)])
    ref0 = oracle.llama_logits(tiny_llama, tokens)
    model, _ = load(tiny_llama, device="cpu", weights="float", adapters=[(str(lora), 1.0)])
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].numpy()
    effect = np.abs(ref - ref0).max()
    assert effect > 1e-2  # the adapter changes llama.cpp's output...
    assert np.abs(ours - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())  # ...exactly as ours (f32 tolerance)
    from peft import PeftConfig

    pc = PeftConfig.from_pretrained(str(tmp / "peft"))
    assert pc.r == 4 and pc.lora_alpha == 8


def test_bad_input_is_one_line_before_any_work(tmp_path, tiny_llama, capsys, monkeypatch):
    from toolkit.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text(TEXT)
    (tmp_path / "empty.txt").write_text("")
    m = str(tiny_llama)
    cases = [
        (["--train-data", "missing.txt"], "missing.txt: no such file"),
        (["--train-data", "empty.txt"], "empty.txt: training data is empty"),
        (["--train-data", "data.txt", "--sample-start", "@@"], "never occurs"),
        (["--train-data", "data.txt", "-c", "512"], "larger than the model's training context 256"),
        (["--train-data", "data.txt", "--lora-r", "40"], "rank 40 is larger than tensor 'blk.0.attn_k.weight'"),
        ([], "no training data"),
        (["--train-data", "data.txt", "-b", "1", "--nproc", "2"], "--batch 1 is smaller than --nproc 2"),
        (["--train-data", "data.txt", "--micro-batch", "-1"], "--micro-batch -1 must be 0"),
    ]
    for extra, msg in cases:
        rc = main(["finetune", "-m", m, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and msg in err[-1] and err[-1].startswith("toolkit: error: ")
        assert "Traceback" not in "\n".join(err)
        assert not list(tmp_path.glob("*.gguf")) and not (tmp_path / "finetune-log.jsonl").exists()


def test_records_validation_test_and_log(tmp_path, tiny_llama, capsys):
    d = tmp_path / "data"
    d.mkdir()
    chat = [{"messages": [{"role": "user", "content": f"{a}+{a}?"}, {"role": "assistant", "content": str(2 * a)}]}
            for a in range(12)]
    for name, rows in (("train", chat[:8]), ("valid", chat[8:10]), ("test", chat[10:])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = cfg(tmp_path, tiny_llama, train_data=None, data=str(d), ctx=48, adam_iter=4, steps_per_eval=2, test=True,
            plot=str(tmp_path / "loss.png"))
    r = finetune(c)
    assert [it for it, _ in r.val_losses] == [2, 4] and all(math.isfinite(v) for _, v in r.val_losses)
    assert r.test_ppl is not None and math.isfinite(r.test_ppl) and r.test_ppl > 1
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("val_loss" in x for x in rows) and any("test_ppl" in x for x in rows)
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "loss.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in capsys.readouterr().err


def test_lbfgs_lowers_the_loss(tmp_path, tiny_llama):
    (tmp_path / "data.txt").write_text("<q>abc abc abc abc abc abc abc\n" * 3)
    r = finetune(cfg(tmp_path, tiny_llama, use_lbfgs=True, lbfgs_iter=4, adam_alpha=1.0, batch=1,
                     lora_out="", checkpoint_out=""))
    assert r.losses[-1] < r.losses[0] - 0.5


def test_micro_batches_train_and_evaluate_as_whole_batches(tmp_path, tiny_llama):
    """--micro-batch 2 runs a batch of 3 as passes of 2 + 1 rows: each pass's loss is its part of the whole
    batch's mean (records with masked prompts of different lengths count different numbers of tokens per row,
    so a mean of the passes' means would differ), so losses, validation losses and the L-BFGS adapter (linear
    in the gradient) equal whole batches' up to float32 summation order."""
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"prompt": "q " * (1 + i % 5) + f"{i}+{i}?", "completion": " " + str(2 * i) * (1 + i % 3)}
            for i in range(12)]
    for name, part in (("train", rows[:9]), ("valid", rows[9:])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    runs = {}
    for micro in (0, 2):
        t = tmp_path / f"m{micro}"
        t.mkdir()
        runs[micro] = finetune(cfg(t, tiny_llama, train_data=None, data=str(d), ctx=32, grad_acc=2, micro_batch=micro,
                                   use_lbfgs=True, lbfgs_iter=2, adam_alpha=1.0, steps_per_eval=1))
    whole, micro = runs[0], runs[2]
    # seen: equal to ~1e-7 relative; 1e-5 allowed
    assert np.allclose(micro.losses, whole.losses, rtol=1e-5, atol=0) and len(micro.losses) == 2
    assert np.allclose([v for _, v in micro.val_losses], [v for _, v in whole.val_losses], rtol=1e-5, atol=0)
    a, b = _lora_tensors(tmp_path / "m2" / "lora-2.gguf"), _lora_tensors(tmp_path / "m0" / "lora-2.gguf")
    assert a.keys() == b.keys()
    assert all(np.abs(a[k] - b[k]).max() <= 1e-5 * max(np.abs(b[k]).max(), 1e-6) for k in a)


def test_adamw_step_is_ggml_adam():
    """One step against ggml's Adam written out: decay only on ndim >= --adam-decay-min-ndim, clipped grads,
    x = x*(1 - decay*alpha*sched) - alpha*sched * m_hat / (sqrt(v_hat) + eps)."""
    torch.manual_seed(0)
    params = {"w.lora_a": torch.nn.Parameter(torch.randn(4, 8)), "n": torch.nn.Parameter(torch.randn(8))}
    c = FinetuneConfig(model_base="x", adam_alpha=0.01, adam_decay=0.1, adam_decay_min_ndim=2)
    groups = param_groups(params, c)
    assert [len(g["params"]) for g in groups] == [1, 1] and groups[1]["weight_decay"] == 0.0
    opt = make_optimizer(params, c)
    sched = 0.37
    x0 = {k: p.detach().clone() for k, p in params.items()}
    grads = {k: torch.randn_like(p) * 3 for k, p in params.items()}
    for k, p in params.items():
        p.grad = grads[k].clone()
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    for g in opt.param_groups:
        g["lr"] = c.adam_alpha * sched
    opt.step()
    for k, p in params.items():
        g = grads[k] * (1.0 / norm)  # norm > gclip: scaled to gclip
        m = (1 - 0.9) * g
        v = (1 - 0.999) * g * g
        mh, vh = m / (1 - 0.9), v / (1 - 0.999)
        decay = 0.1 * c.adam_alpha * sched if p.ndim >= 2 else 0.0
        want = x0[k] * (1 - decay) - c.adam_alpha * sched * mh / (vh.sqrt() + 1e-8)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qtype,dtype", [("F32", None), ("Q8_0", None), ("Q8_0", "bf16")])
def test_chunked_head_loss_equals_cross_entropy(tmp_path, qtype, dtype):
    """The vocabulary-chunked loss (no [N, V] logits) against F.cross_entropy on the full logits: value and
    LoRA gradients, with a loss mask. bf16 compute (--dtype bf16): the chunked head's GEMMs run in bf16 like the
    model's own head, so the tolerance is bf16's (2^-7 relative: one rounding of 8-bit mantissas, summed in
    different orders)."""
    from tiny import make_tiny_gguf

    from toolkit.model import load
    from toolkit.train.loss import chunked_loss

    model, _ = load(make_tiny_gguf(tmp_path / "m.gguf", qtype=qtype), device="cpu", weights="float", dtype=dtype)
    ranks = {n: 4 for n in model.lora_targets() if n.startswith("blk.")}
    params = model.add_trainable_adapter("t", ranks, 8.0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 49152, (2, 10), generator=g)
    y = torch.randint(0, 49152, (2, 10), generator=g)
    w = torch.rand(2, 10, generator=g) > 0.3

    def grads(loss):
        for p in params:
            p.grad = None
        loss.backward()
        return [p.grad.clone() for p in params]

    ref = (torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none")
           * w.flatten()).sum()
    ref_g = grads(ref)
    got = chunked_loss(model, x, y, w)
    got_g = grads(got)
    rtol, atol = (1e-5, 1e-4) if dtype is None else (2**-7, 0.0)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    for a, b in zip(got_g, ref_g):
        scale = float(b.float().abs().max())
        if dtype is None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * scale)  # f32 summation order
        else:
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2**-6 * scale)


def test_presets_parse_and_the_command_line_wins():
    from pathlib import Path

    from toolkit.config import parse_config

    root = Path(__file__).resolve().parents[2] / "configs"
    guide = parse_config(FinetuneConfig, ["--config", str(root / "open-llama-3b-guide.yaml"), "-m", "b.gguf",
                                          "--train-data", "t.txt", "--lora-r", "8"], prog="t")
    assert (guide.ctx, guide.lora_r, guide.adam_iter, guide.escape, guide.use_checkpointing) == (256, 8, 256, True, True)
    from toolkit.train.data import process_escapes

    assert process_escapes(guide.sample_start) == "\n"
    demo = parse_config(FinetuneConfig, ["--config", str(root / "smollm2-demo.yaml"), "-m", "b.gguf",
                                         "--use-checkpointing"], prog="t")
    assert demo.use_checkpointing and demo.train_data == "configs/data/planets-train.txt" and demo.sample_start == "### "
    assert demo.peft_out == "smollm2-planets-peft"  # the demo writes both adapter forms
    assert (root / "data" / "planets-train.txt").stat().st_size > 10000


def test_stopping_tests_as_ggml_adam():
    from toolkit.train.checkpoint import TrainState
    from toolkit.train.finetune import converged

    c = FinetuneConfig(model_base="x", opt_max_no_improvement=2)
    st = TrainState()
    assert [converged(st, v, c) for v in (3.0, 2.0, 2.5, 2.1)][-1].startswith("no improvement in 2")
    c = FinetuneConfig(model_base="x", adam_epsf=0.01)
    st = TrainState()
    assert converged(st, 2.0, c) == "" and converged(st, 1.5, c) == "" and "adam-epsf" in converged(st, 1.499, c)
    c = FinetuneConfig(model_base="x", opt_past=2, opt_delta=0.05)
    st = TrainState()
    out = [converged(st, v, c) for v in (4.0, 3.0, 2.0, 1.99, 1.98)]
    assert out[:4] == ["", "", "", ""] and "opt-delta" in out[4]  # (2.0 - 1.98) / 1.98 < 0.05
