"""The training loss: token cross-entropy over the positions that count, through a vocabulary-chunked head.

The model gives final-norm hidden states (`Transformer.hidden`) and the loss applies the frozen output head to
them a vocabulary chunk at a time, so the [N, V] logits, their softmax and their gradient never exist at once
(for a small model with a large vocabulary they would dominate the memory). A head that is not a plain frozen
linear (a LoRA on `output`) or a final logit softcap goes through `Transformer.head` instead.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batch

Rows = Callable[[int, int], torch.Tensor]


def head_rows(head: nn.Module) -> Rows | None:
    """Rows [r0, r1) of the output head's weight as float32, or None when the head is not a plain frozen linear
    (a LoRA on the output, an unknown module): then the loss goes through the model's own logits."""
    from toolkit.quants import QuantLinear

    if isinstance(head, QuantLinear):
        if head.cache_weights:
            cached = head.cached_weight(torch.float32)
            return lambda r0, r1: cached[r0:r1]
        return lambda r0, r1: head._chunk(r0, r1, torch.float32)
    if isinstance(head, nn.Linear) and not head.weight.requires_grad and head.bias is None:
        return lambda r0, r1: head.weight[r0:r1].float()
    return None


class ChunkedHeadLoss(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W.T, y_i) over vocabulary chunks: the [N, V] logits (and their softmax and
    gradient) never exist at once; backward recomputes each chunk's logits. W is frozen (packed or not)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, rows, n_vocab: int, step: int):  # noqa: ANN001
        n = h.shape[0]
        mx = torch.full((n,), float("-inf"), device=h.device)
        se = torch.zeros(n, device=h.device)
        tgt = torch.zeros(n, device=h.device)
        for r0 in range(0, n_vocab, step):
            r1 = min(r0 + step, n_vocab)
            z = h @ rows(r0, r1).t()  # [N, Vc]
            cm = torch.maximum(mx, z.amax(1))
            se = se * torch.exp(mx - cm) + torch.exp(z - cm[:, None]).sum(1)
            mx = cm
            inside = (y >= r0) & (y < r1)
            tgt = torch.where(inside, z.gather(1, (y - r0).clamp(0, r1 - r0 - 1)[:, None])[:, 0], tgt)
        lse = mx + torch.log(se)
        ctx.save_for_backward(h, y, w, lse)
        ctx.rows, ctx.n_vocab, ctx.step = rows, n_vocab, step
        return ((lse - tgt) * w).sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: ANN001
        h, y, w, lse = ctx.saved_tensors
        gh = torch.zeros_like(h)
        scale = (w * g)[:, None]  # [N, 1]
        for r0 in range(0, ctx.n_vocab, ctx.step):
            r1 = min(r0 + ctx.step, ctx.n_vocab)
            wc = ctx.rows(r0, r1)
            p = torch.exp(h @ wc.t() - lse[:, None])  # softmax rows of this chunk [N, Vc]
            inside = ((y >= r0) & (y < r1)).nonzero()[:, 0]
            p[inside, y[inside] - r0] -= 1.0
            gh += (p * scale) @ wc
        return gh, None, None, None, None, None


def chunked_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """Sum of weighted token losses through the chunked head, or None if the model's head does not allow it."""
    rows = head_rows(model.output)
    if rows is None or model.args.final_softcap:
        return None
    h = model.hidden(x).flatten(0, 1).float()  # [B*T, dim]
    n_vocab = int(model.args.vocab_size)
    # chunks of ~16 MiB of logits and of dequantized head rows (the head is the largest matrix of small models)
    step = max(256, min((1 << 22) // max(h.shape[0], 1), (1 << 22) // h.shape[1]))
    return ChunkedHeadLoss.apply(h, y.flatten(), w.flatten().float(), rows, n_vocab, step)


class TokenLoss(nn.Module):
    """The model's mean loss per counted token of a batch, as a module (DistributedDataParallel wraps this, so
    the LoRA gradients of every rank's share meet in its all-reduce).

    n_total: the tokens that count in the whole batch when `b` is one rank's share of it: the share's loss is
    then its part of the batch's mean (the shares' losses add up to the mean). None: b is the whole batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, b: Batch, device: torch.device, n_total: int | None = None) -> torch.Tensor:
        x = b.inputs.to(device, non_blocking=True)
        y = b.targets.to(device, non_blocking=True)
        w = b.weights.to(device, non_blocking=True)
        n = int(b.weights.sum()) if n_total is None else n_total
        total = chunked_loss(self.model, x, y, w)
        if total is not None:
            return total / max(n, 1)
        logits = self.model(x)  # [B, T, V] float32
        if n_total is None and n == b.weights.numel():
            return F.cross_entropy(logits.flatten(0, 1), y.flatten())
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")  # [B*T]
        return (losses * w.flatten()).sum() / max(n, 1)


def batch_loss(model: nn.Module, b: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the positions that count (llama.cpp: every position of the batch), and their number."""
    return TokenLoss(model)(b, device), b.n_loss_tokens
