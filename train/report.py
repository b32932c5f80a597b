"""What a run shows and keeps: the per-iteration line and progress bar, the JSONL metrics log, the loss plot.

Only the main process (rank 0) reports: `Progress(enabled=False)` and `say` on other ranks print nothing.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def say(msg: str) -> None:
    if _is_main():
        print(f"finetune: {msg}", file=sys.stderr, flush=True)


def peak_memory(device: torch.device) -> int:
    """This process's peak: CUDA's allocator on a GPU, else the peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def fmt_duration(ms: float) -> str:
    """llama.cpp's print_duration."""
    if ms < 1000:
        return f"{ms:.1f}ms"
    s = int(ms) // 1000
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


class MetricsLog:
    """One JSON object per line, appended (a resumed run continues the same file)."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None

    def write(self, **row: Any) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def plot_losses(path: str, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say(f"--plot {path}: matplotlib is not installed (pip install matplotlib); the losses are in the JSONL log")
        return False
    from toolkit.fileutil import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=100)
    plt.close(fig)
    return True


class Progress:
    """The run's reporting: llama.cpp's per-iteration line (iter, sample, sched, loss, dt, eta), a progress bar
    with loss, tokens/s and peak memory, the JSONL log and the training curve for the plot."""

    def __init__(self, n_iter: int, log_file: str | None, device: torch.device, quiet: bool, enabled: bool = True):
        from tqdm import tqdm

        self.n_iter, self.device, self.quiet, self.enabled = n_iter, device, quiet, enabled
        self.log = MetricsLog(log_file if enabled else None)
        self.bar = tqdm(total=n_iter, desc="finetune", unit="it", dynamic_ncols=True, file=sys.stderr,
                        disable=not enabled)
        self.curve: list[tuple[int, float]] = []
        self.t_start = time.perf_counter()
        self.tokens_seen = 0
        self.ms_per_iter = 0.0
        self.done = 0

    def iteration(self, it: int, loss: float, sched: float, lr: float, dt_ms: float, n_tok: int, tokens: int,
                  epochs: int, sample: tuple[int, int]) -> None:
        """After optimizer iteration `it`: n_tok loss tokens in it (all processes), `tokens` in the run so far
        (the checkpoint's counter), sample = (next sample, samples in the epoch)."""
        self.done += 1
        self.tokens_seen += n_tok
        self.curve.append((it, loss))
        self.ms_per_iter = dt_ms if self.ms_per_iter == 0 else self.ms_per_iter * 0.3 + dt_ms * 0.7  # llama.cpp's
        eta = (self.n_iter - self.done) * self.ms_per_iter
        tps = self.tokens_per_s()
        mem = peak_memory(self.device)
        if not self.enabled:
            return
        if not self.quiet:
            self.bar.write(f"iter={it:6d} sample={min(1 + sample[0], sample[1])}/{sample[1]} "
                           f"sched={sched:.6f} loss={loss:.6f} dt={fmt_duration(self.ms_per_iter)} "
                           f"eta={fmt_duration(eta)}", file=sys.stderr)
        self.bar.set_postfix_str(f"loss={loss:.4f} {tps:.0f} tok/s peak={mem / 2**30:.2f} GiB")
        self.bar.update(1)
        self.log.write(iter=it, loss=loss, sched=sched, lr=lr, epoch=epochs, tokens=tokens, dt_ms=dt_ms, tok_s=tps,
                       peak_mem=mem)

    def validation(self, it: int, loss: float) -> None:
        if self.enabled:
            self.bar.write(f"iter={it:6d} val_loss={loss:.6f}", file=sys.stderr)
        self.log.write(iter=it, val_loss=loss)

    def tokens_per_s(self) -> float:
        elapsed = time.perf_counter() - self.t_start
        return self.tokens_seen / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        self.bar.close()
