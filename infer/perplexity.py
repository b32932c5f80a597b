"""`toolkit perplexity`: llama-perplexity's strided perplexity of a text file.

The text is tokenized whole (BOS per the vocab), cut into chunks of n_ctx tokens; each chunk is evaluated on
its own (its first token replaced by BOS when the vocab adds one) and only the second half of each chunk is
scored, so every scored token sees at least n_ctx/2 tokens of context. Last line: `PPL = <value>`.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from toolkit.config import arg, parse_config, weights_arg
from toolkit.errors import ToolkitError


@dataclass
class PerplexityConfig:
    model: str = arg(None, "-m", "--model", help="GGUF model file", required=True)
    file: str = arg(None, "-f", "--file", help="text file to score", required=True)
    ctx_size: int = arg(512, "-c", "--ctx-size", help="tokens per chunk")
    chunks: int = arg(-1, "--chunks", help="score at most this many chunks (-1: all)")
    batch_size: int = arg(0, "-b", "--batch-size",
                          help="chunks evaluated together in one forward pass (0: as many as fit 1024 tokens)")
    threads: int = arg(0, "-t", "--threads", help="CPU threads (0: torch's default)")
    device: str = arg("auto", "--device", help="auto, cpu, cuda or mps", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = arg(None, "--dtype", help="compute dtype: f32, f16, bf16")
    weights: str = weights_arg()
    lora: list[str] = arg([], "--lora", action="append", metavar="FILE", help="LoRA adapter, repeatable")
    lora_scaled: list[list[str]] = arg([], "--lora-scaled", action="append", nargs=2, metavar=("FILE", "SCALE"),
                                       help="LoRA adapter with a scale, repeatable")


def chunk_nll(logits: torch.Tensor, targets: torch.Tensor, first: int) -> tuple[float, int]:
    """Sum of -log p(target) over positions first .. n_ctx-2 of one chunk: logits [n_ctx, V], targets [n_ctx]
    (position j predicts targets[j + 1])."""
    lp = torch.log_softmax(logits[first:-1].double(), dim=-1)  # [n_ctx - 1 - first, V]
    tgt = targets[first + 1:].to(lp.device)
    return float(-lp.gather(1, tgt[:, None]).sum()), int(tgt.numel())


@torch.inference_mode()
def perplexity(model, tokens: Sequence[int], n_ctx: int, bos_id: int | None = None, max_chunks: int = -1,
               batch_size: int = 0, progress: bool = True, log=None) -> float:
    """llama-perplexity's figure over `tokens` (already tokenized with BOS as the vocab wants). batch_size: chunks
    scored by one forward pass (a batch of windows; 0: as many as fit 1024 tokens, as llama-perplexity fills its
    n_batch): one pass reads the weights once for all of them, and the figure is the same."""
    n_chunk = len(tokens) // n_ctx
    if max_chunks >= 0:
        n_chunk = min(n_chunk, max_chunks)
    if len(tokens) < 2 * n_ctx or n_chunk < 1:
        raise ToolkitError(f"need at least {2 * n_ctx} tokens for a context of {n_ctx}, the text has {len(tokens)}")
    device = model.output_norm.weight.device
    batch_size = batch_size if batch_size > 0 else max(1, 1024 // n_ctx)
    first = n_ctx // 2
    all_tokens = torch.tensor(tokens[: n_chunk * n_ctx], dtype=torch.long).view(n_chunk, n_ctx)
    nll, count = 0.0, 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_chunk, desc="perplexity", unit="chunk", file=sys.stderr)
    for c0 in range(0, n_chunk, batch_size):
        targets = all_tokens[c0:c0 + batch_size]
        inp = targets.clone()
        if bos_id is not None:
            inp[:, 0] = bos_id
        logits = model(inp.to(device))  # [b, n_ctx, V]
        for b in range(inp.shape[0]):
            s, n = chunk_nll(logits[b], targets[b], first)
            nll, count = nll + s, count + n
        if bar is not None:
            bar.update(inp.shape[0])
            bar.set_postfix(ppl=f"{math.exp(nll / count):.4f}")
        if log is not None:
            log(f"[{c0 + inp.shape[0]}]{math.exp(nll / count):.4f}")
    if bar is not None:
        bar.close()
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> int:
    from toolkit.config import parse_lora_flags
    from toolkit.model import load

    cfg = parse_config(PerplexityConfig, argv, prog="toolkit perplexity", description=__doc__.splitlines()[0])
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    path = Path(cfg.file)
    if not path.is_file():
        raise ToolkitError("text file not found", cfg.file)
    text = path.read_text(encoding="utf-8", errors="replace")
    model, tok = load(cfg.model, device=cfg.device, dtype=cfg.dtype, weights=cfg.weights,
                      adapters=parse_lora_flags(cfg.lora, cfg.lora_scaled))
    ids = tok.encode(text)
    print(f"tokenized {len(ids)} tokens; {len(ids) // cfg.ctx_size} chunks of {cfg.ctx_size}", file=sys.stderr)
    ppl = perplexity(model, ids, cfg.ctx_size, tok.bos_id if tok.add_bos else None, cfg.chunks, cfg.batch_size)
    print(f"PPL = {ppl:.4f}")
    return 0
