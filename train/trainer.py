"""The finetune run, in the steps mlx-lm's tuner reads as: prepare (inputs checked first, then the model with
its trainable adapter and the optimizer), resume (a checkpoint's tensors, moments, counters, shuffle and RNG),
train (the loop: step, report, evaluate, save, stop), finish (last evaluation, PEFT folder, plot, summary).

Works the same in one process and in many (dist.py): every rank runs these functions; rank 0 alone writes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from toolkit import wpool
from toolkit.errors import ToolkitError

from . import checkpoint as ck
from . import memory
from .config import FinetuneConfig, FinetuneResult
from .data import Batch, SampleOrder, Samples, eval_batches
from .dist import Dist, no_sync, wrap
from .inputs import Data, load_data, resolve_ranks
from .loss import TokenLoss, batch_loss
from .optim import converged, make_optimizer
from .report import Progress, peak_memory, plot_losses, say
from .schedule import Schedule

ADAPTER = "default"


@dataclass(frozen=True)
class Batching:
    """What cutting batches needs: llama.cpp's batch options and the tokenizer's specials."""
    batch: int
    ctx: int
    bos: int
    eos: int
    n_vocab: int
    separate_with_eos: bool = False
    separate_with_bos: bool = True
    fill_with_next_samples: bool = False
    sample_random_offsets: bool = False

    @classmethod
    def of(cls, cfg: FinetuneConfig, tok: Any, n_vocab: int) -> "Batching":
        return cls(cfg.batch, cfg.ctx, tok.bos_id, tok.eos_id, n_vocab, cfg.separate_with_eos, cfg.separate_with_bos,
                   cfg.fill_with_next_samples, cfg.sample_random_offsets)

    def next(self, order: SampleOrder) -> Batch:
        """The next training batch (the whole batch: every process cuts the same one)."""
        b = order.batch(self.batch, self.ctx, self.bos, self.eos, self.n_vocab, self.separate_with_eos,
                        self.separate_with_bos, self.fill_with_next_samples, self.sample_random_offsets)
        return b if order.samples.pad_loss else b.trimmed()

    def eval(self, samples: Samples, max_batches: int | None = None) -> Iterable[Batch]:
        return eval_batches(samples, self.batch, self.ctx, self.bos, self.eos, self.n_vocab, max_batches,
                            separate_with_eos=self.separate_with_eos, separate_with_bos=self.separate_with_bos,
                            fill_with_next_samples=self.fill_with_next_samples)


@dataclass
class Run:
    """Everything a prepared run holds."""
    cfg: FinetuneConfig
    g: Any  # the base's GGUFFile (memory-mapped)
    model: nn.Module
    loss: nn.Module  # TokenLoss over the model; DistributedDataParallel-wrapped with several processes
    params: dict[str, torch.Tensor]  # 'blk.0.attn_q.weight.lora_a' -> the trainable tensor
    opt: torch.optim.Optimizer
    state: ck.TrainState
    order: SampleOrder
    sched: Schedule
    batching: Batching
    data: Data
    device: torch.device
    dist: Dist
    seed: int
    resolved: dict[str, Any]  # the config as the checkpoint keeps it
    result: FinetuneResult = field(default_factory=lambda: FinetuneResult(iteration=0))
    progress: Progress | None = None

    @property
    def optimizer_type(self) -> str:
        return "lbfgs" if self.cfg.use_lbfgs else "adam"


# ------------------------------------------------------------------------------------------- prepare

def _resolved_seed(seed: int) -> int:
    return int(time.time()) & 0x7FFFFFFF if seed is None or seed < 0 else int(seed)


def _rank_seed(seed: int, rank: int, iteration: int) -> int:
    """Rank r > 0's own torch RNG stream (LoRA dropout): distinct per rank, a function of the run."""
    return (seed * 1_000_003 + rank * 7_919 + iteration) & 0x7FFF_FFFF_FFFF


def lora_tensors(model: nn.Module, ranks: dict[str, int]) -> dict[str, torch.Tensor]:
    """'blk.0.attn_q.weight.lora_a' -> the trainable parameter (A [r, in] / B [out, r], adapter.py's form)."""
    targets = model.lora_targets()
    out: dict[str, torch.Tensor] = {}
    for name in ranks:
        a, b = targets[name].pair(ADAPTER)
        out[name + ".lora_a"], out[name + ".lora_b"] = a, b
    return out


