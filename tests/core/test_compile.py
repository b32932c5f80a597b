"""Decode steps through torch.compile (toolkit.compiled, Transformer.compile_decode): the same logits as the eager
step, with and without adapters, for one sequence and for batched rows with their own adapters; scale changes,
longer caches, other row counts and other per-row adapter sets reuse the compiled step instead of compiling
again."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from tiny import make_tiny_arch_gguf, make_tiny_gguf, random_lora
import toolkit.compiled
from toolkit.adapter import Adapter
from toolkit.compiled import compile_decode
from toolkit.infer.batch import BatchEngine
from toolkit.infer.sampling import SamplingParams
from toolkit.model import load
from toolkit import qkernels

STEPS = 6


def adapter_on_every_linear(model, r: int, seed: int) -> Adapter:
    shapes = {n: (int(m.out_features), int(m.in_features)) for n, m in model.lora_targets().items()
              if n.startswith("blk.")}
    return Adapter(random_lora(shapes, r, seed, 0.1), float(r), "llama")


@torch.inference_mode()
def decode(model, prompt: list[int], steps: list[int]) -> torch.Tensor:
    """Teacher-forced logits [len(steps), V] of single-token steps after a prefill of `prompt`."""
    model.setup_caches(1, len(prompt) + len(steps))
    try:
        model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
        out = [model(torch.tensor([[t]]), input_pos=torch.tensor([len(prompt) + i]))[0, -1]
               for i, t in enumerate(steps)]
        return torch.stack(out)
    finally:
        model.clear_caches()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = make_tiny_gguf(tmp_path_factory.mktemp("c") / "q.gguf", qtype="Q4_0")  # int4 kernels on CPU
    eager, _ = load(path, device="cpu", weights="packed")
    compiled, _ = load(path, device="cpu", weights="packed")
    for m in (eager, compiled):
        m.add_adapter(adapter_on_every_linear(m, 4, 0), "a", 0.0)
        m.add_adapter(adapter_on_every_linear(m, 8, 1), "b", 0.0)
    compile_decode(compiled)
    return eager, compiled


def close(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("scales", [{}, {"a": 1.0}, {"a": 0.5, "b": -2.0}])
def test_compiled_decode_matches_eager(models, scales):
    eager, compiled = models
    eager.set_adapters(scales)
    compiled.set_adapters(scales)
    prompt, steps = [1, 5, 9, 2], [7, 3, 11, 4, 8, 6][:STEPS]
    want, got = decode(eager, prompt, steps), decode(compiled, prompt, steps)
    # both run bf16 activations through the same int4 kernel; inductor may keep fused intermediates in float32
    # where eager rounds them, so the bound is bf16's precision, not bit equality
    assert close(got, want) < 1e-2
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_scale_changes_and_cache_lengths_reuse_the_compiled_step(models):
    eager, compiled = models
    for m in (eager, compiled):
        m.set_adapters({"a": 1.0, "b": 1.0})
    decode(compiled, [1, 2], [3, 4, 5])
    before = graphs()
    for scales in ({"a": 0.25, "b": 3.0}, {"a": -1.0, "b": 0.5}):
        for m in (eager, compiled):
            m.set_adapters(scales)
        prompt, steps = [1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16]  # a longer cache, too
        assert close(decode(compiled, prompt, steps), decode(eager, prompt, steps)) < 1e-2
    assert graphs() == before, "a scale change or a longer cache compiled a new graph"


def test_compiled_step_sees_adapters_off_as_the_base(models):
    eager, compiled = models
    for m in (eager, compiled):
        m.set_adapters({"a": 1.0})
    prompt, steps = [3, 1, 4], [1, 5, 9]
    with_a = decode(compiled, prompt, steps)
    for m in (eager, compiled):
        m.set_adapters({})
    off = decode(compiled, prompt, steps)
    assert close(off, decode(eager, prompt, steps)) < 1e-2
    assert close(off, with_a) > 1e-2  # the adapter moved the logits, and turning it off undid that


def test_adapter_switch_between_compiled_steps_of_one_generation(models):
    """Steps of one generation skip dynamo's guards once a step has passed them; switching adapters in the middle
    must still reach the next step (here: from one adapter to the other, then off)."""
    eager, compiled = models
    prompt, steps = [2, 7, 1], [8, 2, 8, 1, 8, 2, 5, 3, 9]

    @torch.inference_mode()
    def run(model, switches: dict[int, dict[str, float]]) -> torch.Tensor:
        model.set_adapters({"a": 1.0})
        model.setup_caches(1, len(prompt) + len(steps))
        try:
            model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
            out = []
            for i, t in enumerate(steps):
                if i in switches:
                    model.set_adapters(switches[i])
                out.append(model(torch.tensor([[t]]), input_pos=torch.tensor([len(prompt) + i]))[0, -1])
            return torch.stack(out)
        finally:
            model.clear_caches()

    switches = {3: {"b": 2.0}, 6: {}}
    got, want = run(compiled, switches), run(eager, switches)
    assert close(got, want) < 1e-2
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    unswitched = run(eager, {})
    assert close(want[3:6], unswitched[3:6]) > 1e-2 and close(want[6:], unswitched[6:]) > 1e-2  # each switch mattered


@pytest.mark.parametrize("arch", ["gemma2", "qwen3"])
def test_compiled_decode_of_other_architectures(tmp_path, arch):
    """The compiled step's own one-token attention (products and sums, not SDPA) with gemma2's soft-capped scores
    and sliding-window layers, and qwen3's q/k norms, past gemma2's window of 8."""
    path = make_tiny_arch_gguf(tmp_path / f"{arch}.gguf", arch)
    # a cap of 0.5 bends the tiny model's scores (|s| ~ 1) where the file's 50 would leave them straight
    over = {"attn_softcap": 0.5} if arch == "gemma2" else {}
    eager, _ = load(path, device="cpu", **over)
    compiled, _ = load(path, device="cpu", **over)
    compiled.compile_decode()
    prompt, steps = [1, 5, 9, 2], [7, 3, 11, 4, 8, 6, 10, 12, 13, 2, 5, 7]
    want, got = decode(eager, prompt, steps), decode(compiled, prompt, steps)
    assert close(got, want) < 1e-4  # float32 weights and activations: only the order of the sums differs


def test_adapter_added_and_removed_after_compiled_steps(models):
    """All plans' A/B copies live in one arena the compiled step reads; adding an adapter (new plans, a larger
    arena) and removing it again must reach the compiled step, as a new arena each time."""
    eager, compiled = models
    for m in (eager, compiled):
        m.set_adapters({"a": 1.0})
    prompt, steps = [4, 2, 6], [1, 3, 5, 7]
    decode(compiled, prompt, steps)
    arena = compiled.blk[0].__dict__["_lora_arena"]
    assert all(b.__dict__["_lora_arena"] is arena for b in compiled.blk)  # one tensor for every block
    assert arena.dtype == torch.float16  # the int4 kernels round their input to bfloat16: half A/B lose nothing more
    for m in (eager, compiled):
        m.add_adapter(adapter_on_every_linear(m, 2, 7), "c", 1.5)
        m.set_adapters({"a": 1.0, "c": 1.5})
    got, want = decode(compiled, prompt, steps), decode(eager, prompt, steps)
    assert compiled.blk[0].__dict__["_lora_arena"].numel() > arena.numel()
    assert close(got, want) < 1e-2
    for m in (eager, compiled):
        m.unload_adapter("c")
        m.set_adapters({"a": 1.0})
    got, want = decode(compiled, prompt, steps), decode(eager, prompt, steps)
    assert close(got, want) < 1e-2 and compiled.blk[0].__dict__["_lora_arena"].numel() == arena.numel()


def test_float_model_keeps_a_float32_arena(tmp_path):
    """Float32 weights and activations: the compiled step's A/B stay float32 (the plans' copies are views of the
    arena), and its logits with an adapter match the eager step's to float32 precision."""
    path = make_tiny_arch_gguf(tmp_path / "qwen3.gguf", "qwen3")
    eager, _ = load(path, device="cpu")
    compiled, _ = load(path, device="cpu")
    for m in (eager, compiled):
        m.add_adapter(adapter_on_every_linear(m, 4, 3), "a", 2.0)
    compiled.compile_decode()
    prompt, steps = [1, 5, 9, 2], [7, 3, 11, 4]
    want, got = decode(eager, prompt, steps), decode(compiled, prompt, steps)
    assert close(got, want) < 1e-4  # only the order of the sums differs
    eager.set_adapters({})
    assert close(decode(eager, prompt, steps), want) > 1e-3  # and the adapter moved them
    arena = compiled.blk[0].__dict__["_lora_arena"]
    assert arena.dtype == torch.float32
    plans = compiled.blk[0].__dict__["_group_plans"].values()
    assert all(p.lora.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr() for p in plans)


