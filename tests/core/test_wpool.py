"""toolkit.wpool: the byte-budgeted pool of dequantized weights (finetune's --base-cache-mb)."""
from __future__ import annotations

import pytest
import torch

from toolkit import wpool
from toolkit.qlinear import QuantLinear
from toolkit.wpool import WeightPool


def test_pool_keeps_the_most_recent_within_its_budget():
    pool = WeightPool(3 * 400)  # room for three [100] float32 tensors
    made = []

    def make(i):
        made.append(i)
        return torch.full((100,), float(i))

    for i in (0, 1, 2):
        pool.get(("L", i), lambda i=i: make(i))
    assert torch.equal(pool.get(("L", 0), lambda: make(99)), torch.full((100,), 0.0))  # a hit; 0 is now the newest
    pool.get(("L", 3), lambda: make(3))  # evicts 1, the least recently used
    pool.get(("L", 1), lambda: make(1))  # so 1 is made again (evicting 2)
    assert made == [0, 1, 2, 3, 1] and pool.used == 1200 and (pool.hits, pool.misses) == (1, 5)
    big = pool.get(("M", 0), lambda: torch.zeros(1000))  # larger than the whole budget: returned, not kept
    assert big.numel() == 1000 and pool.used == 1200
    pool.discard("L")
    assert pool.used == 0


@pytest.fixture(scope="module")
def tiny_q4_0(tmp_path_factory):
    from tiny import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("wpool") / "m.gguf", qtype="Q4_0", dim=64, ffn=128)


@pytest.mark.parametrize("ckpt", [False, True])
def test_pooled_training_step_is_exact(tiny_q4_0, ckpt):
    """Loss and LoRA gradients with the pool equal those without it, bit for bit (the pool hands out the same
    dequantized values), and with gradient checkpointing every backward reuses its recompute's weights."""
    from toolkit.gguf_io import open_gguf
    from toolkit.model import build

    model = build(open_gguf(tiny_q4_0))  # no tokenizer needed
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_weights = m.use_kernels = False
            m.drop_cache()
    ranks = {n: 4 for n in model.lora_targets() if n.startswith("blk.")}
    params = model.add_trainable_adapter("t", ranks, 8.0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    model.train()
    model.gradient_checkpointing = ckpt
    x = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))

    def step():
        for p in params:
            p.grad = None
        loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    ref_loss, ref_grads = step()
    pool = wpool.attach(model, 1.0)  # 1 MiB: one block's weights (64x64 .. 128x64 float32) and then some
    for _ in range(2):  # the second step starts from what the first left in the pool
        loss, grads = step()
        assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert pool.hits > 0 and pool.used <= pool.budget
    if ckpt:  # forward, recompute, backward per block: at least every backward is a hit
        n_linear = sum(isinstance(m, QuantLinear) for m in model.modules()) - 1  # the head (12 MiB) never fits
        assert pool.hits >= 2 * n_linear
    assert wpool.attach(model, 0) is None and all(
        m.weight_pool is None for m in model.modules() if isinstance(m, QuantLinear))