def prepare(cfg: FinetuneConfig, d: Dist, device: torch.device) -> Run:
    """Check every input before any work, then build the model, its trainable adapter and the optimizer; resume
    from --checkpoint-in when it exists."""
    from toolkit.gguf_io import open_gguf
    from toolkit.model import ModelArgs, build, pick_dtype, set_weight_mode
    from toolkit.tokenizer import Tokenizer

    if cfg.ctx <= 0 or cfg.batch <= 0:
        raise ToolkitError("--ctx and --batch must be positive")
    if cfg.micro_batch < 0:
        raise ToolkitError(f"--micro-batch {cfg.micro_batch} must be 0 (whole batches) or a number of rows")
    if cfg.mmap_threshold_mb < 0:
        raise ToolkitError(f"--mmap-threshold-mb {cfg.mmap_threshold_mb:g} must be 0 (glibc's default) or a size in MiB")
    if cfg.batch < d.world:
        raise ToolkitError(f"--batch {cfg.batch} is smaller than the {d.world} processes (each trains on its share "
                           "of every batch: give --batch at least the number of processes)")
    g = open_gguf(cfg.model_base)
    args = ModelArgs.from_gguf(g)
    if cfg.ctx > args.ctx_len:
        raise ToolkitError(f"--ctx {cfg.ctx} is larger than the model's training context {args.ctx_len}",
                           cfg.model_base)
    tok = Tokenizer.from_gguf(g)
    resume_from = None
    if cfg.checkpoint_in and Path(cfg.checkpoint_in).is_file():
        resume_from = ck.load_checkpoint(cfg.checkpoint_in)  # every rank reads the same file
        say(f"resuming from {cfg.checkpoint_in} at iteration {resume_from.state.iteration}")
    else:
        say(f"no checkpoint at {cfg.checkpoint_in!r}: starting from scratch")
    ranks, alpha = _lora_layout(cfg, g, args, resume_from)
    data = load_data(cfg, tok, g.get("tokenizer.ggml.tokens", []))
    for note in data.train.notes:
        say("warning: " + note)
    seed = d.broadcast_int(_resolved_seed(cfg.seed))  # the clock's seed is rank 0's

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu" and cfg.mmap_threshold_mb > 0:
        memory.tune_for_training(int(cfg.mmap_threshold_mb * 2**20))
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(seed)
    model = build(g, dtype, rope_base=cfg.rope_freq_base, rope_scale=cfg.rope_freq_scale, norm_eps=cfg.norm_rms_eps)
    if device.type != "cpu":
        model = model.to(device)
    set_weight_mode(model, "float" if cfg.cache_base else "train", device)
    wpool.attach(model, cfg.base_cache_mb)  # 0: no pool
    model.add_trainable_adapter(ADAPTER, ranks, alpha, cfg.lora_dropout)
    params = lora_tensors(model, ranks)
    model.gradient_checkpointing = cfg.use_checkpointing
    model.train()
    loss = wrap(TokenLoss(model), d, device)  # DDP broadcasts rank 0's initial LoRA (all equal anyway: same seed)
    if d.rank > 0:
        torch.manual_seed(_rank_seed(seed, d.rank, 0))  # a dropout stream of its own
    opt = make_optimizer(params, cfg)
    resolved = dataclasses.asdict(cfg)
    resolved["seed"] = seed
    resolved["lora"] = {"ranks": ranks, "alpha": alpha}
    sched = Schedule(cfg.adam_alpha, cfg.adam_min_alpha, cfg.warmup, cfg.cos_decay_steps, cfg.cos_decay_restart,
                     cfg.cos_decay_min, cfg.enable_restart)
    run = Run(cfg, g, model, loss, params, opt, ck.TrainState(), None, sched,  # type: ignore[arg-type]
              Batching.of(cfg, tok, args.vocab_size), data, device, d, seed, resolved)
    if resume_from is not None:
        resume(run, resume_from)
    run.order = SampleOrder(data.train, seed, run.state.shuffle, cfg.force_reshuffle, say)
    run.state.shuffle = run.order.state
    run.result.iteration = run.state.iteration
    n_params = sum(p.numel() for p in params.values())
    say(f"{len(ranks)} tensors, {n_params:,} trainable parameters; {len(data.train)} samples, "
        f"{len(data.train.tokens)} tokens; ctx {cfg.ctx}, batch {cfg.batch}x{cfg.grad_acc}, device {device}"
        + (f", {d.world} processes" if d.on else "") + _codec_note(model, device))
    return run


