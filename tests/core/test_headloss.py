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


def test_head_loss_in_bf16_runs_its_gemms_in_bf16_and_its_sums_in_float32():
    """bf16 compute (finetune --dtype bf16): h and the head's rows in bf16. Oracle: the loss and gradient of what a
    bf16 model computes, cross-entropy over the bf16 GEMM's logits upcast to float32 (as transformers does);
    tolerance 2^-7 relative: one bf16 rounding of the logits and of the gradient GEMM's operands (8-bit mantissas)."""
    g = torch.Generator().manual_seed(1)
    n, dim, vocab = 29, 64, 700
    W = (torch.randn(vocab, dim, generator=g) * 0.3).bfloat16()
    h = torch.randn(n, dim, generator=g).bfloat16().requires_grad_(True)
    y = torch.randint(0, vocab, (n,), generator=g)
    w = torch.ones(n)
    h2 = h.detach().clone().requires_grad_(True)
    ref = F.cross_entropy((h2 @ W.t()).float(), y, reduction="sum")
    got = head_loss(h, y, w, lambda r0, r1: W[r0:r1], vocab, 96)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2**-7, atol=0)
    got.backward()
    ref.backward()
    assert h.grad.dtype == torch.bfloat16
    scale = float(h2.grad.float().abs().max())
    torch.testing.assert_close(h.grad.float(), h2.grad.float(), rtol=0, atol=2**-7 * scale)