def test_past_dynamos_recompile_limit_steps_still_run(models, monkeypatch):
    """Each adapter layout is a graph of its own; once dynamo's recompile limit is reached it runs new layouts'
    steps eagerly. The guard-skipping steps of a generation must then take the full check instead of failing."""
    eager, compiled = models
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)  # every graph already made is over it
    for m in (eager, compiled):
        m.add_adapter(adapter_on_every_linear(m, 3, 11), "d", 1.0)  # a layout no graph was made for
        m.set_adapters({"a": 0.5, "d": 1.0})
    try:
        prompt, steps = [3, 3, 1], [2, 9, 4, 4, 7]
        got, want = decode(compiled, prompt, steps), decode(eager, prompt, steps)
        assert close(got, want) < 1e-2
    finally:
        for m in (eager, compiled):
            m.unload_adapter("d")


def engine_logits(model, jobs: list[tuple[list[int], int, dict | None]]) -> list[torch.Tensor]:
    """Each job's logits [max_tokens, V] (prompt, max_tokens, adapters), all added at once to a greedy BatchEngine
    of 4 slots: rows of different lengths, finishing at different steps."""
    engine = BatchEngine(model, 4, 24, prefill_chunk=4)
    owner, got = {}, {}
    emit = engine._emit

    def record(slot, logits, out):
        got.setdefault(owner[slot], []).append(logits.clone())
        emit(slot, logits, out)

    engine._emit = record
    try:
        for i, (prompt, n, sets) in enumerate(jobs):
            owner[engine.add(prompt, SamplingParams(max_tokens=n, temperature=0.0), sets)] = i
        while engine.active:
            engine.step()
    finally:
        engine.close()
    return [torch.stack(got[i]) for i in range(len(jobs))]