def _codec_note(model: nn.Module, device: torch.device) -> str:
    """'; blocks dequantized by libggml|torch' when the base has quantized packed weights: which codec runs them,
    per type where they differ (the types only libggml reads go to it on any device, through a CPU copy)."""
    from toolkit.gguf_io import FLOAT_TYPES
    from toolkit.qlinear import QuantLinear
    from toolkit.quants import dequantizer

    types = {m.qtype for m in model.modules() if isinstance(m, QuantLinear) and m.qtype not in FLOAT_TYPES}
    by = {t: dequantizer(t, device) for t in types}
    if len(set(by.values())) > 1:
        return "; blocks dequantized by " + ", ".join(f"{t.name} {c}" for t, c in sorted(by.items()))
    return f"; blocks dequantized by {next(iter(by.values()))}" if by else ""


def _lora_layout(cfg: FinetuneConfig, g: Any, args: Any, resume_from: ck.Checkpoint | None) -> tuple[dict, float]:
    """(GGUF weight name -> rank, alpha): the checkpoint's when resuming, else from the flags."""
    shapes = {n: t.shape for n, t in g.tensors.items()}
    tied = "output.weight" not in g.tensors
    if resume_from is None:
        return resolve_ranks(cfg, shapes, args.n_layer, tied, cfg.model_base), cfg.lora_alpha
    lora_cfg = resume_from.config.get("lora", {})
    ranks = {k: int(v) for k, v in lora_cfg.get("ranks", {}).items()}
    alpha = float(lora_cfg.get("alpha", cfg.lora_alpha))
    if ranks != resolve_ranks(cfg, shapes, args.n_layer, tied, cfg.model_base) or alpha != cfg.lora_alpha:
        say("the checkpoint's LoRA ranks and alpha are used (they differ from this command's options)")
    missing = [n for n in ranks if n not in shapes]
    if missing:
        raise ToolkitError(f"checkpoint trains '{missing[0]}', which the base model does not have", cfg.checkpoint_in)
    return ranks, alpha


# ------------------------------------------------------------------------------------------- resume

def resume(run: Run, c: ck.Checkpoint) -> None:
    """The checkpoint's LoRA, optimizer moments, counters and RNG (its counters are global: any process count)."""
    ck.check_resume(c, run.params, run.opt, run.cfg.checkpoint_in)
    with torch.no_grad():
        for name, p in run.params.items():
            if name not in c.lora:
                raise ToolkitError(f"checkpoint lacks '{name}'", run.cfg.checkpoint_in)
            p.copy_(c.lora[name].to(p.device, p.dtype))
    if c.optimizer_type != run.optimizer_type:
        say(f"checkpoint used {c.optimizer_type}: starting a fresh optimizer state")
    else:
        try:
            run.opt.load_state_dict(c.optimizer)
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise ToolkitError(f"corrupt optimizer state ({str(e)[:200]})", run.cfg.checkpoint_in) from None
        ck.check_resume(c, run.params, run.opt, run.cfg.checkpoint_in)
    run.state = c.state
    _restore_rng(run, c.rng, c.state.iteration)


def _all_rng(run: Run) -> dict[str, torch.Tensor]:
    """The RNG states a checkpoint keeps (a collective with several processes: every rank calls it). One process:
    checkpoint.rng_state()'s names. Several: rank 0's CPU state as "torch", the others' as "rank{r}.torch", and
    each rank's own CUDA device as "rank{r}.cuda" (never every visible GPU, which would open a context on each)."""
    d = run.dist
    if not d.on:
        return ck.rng_state()
    rng = {"torch": torch.get_rng_state()}
    for r, t in enumerate(d.gather(torch.get_rng_state())):
        if r:
            rng[f"rank{r}.torch"] = t
    if run.device.type == "cuda":
        for r, t in enumerate(d.gather(torch.cuda.get_rng_state(run.device))):
            rng[f"rank{r}.cuda"] = t
    return rng


def _restore_rng(run: Run, rng: dict[str, torch.Tensor], iteration: int) -> None:
    """This rank's RNG from a checkpoint of any process count; a rank the checkpoint did not have (more processes
    now) starts a stream of its own, a function of the seed, its rank and the iteration."""
    r, cuda = run.dist.rank, run.device.type == "cuda"
    if not run.dist.on and "rank0.cuda" not in rng:
        ck.set_rng_state(rng)  # a single process's checkpoint
        return
    cpu = rng.get("torch" if r == 0 else f"rank{r}.torch")
    if cpu is None:
        torch.manual_seed(_rank_seed(run.seed, r, iteration))
        return
    torch.set_rng_state(cpu.to(torch.uint8))
    dev = rng.get(f"rank{r}.cuda", rng.get(f"cuda{run.device.index}") if r == 0 else None)
    if cuda and dev is not None:
        torch.cuda.set_rng_state(dev.to(torch.uint8), run.device)


