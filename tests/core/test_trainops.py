"""toolkit.trainops: training forms of model ops against autograd through the plain ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from toolkit.trainops import swiglu


def test_swiglu_matches_autograd_and_keeps_two_tensors():
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(3, 7, 40, generator=g) * 4).requires_grad_(True)  # * 4: both tails of the sigmoid
    up = torch.randn(3, 7, 40, generator=g).requires_grad_(True)
    gate2, up2 = gate.detach().clone().requires_grad_(True), up.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = swiglu(gate, up)
    ref = F.silu(gate2) * up2
    assert torch.equal(y, ref)  # the same two float32 ops forward
    assert len(saved) == 2  # gate and up; autograd's silu-then-mul keeps three
    w = torch.randn(y.shape, generator=g)
    (y * w).sum().backward()
    (ref * w).sum().backward()
    # the same kernels autograd runs (g * up -> silu_backward; g * silu(gate)), so the same bits
    assert torch.equal(gate.grad, gate2.grad)
    assert torch.equal(up.grad, up2.grad)
    assert torch.autograd.gradcheck(swiglu, (gate.detach().double().requires_grad_(True),
                                             up.detach().double().requires_grad_(True)))