def test_compiled_batch_decode_matches_eager_without_recompiling(models):
    """After a warm-up that compiles the two batched graphs (no row uses an adapter; some row does), other row
    counts (1, padded to 2; 3; all 4 cache rows), rows finishing at different steps (padding rows in their slots),
    other per-row adapter sets and scales, and an adapter loaded and unloaded are data: no new graph (each group's
    row adapters are one opaque op). Each row's logits match the eager engine's, which runs only the real rows
    (gathered from their slots) and which tests/infer/test_batch.py checks against each request run alone."""
    eager, compiled = models
    for m in (eager, compiled):
        m.set_adapters({})  # rows name their own adapters
    engine_logits(compiled, [([1, 5, 9], 3, None), ([3, 4], 3, None)])
    engine_logits(compiled, [([1, 5, 9], 3, {"a": 1.0}), ([3, 4], 3, None)])
    before = graphs()
    dec, calls = compiled.__dict__["_decoder"], []
    fn = dec.fn
    # each compiled step's row count, and whether a row used an adapter
    dec.fn = lambda *args: calls.append((args[0].shape[0], args[-1].any)) or fn(*args)
    layouts = [[([2, 7], 3, {"a": 1.0})],
               [([1, 5, 9, 2, 7], 2, None), ([3, 4], 5, {"a": 1.0}), ([8, 8, 1, 2, 3, 4, 5], 4, {"a": 0.5, "b": -2.0})],
               [([6, 1], 4, {"b": 1.0}), ([9], 2, None), ([4, 4, 4], 5, {"a": 2.0}), ([5, 3, 1], 3, {"a": -1.0, "b": 0.5})],
               [([7, 7, 2], 3, None), ([1, 2], 4, None)],
               "load e",  # another adapter (another rank) joins: the structure the old graphs held changed
               [([2, 7], 3, {"e": 1.0}), ([4, 4, 4], 4, {"a": 1.0, "e": 0.5}), ([9], 2, None)]]
    try:
        for jobs in layouts:
            if jobs == "load e":
                for m in (eager, compiled):
                    m.add_adapter(adapter_on_every_linear(m, 5, 23), "e", 0.0)
                continue
            for got, want in zip(engine_logits(compiled, jobs), engine_logits(eager, jobs)):
                # as in the single-sequence tests: the same int4 kernel, fused intermediates may stay float32
                assert close(got, want) < 1e-2
                assert torch.equal(got.argmax(-1), want.argmax(-1))
    finally:
        dec.fn = fn
        for m in (eager, compiled):
            if "e" in m.adapters:
                m.unload_adapter("e")
    assert graphs() == before, "another row count, padding rows, per-row adapter sets or a new adapter compiled a graph"
    counts = {n for n, _ in calls}
    assert {2, 3, 4} <= counts and 1 not in counts  # the steps did run compiled, one row padded to two
    assert {True, False} == {a for _, a in calls}  # steps with and without adapters in use