# ------------------------------------------------------------------------------------------- train

def train_step(run: Run, sched: float) -> tuple[float, int]:
    """One optimizer iteration: grad-acc batches, clipping, the update. Returns (mean loss, loss tokens), both of
    the whole batches (all processes)."""
    cfg, d, device = run.cfg, run.dist, run.device
    lr = cfg.adam_alpha * sched
    for group in run.opt.param_groups:
        group["lr"] = lr if not cfg.use_lbfgs else (cfg.adam_alpha or 1.0)
    batches = [run.batching.next(run.order) for _ in range(cfg.grad_acc)]
    n_tok = sum(b.n_loss_tokens for b in batches)
    # the passes: this rank's rows of each batch in --micro-batch chunks, each with the tokens of the whole batch
    # its loss is a part of (None: the pass is the whole batch)
    shares = [(p, n) for b in batches for p, n in _passes(b, d, cfg.micro_batch)]

    def closure() -> torch.Tensor:
        run.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for i, (b, n) in enumerate(shares):
            with no_sync(run.loss, sync=i == len(shares) - 1):
                loss = run.loss(b, device, n)
                (loss * d.world / cfg.grad_acc).backward()  # DDP averages over the processes: their sum is meant
            total += loss.detach() / cfg.grad_acc
        total = d.sum(total)
        if cfg.adam_gclip > 0 and not cfg.use_lbfgs:  # L-BFGS needs the true gradient of the loss
            torch.nn.utils.clip_grad_norm_(list(run.params.values()), cfg.adam_gclip)
        return total

    if cfg.use_lbfgs:
        loss = run.opt.step(closure)
    else:
        loss = closure()
        run.opt.step()
    return float(loss), n_tok


def _passes(b: Batch, d: Dist, micro: int) -> list[tuple[Batch, int | None]]:
    """(rows, n_total) of each forward/backward pass over batch b: this rank's share of its rows, in chunks of
    `micro` rows (0: the share at once); n_total is b's count of loss tokens, or None when a pass is all of b."""
    share = b.rows(d.rows(b.inputs.shape[0])) if d.on else b
    n = share.inputs.shape[0]
    if n == 0:  # (a last, short evaluation batch may leave a rank nothing)
        return []
    step = micro if 0 < micro < n else n
    if step == b.inputs.shape[0]:
        return [(b, None)]
    return [(share.rows(slice(i, i + step)), b.n_loss_tokens) for i in range(0, n, step)]


@torch.no_grad()
def evaluate(run: Run, samples: Samples, max_batches: int | None = None) -> float:
    """Mean loss per counted token over `samples` (file order); the processes split every batch."""
    model, d = run.model, run.dist
    was = model.training
    model.eval()
    total, count = 0.0, 0
    sums = torch.zeros(2, dtype=torch.float64)
    whole = not d.on and not run.cfg.micro_batch
    for b in run.batching.eval(samples, max_batches):
        if whole:
            loss, n = batch_loss(model, b, run.device)
            total += float(loss) * n
            count += n
            continue
        for piece, _ in _passes(b, d, run.cfg.micro_batch):  # this rank's rows, --micro-batch at a time
            sums[0] += float(TokenLoss(model)(piece, run.device, 1))  # n_total 1: the piece's sum of losses
            sums[1] += piece.n_loss_tokens
    if not whole:
        total, count = (float(v) for v in d.sum(sums).cpu())
    model.train(was)
    return total / max(count, 1)


def save(run: Run) -> None:
    """Checkpoint and adapter under this iteration's and the LATEST names (rank 0 writes; all ranks call it)."""
    cfg, res, it = run.cfg, run.result, run.state.iteration
    write_ck = not cfg.only_write_lora and cfg.checkpoint_out
    rng = _all_rng(run) if write_ck else None
    if not run.dist.main:
        return
    if write_ck:
        snap = ck.Checkpoint({n: p.detach().float().cpu().clone() for n, p in run.params.items()},
                             run.opt.state_dict(), run.optimizer_type, run.state, run.resolved, rng, run.g.arch)
        res.checkpoint_files += ck.save_with_latest(cfg.checkpoint_out, cfg.pattern_fn_it, cfg.fn_latest, it,
                                                    lambda p: ck.save_checkpoint(p, snap))
    if cfg.lora_out:
        from toolkit.adapter import write_gguf_adapter

        adapter = run.model.export_adapter(ADAPTER)
        res.lora_files += ck.save_with_latest(cfg.lora_out, cfg.pattern_fn_it, cfg.fn_latest, it,
                                              lambda p: write_gguf_adapter(adapter, p))


