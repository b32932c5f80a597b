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

from toolkit.headloss import head_loss

from .data import Batch

Rows = Callable[[int, int], torch.Tensor]


def head_rows(head: nn.Module, dtype: torch.dtype = torch.float32) -> Rows | None:
    """Rows [r0, r1) of the output head's weight in `dtype`, or None when the head is not a plain frozen linear
    (a LoRA on the output, an unknown module): then the loss goes through the model's own logits."""
    from toolkit.qlinear import QuantLinear

    if isinstance(head, QuantLinear):
        if head.cache_weights:
            cached = head.cached_weight(dtype)
            return lambda r0, r1: cached[r0:r1]
        return lambda r0, r1: head._chunk(r0, r1, dtype)
    if isinstance(head, nn.Linear) and not head.weight.requires_grad and head.bias is None:
        return lambda r0, r1: head.weight[r0:r1].to(dtype)
    return None


def chunked_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """Sum of weighted token losses through the chunked head, or None if the model's head does not allow it."""
    dtype = model.compute_dtype  # bf16/f16 compute: the head's GEMMs too, as a model's logits would be
    rows = head_rows(model.output, dtype)
    if rows is None or model.args.final_softcap:
        return None
    h = model.hidden(x).flatten(0, 1).to(dtype)  # [B*T, dim]
    n_vocab = int(model.args.vocab_size)
    # chunks of ~16 MiB of logits and of dequantized head rows (the head is the largest matrix of small models)
    step = max(256, min((1 << 22) // max(h.shape[0], 1), (1 << 22) // h.shape[1]))
    return head_loss(h, y.flatten(), w.flatten().float(), rows, n_vocab, step)


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
