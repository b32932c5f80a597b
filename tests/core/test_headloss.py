"""toolkit.headloss: the chunked head loss (gradient made in the forward pass) against F.cross_entropy on the full
logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from toolkit.headloss import head_loss


@pytest.mark.parametrize("step", [1000, 96, 7])  # one chunk; uneven chunks; chunks smaller than most maxima move
def test_head_loss_value_and_gradient_equal_cross_entropy(step):
    g = torch.Generator().manual_seed(0)
    n, dim, vocab = 37, 48, 1000
    W = torch.randn(vocab, dim, generator=g) * 0.3
    W[5] *= 20  # one dominant row: the running max jumps late in the pass for some rows
    h = torch.randn(n, dim, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[:3] = torch.tensor([0, vocab - 1, 5])  # first row, last row, the dominant one
    w = (torch.rand(n, generator=g) > 0.3).float()
    h2 = h.detach().clone().requires_grad_(True)
    ref = (F.cross_entropy(h2 @ W.t(), y, reduction="none") * w).sum()
    got = head_loss(h, y, w, lambda r0, r1: W[r0:r1], vocab, step)
    # float32 throughout: only the order of the log-sum-exp's and the gradient's sums differs
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    (got * 0.5).backward()
    (ref * 0.5).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-5 * float(h2.grad.abs().max()))
    with torch.no_grad():  # evaluation: no gradient is accumulated, the value is the same
        torch.testing.assert_close(head_loss(h, y, w, lambda r0, r1: W[r0:r1], vocab, step), got.detach())