class _StopFlag:
    """First Ctrl-C: finish the iteration, save, stop. Second: interrupt at once."""

    def __init__(self) -> None:
        self.stop = False
        self._old: Any = None

    def __enter__(self) -> "_StopFlag":
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C handling stays Python's
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        say("Ctrl-C: saving a checkpoint after this iteration (press again to abort without saving)")

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def train(run: Run, on_iteration: Callable[[int, float], None] | None = None) -> FinetuneResult:
    """The loop: --adam-iter (or --lbfgs-iter) iterations on top of the checkpoint's count, with reporting,
    validation every --steps-per-eval, a save every --save-every and at the end, and ggml's stopping tests."""
    cfg, state, res, d = run.cfg, run.state, run.result, run.dist
    n_iter = cfg.lbfgs_iter if cfg.use_lbfgs else cfg.adam_iter
    last_save = state.iteration
    tokens_per_iter = cfg.batch * cfg.grad_acc * cfg.ctx
    run.progress = progress = Progress(n_iter, cfg.log_file or None, run.device, cfg.quiet, enabled=d.main)
    with _StopFlag() as flag, contextlib.closing(progress):  # (closed before any error line is printed)
        for _ in range(n_iter):
            t0 = time.perf_counter()
            it = state.iteration + 1
            s = run.sched(it)
            loss, n_tok = train_step(run, s)
            state.iteration = it
            state.tokens += tokens_per_iter
            sh = run.order.state
            progress.iteration(it, loss, s, cfg.adam_alpha * s, (time.perf_counter() - t0) * 1000, n_tok,
                               state.tokens, sh.epochs, (sh.next_sample, sh.sample_count))
            res.losses.append(loss)
            if on_iteration is not None:
                on_iteration(it, loss)
            if not math.isfinite(loss):
                res.stop_reason = "loss is not finite"
                break
            if run.data.val is not None and cfg.steps_per_eval > 0 and it % cfg.steps_per_eval == 0:
                vl = evaluate(run, run.data.val, cfg.val_batches or None)
                res.val_losses.append((it, vl))
                progress.validation(it, vl)
            reason = converged(state, loss, cfg)  # the same on every rank: the loss is the whole batch's
            if cfg.save_every > 0 and it - last_save >= cfg.save_every:
                save(run)
                last_save = it
            if reason:
                res.stop_reason = reason
                break
            if d.any(flag.stop):  # every process stops at the same iteration
                res.interrupted = True
                res.stop_reason = "interrupted"
                break
    if state.iteration > last_save:
        save(run)
    res.iteration = state.iteration
    res.tokens_per_s = progress.tokens_per_s()
    res.peak_mem_bytes = peak_memory(run.device)
    return res


# ------------------------------------------------------------------------------------------- finish

def finish(run: Run) -> FinetuneResult:
    """Final validation and test loss, the PEFT folder, the plot, the summary."""
    cfg, res, state, progress = run.cfg, run.result, run.state, run.progress
    data = run.data
    if data.val is not None and (not res.val_losses or res.val_losses[-1][0] != state.iteration) \
            and not res.interrupted:
        vl = evaluate(run, data.val, cfg.val_batches or None)
        res.val_losses.append((state.iteration, vl))
        say(f"validation loss {vl:.4f}")
        progress.log.write(iter=state.iteration, val_loss=vl)
    if cfg.test and data.test is not None and not res.interrupted:
        tl = evaluate(run, data.test)
        res.test_ppl = math.exp(tl)
        say(f"test loss {tl:.4f}, perplexity {res.test_ppl:.3f}")
        progress.log.write(iter=state.iteration, test_loss=tl, test_ppl=res.test_ppl)
    if run.dist.main:
        if cfg.peft_out:
            from toolkit.adapter import write_peft_adapter

            write_peft_adapter(run.model.export_adapter(ADAPTER), cfg.peft_out, run.g)
            res.peft_dir = cfg.peft_out
        if cfg.plot:
            plot_losses(cfg.plot, progress.curve, res.val_losses)
    if res.losses:
        say(f"done: iteration {state.iteration}, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}, "
            f"{res.tokens_per_s:.0f} tok/s, peak memory {res.peak_mem_bytes / 2**30:.2f} GiB"
            + (f" ({res.stop_reason})" if res.stop_reason else ""))
    for f in res.lora_files[-2:]:
        say(f"adapter: {f}")
    if res.peft_dir:
        say(f"PEFT adapter: {res.peft_dir}/")
    return res
