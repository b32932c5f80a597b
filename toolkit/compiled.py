"""Decode steps through torch.compile (Transformer.compile_decode, load's compile=True, `--compile`).

A CPU decode step of a small model is as much per-op overhead as weight reading (~50 small ops per layer in eager
mode); inductor fuses the elementwise work (norms, RoPE, SiLU, residuals, LoRA factors) around the weight-only
kernels. Only cached steps of one token per row without autograd are compiled (single sequences, input_pos [1],
and batched steps, input_pos [B, 1]); prefill stays eager. Transformer.forward hands every call to Decoder.step
first, which returns None for the steps it leaves to the eager path.

What keeps the compiled step cheap, and correct without checking everything every step:
* The KV cache is plain tensors (not buffers), so its length is a dynamic dimension, and so is a batch's row
  count: neither recompiles. Batched steps compile in one layout only (rows from cache row 0, at least 2 of them:
  dynamo specializes sizes 0 and 1, all logits; batch_rows pads an engine's steps to it) and without duck sizing.
  A batched step has two graphs: no row uses an adapter, or some row does. In the second, each linear group's
  row adapters are one opaque op (linear_group's toolkit::row_adapters) that runs their eager form, so which
  adapters are loaded, which rows use them and their scales never compile a graph again.
* Plans are refreshed eagerly: the first cached step after a reset (`.to()`, a weight mode, compile_decode) runs
  eager so every kernel weight and group plan exists; after an adapter change (lora.last_version() moved) the
  plans are rebuilt and packed (linear_group.pack_plans) before the compiled step, which reads them unchecked.
* dynamo's ~5,000 guards over every weight, cache and plan cost 0.5-1 ms of a CPU step; within one generation
  nothing they check changes from step to step except positions, which are dynamic. So once a step has passed the
  full check, the next steps with the same caches, adapters, rope tables, grad mode and batch layout skip it
  (torch's skip_guard_eval_unsafe stance, meant for steady-state decoding; it still checks one guard per tensor
  read, which is why plans keep few tensors); any change runs the full check. The stance is process-wide while a
  step runs: run compiled functions from one thread at a time (toolkit serve's model thread does).
* Each single-sequence adapter layout (active set and ranks) is a graph of its own, and graphs of `_forward` are
  shared by every model in the process: the recompile limit goes from 8 to 64. Past it dynamo runs new layouts
  eagerly, and the stance would refuse such a step; the step then takes the full check for the rest of that state.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx.experimental._config
from torch import Tensor, nn

from .linear_group import pack_plans, step_rows
from .lora import last_version


class Decoder:
    """The compiled decode step of one model and its steady-state bookkeeping."""

    def __init__(self, model: nn.Module, options: dict[str, Any]):
        self.model = model
        self.fn = torch.compile(model._forward, dynamic=True, **options)
        self.reset()

    def reset(self) -> None:
        """Weights or their forms changed: the next cached step runs eager (and makes them), then full checks."""
        self.warm = False
        self.steady = None  # the state whose steps skip the guard check
        self.refused = None  # a state whose steps dynamo runs eagerly (recompile limit): always the full check
        self.plans_version = None
        self.marked = None  # the cache epoch whose tensors _mark_static marked

    def step(self, tokens: Tensor, pos: Tensor, input_pos: Tensor | None, n_pos: int, ropes: dict,
             last_only: bool, slots: Tensor | int | None, rows: Any) -> Tensor | None:
        """The step's logits if it is one to compile, else None (the caller runs it eagerly)."""
        m = self.model
        if tokens.shape[1] != 1 or input_pos is None or m.blk[0].kv_cache is None or torch.is_grad_enabled():
            return None
        if not self.warm:
            # one eager step first makes every kernel weight and group plan the compiled step reads, and the next
            # compiled step checks all its guards (whatever reset this state is new to them)
            self.warm = True
            self.steady = self.plans_version = None
            return None
        if self.plans_version != last_version():  # adapters changed, or the eager step made new plans
            pack_plans([m, *m.blk], m.compute_dtype)
            _mark_static(m)
            self.plans_version = last_version()
        if m._cache_epoch != self.marked:  # new caches: their sizes other than the length are constants
            _mark_static(m)
            self.marked = m._cache_epoch
        batch = None
        if input_pos.dim() == 2:
            # one batched layout only: rows from cache row 0 (slots 0, an int: a view of the cache), a dynamic count
            # of at least 2 (dynamo specializes 0 and 1), all logits; batch_rows pads an engine's steps to it
            if last_only is not False or not isinstance(slots, int) or slots != 0 or \
                    (tokens.shape[0] < 2 and m.blk[0].kv_cache.k.shape[0] > 1):
                return None
            # whether any row uses an adapter is structure (a step without adapters skips their work); which
            # adapters, rows and scales are the row_adapters ops' business, outside the graph
            batch = None if rows is None else rows.any
        state = (m._cache_epoch, self.plans_version, tuple(id(t) for cs in ropes.values() for t in cs),
                 torch.is_inference_mode_enabled(), last_only, tokens.dtype, pos.dtype, batch)
        args = (tokens, pos, input_pos, n_pos, ropes, last_only, slots, rows)
        if state == self.steady and state != self.refused:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True), step_rows(rows):
                    return self.fn(*args)
            except RuntimeError as e:  # raised before the step runs: no compiled graph fits it (dynamo's
                if "skip_guard_eval_unsafe" not in str(e):  # recompile limit was reached: it runs such steps eagerly)
                    raise
                self.refused = state
        # no duck sizing while tracing: it would give the row count the symbol of any other dimension of the same
        # size at trace time (a KV head count of 2, a cache length), and the guards that later pin that one would
        # pin the row count too (a graph per row count)
        with torch.fx.experimental._config.patch(use_duck_shape=False), step_rows(rows):
            out = self.fn(*args)
        self.steady = state
        return out


