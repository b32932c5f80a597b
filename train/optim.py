"""The optimizer as ggml's: AdamW (decay only on tensors of --adam-decay-min-ndim dimensions) or L-BFGS, and
ggml's stopping tests. These read the optimizer options of a FinetuneConfig (the adam_* / opt_* fields)."""
from __future__ import annotations

from typing import Any

import torch

from .checkpoint import TrainState


def param_groups(params: dict[str, torch.Tensor], cfg: Any) -> list[dict[str, Any]]:
    """AdamW decay only on tensors with ndim >= --adam-decay-min-ndim, as ggml's Adam."""
    decay = [p for p in params.values() if p.ndim >= cfg.adam_decay_min_ndim]
    plain = [p for p in params.values() if p.ndim < cfg.adam_decay_min_ndim]
    groups = [{"params": decay, "weight_decay": cfg.adam_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def make_optimizer(params: dict[str, torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    if cfg.use_lbfgs:
        return torch.optim.LBFGS(list(params.values()), lr=cfg.adam_alpha if cfg.adam_alpha else 1.0, max_iter=1,
                                 history_size=10, line_search_fn="strong_wolfe")
    fused = all(p.device.type == "cuda" for p in params.values())
    return torch.optim.AdamW(param_groups(params, cfg), lr=cfg.adam_alpha, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=1e-8, foreach=not fused, fused=fused or None)


def converged(state: TrainState, loss: float, cfg: Any) -> str:
    """ggml's Adam stopping tests (all off by default). Returns the reason, or ''."""
    reason = ""
    if cfg.adam_epsf > 0 and state.prev_loss == state.prev_loss and loss != 0:
        if abs(loss - state.prev_loss) / abs(loss) < cfg.adam_epsf:
            reason = f"relative loss change below --adam-epsf {cfg.adam_epsf}"
    if cfg.opt_past > 0:
        if len(state.past_losses) >= cfg.opt_past and cfg.opt_delta > 0:
            rate = (state.past_losses[-cfg.opt_past] - loss) / loss if loss else 0.0
            if abs(rate) < cfg.opt_delta:
                reason = reason or f"loss improved less than --opt-delta over {cfg.opt_past} iterations"
        state.past_losses = (state.past_losses + [loss])[-cfg.opt_past:]
    if loss < state.best_loss:
        state.best_loss, state.no_improvement = loss, 0
    else:
        state.no_improvement += 1
        if cfg.opt_max_no_improvement > 0 and state.no_improvement >= cfg.opt_max_no_improvement:
            reason = reason or f"no improvement in {state.no_improvement} iterations"
    state.prev_loss = loss
    return reason
