"""Many processes (torch.distributed): DistributedDataParallel over the LoRA parameters.

One process per device. torchrun (or `toolkit finetune --nproc N`, which starts the same through
torch.distributed.run) sets RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous; a process group is gloo on CPU
and NCCL on CUDA, where rank r of a node takes cuda:LOCAL_RANK. Each process memory-maps the base itself (the
OS shares the pages) and holds the same small LoRA and optimizer state; only the LoRA gradients travel.

Every rank cuts the same global batches (the shuffle is deterministic, cheap, and its state is global) and
trains on its rows of each (`Dist.rows`), so a run sees exactly the samples the single process would, and a
checkpoint of N processes resumes on M. The shares' losses are parts of the whole batch's mean (loss.TokenLoss
with n_total), scaled by the world size because DDP averages gradients: the update is the single process's.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from toolkit.errors import ToolkitError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's rows of an n-row batch: contiguous, sizes differing by at most one."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    # -- collectives (no-ops for one process)
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        if not self.on:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_int(self, v: int) -> int:
        if not self.on:
            return v
        t = torch.tensor([v], dtype=torch.int64, device=self.device)
        dist.broadcast(t, 0)
        return int(t.item())

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's t (same shape and dtype on all), in rank order, on the CPU."""
        if not self.on:
            return [t]
        t = t.to(self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [o.cpu() for o in out]

    def barrier(self) -> None:
        if self.on:
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()


def start(device: torch.device, timeout_s: float) -> tuple[Dist, torch.device]:
    """Join the process group torchrun described in the environment (none: one process). Returns the rank's
    view and its device (cuda:LOCAL_RANK on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    kw = {}
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
        if "device_id" in inspect.signature(dist.init_process_group).parameters:  # torch >= 2.3: eager NCCL init
            kw["device_id"] = device
    else:
        backend, device = "gloo", torch.device(device.type)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kw)
    except (dist.DistError, RuntimeError, ValueError) as e:
        raise ToolkitError(f"rank {rank}: could not join the other processes ({_first_line(e)})") from None
    comm = device if backend == "nccl" else torch.device("cpu")
    return Dist(rank, world, local, comm), device


def stop(d: Dist, clean: bool) -> None:
    """Leave the process group; after a lost peer only the local side is torn down (nothing waits on others)."""
    if d.on and dist.is_initialized():
        if clean:
            d.barrier()
        dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    """The gist of a torch.distributed error: its first sentence, without the C++ source location."""
    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(e).__name__
    return line.split(". ")[0][:300]


def _is_comm_error(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    msg = str(e)
    return any(s in msg for s in ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset", "timed out",
                                  "Timed out", "Broken pipe", "peer"))


@contextlib.contextmanager
def peers_guard(d: Dist) -> Iterator[None]:
    """A lost process (killed, crashed, unreachable past --dist-timeout) becomes one ToolkitError line on each
    survivor instead of a traceback or a hang; other ranks' input errors say which rank they come from."""
    try:
        yield
    except ToolkitError as e:
        if d.on and not d.main:
            raise ToolkitError(f"rank {d.rank}: {e}") from None
        raise
    except (dist.DistError, RuntimeError) as e:
        if not d.on or not _is_comm_error(e):
            raise
        raise ToolkitError(f"rank {d.rank}: another finetune process stopped or stopped answering "
                           f"({_first_line(e)}); the last checkpoint written is intact") from None


def wrap(module: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """DDP over the module's trainable parameters only: the frozen base (parameters and packed buffers,
    memory-mapped in every process) is neither broadcast at the start nor synchronized on each forward."""
    if not d.on:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Accumulating micro-batches: DDP all-reduces only on the last backward of an iteration."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def launch(nproc: int, argv: list[str], module: str) -> int:
    """`toolkit finetune --nproc N ...`: torchrun --standalone --nproc-per-node N -m module argv, in-process."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module", module])
    args.training_script_args = list(argv)  # as given (parsing them here would take --nproc for torchrun's own)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == 1:  # a ToolkitError: the process said why in its own line
            return 1
        how = f"signal {-failure.exitcode}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        raise ToolkitError(f"finetune process {rank} of {nproc} ended with {how}; the last checkpoint written "
                           "is intact") from None
    return 0
