"""`toolkit finetune`: train a LoRA adapter on a GGUF base (quantized bases stay packed), llama.cpp's flags.

    toolkit finetune --model-base open-llama-3b-q8_0.gguf --train-data shakespeare.txt \\
        --sample-start "\\n" --escape -c 256 --lora-r 4 --adam-iter 256
    toolkit finetune --nproc 4 ...                       # 4 processes on this machine (DDP over the LoRA)
    torchrun --nproc-per-node 4 -m toolkit.train.finetune ...   # the same; --nnodes / --rdzv-* for more machines

Python: `finetune(FinetuneConfig(model_base=..., train_data=...)) -> FinetuneResult`.

The run follows llama.cpp's finetune: samples cut at --sample-start and reshuffled every epoch, Adam(W) with
warmup + cosine decay, one checkpoint (GGUF) and one adapter (GGUF, llama.cpp loads it) every --save-every
iterations under ITERATION and LATEST names, --adam-iter N more iterations on top of --checkpoint-in.
Stopping (Ctrl-C saves first) and resuming gives the same losses and adapter, bit for bit on CPU.
The steps are in trainer.py; the loss in loss.py; reporting in report.py; many processes in dist.py.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
from typing import Callable

from toolkit.config import parse_config
from toolkit.errors import ToolkitError

from . import memory
from .config import FinetuneConfig, FinetuneResult  # noqa: F401  (the command's types, importable here)

# torch loads with the loop's modules, not with this one: main() sets its allocator's switches first (--huge-pages)


def finetune(cfg: FinetuneConfig, on_iteration: Callable[[int, float], None] | None = None) -> FinetuneResult:
    """Train (or continue training) the LoRA; write checkpoints and adapters as configured. Under torchrun each
    process calls this; they train together and rank 0 writes."""
    from toolkit.model import pick_device

    from . import dist
    from .trainer import finish, prepare, train

    d, device = dist.start(pick_device(cfg.device), cfg.dist_timeout)
    ok, run = False, None
    try:
        with dist.peers_guard(d):
            run = prepare(cfg, d, device)
            train(run, on_iteration)
            result = finish(run)
            ok = True
            return result
    finally:
        # what `run` holds (model, DDP wrapper, optimizer) is freed while the process group still exists: once, in
        # the suite's 2-process L-BFGS test, rank 0 hung in native code as this function returned, after
        # destroy_process_group and its last files, with no Python frame below the caller
        run = None
        gc.collect()
        if ok:
            with dist.peers_guard(d):
                dist.stop(d, clean=True)  # waits for rank 0's last files
        else:
            with contextlib.suppress(Exception):  # the error on its way out is the one to tell
                dist.stop(d, clean=False)


def __getattr__(name: str):
    # the optimizer's helpers, importable from here as before, without loading torch with this module
    if name in ("converged", "make_optimizer", "param_groups"):
        from . import optim

        return getattr(optim, name)
    raise AttributeError(name)


def tokens_per_pass(cfg: FinetuneConfig, world: int) -> int:
    """Tokens in one forward/backward pass of one process: --micro-batch rows, or its share of --batch."""
    rows = cfg.micro_batch if cfg.micro_batch > 0 else math.ceil(cfg.batch / max(world, 1))
    return rows * cfg.ctx


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(FinetuneConfig, argv, prog="toolkit finetune",
                       description="Train a LoRA adapter on a GGUF base model (llama.cpp finetune's options).")
    launching = cfg.nproc > 1 and "LOCAL_RANK" not in os.environ  # not yet under torchrun: start the processes
    world = cfg.nproc if launching else int(os.environ.get("WORLD_SIZE", 1))
    for note in (memory.request_huge_pages(cfg.huge_pages, tokens_per_pass(cfg, world)),  # before torch loads
                 memory.choose_omp_wait(cfg.omp_wait, processes=world if launching else
                                        int(os.environ.get("LOCAL_WORLD_SIZE", 1)))):
        if note:
            print(f"finetune: {note}", file=sys.stderr)
    if launching:
        if cfg.batch < cfg.nproc:
            raise ToolkitError(f"--batch {cfg.batch} is smaller than --nproc {cfg.nproc} (each process trains on its "
                               "share of every batch)")
        from . import dist

        return dist.launch(cfg.nproc, argv, "toolkit.train.finetune")
    result = finetune(cfg)
    return 130 if result.interrupted else 0


if __name__ == "__main__":  # torchrun -m toolkit.train.finetune: errors as one line, as `toolkit finetune`
    from toolkit.cli import run_command

    sys.exit(run_command("toolkit.train.finetune", sys.argv[1:]))
