"""llama.cpp finetune's learning schedule: warmup, cosine decay with/without restarts, min alpha."""
from __future__ import annotations

import math

import pytest

from toolkit.train.schedule import Schedule, cosine_decay, cosine_decay_restart


def test_warmup_is_linear_from_zero():
    s = Schedule(warmup=100)
    assert s(0) == 0.0
    assert s(1) == pytest.approx(0.01, abs=1e-12)
    assert s(50) == pytest.approx(0.5, abs=1e-12)


def test_cosine_without_restart_uses_raw_iteration():
    # llama.cpp evaluates cosine_decay(step, ...) at the raw step once warmup is over (not step - warmup)
    s = Schedule(warmup=100, cos_decay_steps=1000, cos_decay_min=0.1)
    expect = 0.9 * 0.5 * (1 + math.cos(math.pi * 100 / 1000)) + 0.1
    assert s(100) == pytest.approx(expect, abs=1e-12)
    assert s(1000) == pytest.approx(0.1, abs=1e-12)
    assert s(5000) == pytest.approx(0.1, abs=1e-12)  # flat after the decay


def test_restarts_grow_by_factor_with_integer_cycles():
    # cycle 1: 10 steps, cycle 2: int(1.5*10)=15, cycle 3: int(1.5*15)=22
    assert cosine_decay_restart(10, 10, 0.0, 1.5) == pytest.approx(0.0, abs=1e-12)
    assert cosine_decay_restart(11, 10, 0.0, 1.5) == pytest.approx(cosine_decay(1, 15, 0.0))
    assert cosine_decay_restart(26, 10, 0.0, 1.5) == pytest.approx(cosine_decay(1, 22, 0.0))
    s = Schedule(warmup=5, cos_decay_steps=10, cos_decay_restart=1.5, cos_decay_min=0.2, enable_restart=True)
    assert s(5) == pytest.approx(1.0)  # step - warmup = 0: the top of the first cycle
    assert s(15) == pytest.approx(0.2)  # end of the first cycle
    assert s(16) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 15)))


def test_min_alpha_is_a_floor_including_warmup():
    s = Schedule(alpha=1e-3, min_alpha=1e-4, warmup=10)
    assert s.lr(0) == pytest.approx(1e-4)
    assert s.lr(5) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert s.lr(10) == pytest.approx(1e-3 * (0.1 + cosine_decay(10, 1000, 0.1) * 0.9))
