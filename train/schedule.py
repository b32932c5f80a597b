"""llama.cpp finetune's learning-rate schedule: linear warmup, then cosine decay (optionally with restarts).

The value is a multiplier `sched` in [min_alpha/alpha, 1]; the optimizer's step size is `alpha * sched` and
AdamW's decay is `decay * alpha * sched`, as in ggml's Adam. `iteration` is the optimizer's iteration
counter (1 for the first update), so a resumed run continues the same curve.

Two quirks are kept on purpose so that runs match llama.cpp: without restarts the cosine is evaluated at the
raw iteration (not `iteration - warmup`), and with restarts each cycle's length is truncated to an integer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def cosine_decay(step: int, decay_steps: int, minimum: float) -> float:
    """1 -> `minimum` over `decay_steps`, flat afterwards."""
    step = min(step, decay_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))
    return (1.0 - minimum) * cos + minimum


def cosine_decay_restart(step: int, decay_steps: int, minimum: float, restart_mult: float) -> float:
    """Cosine cycles; each new cycle is `restart_mult` times longer than the last (integer steps)."""
    while step > decay_steps:
        step -= decay_steps
        decay_steps = int(restart_mult * decay_steps)
    return cosine_decay(step, decay_steps, minimum)


@dataclass(frozen=True)
class Schedule:
    alpha: float = 1e-3  # --adam-alpha
    min_alpha: float = 0.0  # --adam-min-alpha: floor of alpha*sched, warmup included
    warmup: int = 100
    cos_decay_steps: int = 1000
    cos_decay_restart: float = 1.1
    cos_decay_min: float = 0.1
    enable_restart: bool = False

    def __call__(self, iteration: int) -> float:
        """The multiplier for optimizer iteration `iteration` (>= 0)."""
        if iteration < self.warmup:
            s = iteration / self.warmup
        elif self.enable_restart:
            s = cosine_decay_restart(iteration - self.warmup, self.cos_decay_steps, self.cos_decay_min,
                                     self.cos_decay_restart)
        else:
            s = cosine_decay(iteration, self.cos_decay_steps, self.cos_decay_min)
        floor = self.min_alpha / self.alpha if self.alpha else 0.0
        return floor + s * (1.0 - floor)

    def lr(self, iteration: int) -> float:
        return self.alpha * self(iteration)
