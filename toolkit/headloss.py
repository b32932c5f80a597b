"""Cross-entropy through a frozen vocabulary head, chunk by chunk, with the gradient made in the same pass.

The [N, V] logits of a small model's head are its largest activation (V = 49152 for SmolLM2), so they never exist
at once: the head's rows come in chunks (dequantized from packed blocks if need be) and the log-sum-exp is kept
online. The loss is the last node of the graph and the head is frozen, so the gradient with respect to the hidden
states is known up to the incoming scalar as soon as the forward pass ends: it is accumulated online too
(flash-attention style: the running sum of exp(z - running max) @ W_chunk is rescaled when the max moves), and
backward only multiplies it by that scalar. Each chunk's logits are computed once and each chunk of the head is
read (dequantized) once, where recomputing them in backward costs a third more head matmuls and a second pass of
dequantization.
"""
from __future__ import annotations

from typing import Callable

import torch

Rows = Callable[[int, int], torch.Tensor]  # (r0, r1) -> rows [r1 - r0, dim] of the head's weight, in h's dtype


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, rows: Rows, n_vocab: int,  # type: ignore[override]
                step: int, want_grad: bool) -> torch.Tensor:
        n = h.shape[0]
        f32 = h.dtype == torch.float32  # otherwise (bf16/f16 compute) the GEMMs run in h's dtype, the sums in float32
        mx = torch.full((n,), float("-inf"), device=h.device)
        se = torch.zeros(n, device=h.device)
        tgt = torch.zeros(n, device=h.device)
        acc = torch.zeros_like(h, dtype=torch.float32) if want_grad else None  # sum of exp(z - mx) @ W_chunk [N, dim]
        wy = torch.zeros_like(h, dtype=torch.float32) if want_grad else None  # the target's row of W        [N, dim]
        for r0 in range(0, n_vocab, step):
            r1 = min(r0 + step, n_vocab)
            wc = rows(r0, r1)  # [Vc, dim], h's dtype
            z = (h @ wc.t()).float()  # [N, Vc] (float() is a no-op in float32)
            cm = torch.maximum(mx, z.amax(1))
            inside = (y >= r0) & (y < r1)
            local = (y - r0).clamp(0, r1 - r0 - 1)
            tgt = torch.where(inside, z.gather(1, local[:, None])[:, 0], tgt)
            rescale = torch.exp(mx - cm)
            p = z.sub_(cm[:, None]).exp_()  # in place: unnormalised probabilities of this chunk
            se = se * rescale + p.sum(1)
            if want_grad:
                if f32:
                    acc.mul_(rescale[:, None]).addmm_(p, wc)
                else:
                    acc.mul_(rescale[:, None]).add_(p.to(wc.dtype) @ wc)
                idx = inside.nonzero()[:, 0]
                wy[idx] = wc[local[idx]].float()
            mx = cm
        lse = mx + torch.log(se)
        if want_grad:
            ctx.save_for_backward(((acc / se[:, None] - wy) * w[:, None]).to(h.dtype))
        return ((lse - tgt) * w).sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (gh,) = ctx.saved_tensors
        return gh * g, None, None, None, None, None, None


def head_loss(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, rows: Rows, n_vocab: int, step: int) -> torch.Tensor:
    """sum_i w_i * CE(h_i @ W.T, y_i) for h [N, dim], targets y [N], weights w [N] (float32); W (frozen, [n_vocab,
    dim]) is read through `rows` in chunks of `step` rows, in h's dtype. Differentiable with respect to h. With h in
    bf16/f16 the two GEMMs a chunk run in that dtype (as the model's own linears do) and the log-sum-exp, the loss
    and the gradient's sums stay float32."""
    want_grad = torch.is_grad_enabled() and h.requires_grad
    return _HeadLoss.apply(h, y, w, rows, n_vocab, step, want_grad)