def compile_decode(model: nn.Module, warmup: bool = True, **options: Any) -> Decoder:
    """Compile model's decode steps from now on (see the module docstring). options: passed to torch.compile (e.g.
    mode="max-autotune-no-cudagraphs"). warmup: compile now, on a throwaway decode, rather than in the first
    generation. The first compiled step takes seconds to a minute (inductor caches its output on disk, so later
    processes take a few seconds)."""
    if "mode" not in options:  # torch.compile takes a mode or inductor options, not both
        # inductor re-checks every input's sizes and strides in Python each step, ~800 of them here, which
        # dynamo's guards have already checked: measured 0.5-0.7 ms of a 16 ms step (2 threads)
        options["options"] = {"size_asserts": False, **options.get("options", {})}
    # inductor's note on its own bf16/f16 mix (the Q8_0 embedding's f16 scales), not the user's concern
    warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")
    # every adapter layout (which adapters are active, their ranks) is a graph of its own, and dynamo's default of
    # 8 graphs per function (shared by all models in the process) is soon reached by a server that switches
    # adapters; past the limit steps run eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model.__dict__["_decoder"] = dec = Decoder(model, options)
    if warmup:
        dev = model.output_norm.weight.device
        with torch.inference_mode():
            model.setup_caches(1, 3)
            try:
                for p in range(3):  # prefill, the eager step that makes the kernel weights, a compiled one
                    model(torch.zeros(1, 1, dtype=torch.long, device=dev), input_pos=torch.tensor([p], device=dev))
            finally:
                model.clear_caches()
    return dec


def _mark_static(model: nn.Module) -> None:
    """Under dynamic=True every size of a plain tensor the step reads is a symbol; only the row count, the KV
    cache's length and the rope tables' length vary. Everything else is marked static: the kernel weights of
    the plans and the other dimensions of the KV cache (hundreds of symbols otherwise, as sizes are traced
    without duck sizing: a tiny model's batched graph compiled ~1.5x longer)."""
    mark = torch._dynamo.mark_static
    for owner in (model, *model.blk):
        for plan in owner.__dict__.get("_group_plans", {}).values():
            forms = [f for f in (plan.base, plan.base16) if f is not None and not f.number]  # (numbered: opaque)
            for t in [t for f in forms for t in (f.weight, f.scale_zero)] + [plan.bias]:
                if t is not None:
                    mark(t)
        cache = owner.__dict__.get("kv_cache")
        if cache is not None:
            for t in (cache.k, cache.v):
                for d in (0, 1, 3):  # slots, heads, head size; the length (2) is dynamic
                    mark(t, d)
    for cos_sin in model._rope.values():
        for t in cos_sin:
            mark(t, 1)


def batch_rows(model: nn.Module, slots: list[int]) -> list[int]:
    """The cache rows a batched decode step over `slots` (cache rows, ascending) should run. Eager: `slots`.
    Compiled: every row from 0 to the last of them, at least 2 (where the cache has 2), so that every step has the
    one layout the compiled graph was made for (Decoder.step); the caller fills the rows it adds with throwaway
    tokens at cache positions nothing reads before they are written again. Rows never mix, so a padding row
    cannot change a real row's logits."""
    if model.__dict__.get("_decoder") is None or not slots:
        return slots
    return list(range(min(max(slots[-1] + 1, 2), model.blk[0].kv_cache.k.shape[0])))


def reset(model: nn.Module) -> None:
    """The model's weights or their forms changed (`.to()`, a weight mode): its next cached step runs eager."""
    dec = model.__dict__.get("_decoder")
    if dec is not None:
        dec.reset()
