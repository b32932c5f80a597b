"""A byte-budgeted pool of dequantized weights shared by the packed layers of a model (finetune's
--base-cache-mb).

Training dequantizes every packed weight in forward and again in backward (three times with gradient
checkpointing: forward, recompute, backward). The weights are frozen, so a dequantized copy stays valid: the pool
keeps the most recently used ones up to its budget and drops the least recently used first. Training visits the
layers forward then in reverse, so what a pass used last is what the next pass needs first: with checkpointing, a
budget of one block's weights already serves every backward from its recompute; without it, each pass reuses
about a budget's worth of the previous pass. The values are the dequantized blocks themselves (exact), and the
packed blocks stay the only persistent form of the base.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch


class WeightPool:
    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.used = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[Any, torch.Tensor] = OrderedDict()

    def get(self, key: Any, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor stored under `key`, else make() (kept if it fits the budget, evicting the least recent)."""
        t = self._entries.get(key)
        if t is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return t
        self.misses += 1
        t = make()
        size = t.numel() * t.element_size()
        if size <= self.budget:
            while self.used + size > self.budget:
                _, old = self._entries.popitem(last=False)
                self.used -= old.numel() * old.element_size()
            self._entries[key] = t
            self.used += size
        return t

    def discard(self, owner: Any) -> None:
        """Drop every entry whose key starts with `owner` (a layer that moved or changed mode)."""
        for key in [k for k in self._entries if k[0] is owner]:
            t = self._entries.pop(key)
            self.used -= t.numel() * t.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0


def attach(model: torch.nn.Module, budget_mb: float) -> WeightPool | None:
    """Give every packed linear of `model` one shared pool of `budget_mb` MiB (<= 0: none, blocks are
    dequantized on every use). Returns the pool."""
    from .qlinear import QuantLinear

    pool = WeightPool(int(budget_mb * 2**20)) if budget_mb > 0 else None
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            old = mod.__dict__.get("weight_pool")
            if old is not None:
                old.discard(mod)
            mod.weight_pool = pool
    return pool