@torch.inference_mode()
def test_padding_rows_leave_a_freed_slots_kept_cache_alone(models):
    """A compiled batched step pads the rows up to the last busy one (batch_rows): a freed slot between them gets a
    throwaway row, which must write past the tokens the slot keeps for prefix reuse. The sequence that then reuses
    that slot gives the logits of the same request prefilled afresh (eager, tolerance as above)."""
    eager, compiled = models
    for m in (eager, compiled):
        m.set_adapters({})
    engine = BatchEngine(compiled, 3, 24, prefill_chunk=4)
    got = []
    emit = engine._emit
    try:
        engine.add([1, 5, 9], SamplingParams(max_tokens=12, temperature=0.0), None)
        short = engine.add([3, 4, 2], SamplingParams(max_tokens=2, temperature=0.0), {"a": 1.0})
        engine.add([6, 1], SamplingParams(max_tokens=12, temperature=0.0), {"b": 0.5})
        answer = []
        while short in engine.active:
            answer += [t for s, t, _ in engine.step() if s == short and t is not None]
        for _ in range(4):  # padding rows in the freed slot, between the two busy ones
            engine.step()
        turn = [3, 4, 2] + answer + [7]
        slot = engine.add(turn, SamplingParams(max_tokens=4, temperature=0.0), {"a": 1.0})
        assert slot == short and engine.reused(slot) == 4
        engine._emit = lambda s, lg, out: (s == slot and got.append(lg.clone())) or emit(s, lg, out)
        while slot in engine.active:
            engine.step()
    finally:
        engine.close()
    want = engine_logits(eager, [(turn, 4, {"a": 1.0})])[0]
    assert close(torch.stack(got), want) < 1e-2 and torch.equal(torch.stack(got).argmax(-1), want.argmax(-1))
    assert compiled.__dict__["_decoder"].steady is not None  # the steps did run compiled


def test_compiled_steps_keep_prepacked_bf16_weights(tmp_path, monkeypatch):
    """Prepacked bf16 copies (oneDNN's layout; Q8_0 weights' kernel form where the CPU has bf16 dot products, forced
    on here) cannot be graph inputs: a compiled step multiplies by them through one opaque op, so compiling keeps
    them prepacked. Single-sequence and batched compiled steps match the eager model with the same forms. (In this
    module's run this model is compiled after the Q4_0 models: a second quant type in one process, which once gave
    wrong logits through a recompiled embedding dequantizer.)"""
    monkeypatch.setitem(qkernels._prepack, "on", True)
    try:
        torch.ops.mkldnn._linear_pointwise(torch.randn(2, 64).bfloat16(),
                                           qkernels.bf16_form(torch.randn(8, 64).bfloat16()).weight,
                                           None, "none", [], "")
    except (RuntimeError, AttributeError):
        pytest.skip("this torch's oneDNN has no bf16 linear")
    path = make_tiny_gguf(tmp_path / "q8.gguf", qtype="Q8_0")
    eager, _ = load(path, device="cpu", weights="packed")
    compiled, _ = load(path, device="cpu", weights="packed")
    compile_decode(compiled)
    assert qkernels.prepacking()
    prompt, steps = [1, 5, 9, 2], [7, 3, 11, 4]
    got, want = decode(compiled, prompt, steps), decode(eager, prompt, steps)
    assert close(got, want) < 1e-2 and torch.equal(got.argmax(-1), want.argmax(-1))
    jobs = [([1, 5, 9], 3, None), ([3, 4], 4, None), ([8, 2, 6, 1], 2, None)]
    for got, want in zip(engine_logits(compiled, jobs), engine_logits(eager, jobs)):
        assert close(got, want) < 1e-2 and torch.equal(got.argmax(-1), want.argmax(-1))
    plan = compiled.blk[0].__dict__["_group_plans"][("attn_q", "attn_k", "attn_v")]
    assert plan.base.prepacked and plan.base.weight.is_mkldnn
    assert compiled.__dict__["_decoder"].steady is not None  # the steps did run compiled
