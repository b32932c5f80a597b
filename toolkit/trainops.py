"""Training-time forms of model ops that keep fewer activations for backward (same forward values).

SiLU-gated FFN: autograd's silu(gate) * up keeps gate (for silu's backward) plus silu(gate) and up (for the
product's), three [tokens, ffn] tensors per block; `swiglu` keeps gate and up and recomputes the sigmoid in
backward. Without gradient checkpointing those tensors are about a seventh of SmolLM2's activations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        # aten's fused silu backward: four passes over [tokens, ffn] instead of eight written out
        return torch.ops.aten.silu_backward(g * up, gate), g * F.silu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; under autograd, keeps only gate and up for backward."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up
