"""`toolkit finetune`: train a LoRA adapter on a GGUF base (quantized bases stay packed), llama.cpp's flags.

    toolkit finetune --model-base open-llama-3b-q8_0.gguf --train-data shakespeare.txt \\
        --sample-start "\\n" --escape -c 256 --lora-r 4 --adam-iter 256

Python: `finetune(FinetuneConfig(model_base=..., train_data=...)) -> FinetuneResult`.

The run follows llama.cpp's finetune: samples cut at --sample-start and reshuffled every epoch, Adam(W) with
warmup + cosine decay, one checkpoint (GGUF) and one adapter (GGUF, llama.cpp loads it) every --save-every
iterations under ITERATION and LATEST names, --adam-iter N more iterations on top of --checkpoint-in.
Stopping (Ctrl-C saves first) and resuming gives the same losses and adapter, bit for bit on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# OpenMP threads that spin while waiting turn a busy machine (other jobs on the same cores) into a 5-10x
# slowdown; sleeping waiters cost little when the machine is quiet. Only applies if torch is not loaded yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from toolkit.config import arg, parse_config
from toolkit.errors import ToolkitError
from toolkit import wpool
from toolkit.headloss import head_loss

from . import checkpoint as ck
from .data import (Batch, RecordTokenizer, SampleOrder, Samples, eval_batches, process_escapes, read_records,
                   records_to_samples, split_holdout, tokenize_text)
from .schedule import Schedule

ADAPTER = "default"

# llama.cpp's --rank-* flags -> the GGUF tensors they set (fused checkpoints map onto their parts)
RANK_FLAGS = {
    "rank_tok_embd": ("token_embd",), "rank_out": ("output",),
    "rank_wq": ("attn_q", "attn_qkv"), "rank_wk": ("attn_k",), "rank_wv": ("attn_v",), "rank_wo": ("attn_output",),
    "rank_w1": ("ffn_gate",), "rank_w2": ("ffn_down",), "rank_w3": ("ffn_up",),
}


class _Toggle(argparse.Action):
    """--use-x / --no-x pairs with llama.cpp's spellings (e.g. --use-checkpointing / --no-checkpointing)."""

    def __init__(self, option_strings, dest, off=(), **kw):  # noqa: ANN001
        self.off = set(off)
        kw.pop("type", None)
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        setattr(namespace, self.dest, option_string not in self.off)


def toggle(default: bool, on: str, off: str, help: str) -> Any:
    return arg(default, on, off, help=help, action=_Toggle, off=(off,))


@dataclass
class FinetuneConfig:
    # --- files
    model_base: str = arg(None, "--model-base", "-m", help="GGUF base model (any quantization)", required=True)
    train_data: str | None = arg(None, help="training text (llama.cpp samples) or a local dataset file/folder "
                                            "(.jsonl/.json/.parquet/.csv, save_to_disk)")
    data: str | None = arg(None, help="mlx-lm style folder with train.jsonl (+ valid.jsonl, test.jsonl)")
    val_data: str | None = arg(None, help="validation text/dataset (loss every --steps-per-eval)")
    test_data: str | None = arg(None, help="test text/dataset for --test")
    checkpoint_in: str = arg("checkpoint.gguf", help="checkpoint to resume from (missing: start fresh)")
    checkpoint_out: str = arg("checkpoint-ITERATION.gguf", help="checkpoint to save")
    lora_out: str = arg("ggml-lora-ITERATION-f32.gguf", help="LoRA adapter to save (llama.cpp GGUF adapter)")
    peft_out: str | None = arg(None, help="also write a PEFT adapter folder at the end")
    pattern_fn_it: str = arg("ITERATION", help="pattern in output file names replaced by the iteration")
    fn_latest: str = arg("LATEST", help="string used instead of the iteration for the latest output")
    save_every: int = arg(10, help="save checkpoint and LoRA every N iterations; <= 0 disables")
    only_write_lora: bool = arg(False, "--only-write-lora", help="write only the LoRA, no checkpoints",
                                action="store_true")
    log_file: str | None = arg("finetune-log.jsonl", help="append metrics here as JSON lines ('' for none)")
    plot: str | None = arg(None, help="draw training/validation loss curves to this image (needs matplotlib)")
    # --- data
    sample_start: str = arg("", help="split the text into samples at this string; empty: a sample at every token")
    escape: bool = arg(False, "--escape", help="process escapes (\\n \\r \\t \\' \\\" \\\\) in --sample-start",
                       action="store_true")
    include_sample_start: bool = arg(False, "--include-sample-start", help="keep the sample start in the samples",
                                     action="store_true")
    overlapping_samples: bool = arg(False, "--overlapping-samples", help="samples run on past the next sample "
                                    "start (up to the context)", action="store_true")
    fill_with_next_samples: bool = arg(False, "--fill-with-next-samples", help="follow short samples by the "
                                       "next ones instead of EOS padding", action="store_true")
    separate_with_eos: bool = arg(False, help="with --fill-with-next-samples, put EOS between samples")
    separate_with_bos: bool = arg(True, help="with --fill-with-next-samples, put BOS between samples")
    sample_random_offsets: bool = arg(False, "--sample-random-offsets", help="start samples at random offsets",
                                      action="store_true")
    force_reshuffle: bool = arg(False, "--force-reshuffle", help="reshuffle at start instead of resuming the "
                                "checkpoint's order", action="store_true")
    mask_prompt: bool = arg(True, help="records: the loss counts only completions / assistant turns")
    val_split: float = arg(0.0, help="hold out this fraction of the training samples for validation")
    steps_per_eval: int = arg(0, help="validation loss every N iterations (0: only at the end)")
    val_batches: int = arg(0, help="batches per validation (0: all)")
    test: bool = arg(False, "--test", help="report test perplexity at the end", action="store_true")
    # --- model / LoRA
    ctx: int = arg(128, "-c", "--ctx", help="context (tokens per sample)")
    rope_freq_base: float | None = arg(None, help="override the model's RoPE base")
    rope_freq_scale: float | None = arg(None, help="override the model's RoPE frequency scale")
    norm_rms_eps: float | None = arg(None, help="override the model's RMS norm epsilon")
    lora_r: int = arg(4, help="default LoRA rank")
    lora_alpha: float = arg(4.0, help="LoRA alpha (scale = alpha / rank)")
    rank_tok_embd: int | None = arg(None, help="rank of token_embd (default: --lora-r; none for tied embeddings, "
                                               "which llama.cpp cannot apply)")
    rank_out: int | None = arg(None, help="rank of output (default: --lora-r; none for tied embeddings)")
    rank_wq: int | None = arg(None, help="rank of attn_q (default: --lora-r)")
    rank_wk: int | None = arg(None, help="rank of attn_k (default: --lora-r)")
    rank_wv: int | None = arg(None, help="rank of attn_v (default: --lora-r)")
    rank_wo: int | None = arg(None, help="rank of attn_output (default: --lora-r)")
    rank_w1: int | None = arg(None, help="rank of ffn_gate (default: --lora-r)")
    rank_w2: int | None = arg(None, help="rank of ffn_down (default: --lora-r)")
    rank_w3: int | None = arg(None, help="rank of ffn_up (default: --lora-r)")
    rank_att_norm: int = arg(0, help="norm LoRA: llama.cpp's adapter loader ignores norms, so only 0 is accepted")
    rank_ffn_norm: int = arg(0, help="see --rank-att-norm")
    rank_out_norm: int = arg(0, help="see --rank-att-norm")
    lora_dropout: float = arg(0.0, help="dropout on the LoRA input")
    lora_layers: int | None = arg(None, help="train only the last N blocks")
    target: list[str] = arg([], help="train only these tensors (attn_q, ffn_down, token_embd, output, ...)")
    # --- optimizer
    use_lbfgs: bool = toggle(False, "--use-lbfgs", "--use-adam", "optimizer: L-BFGS or Adam (default)")
    lbfgs_iter: int = arg(256, help="L-BFGS iterations")
    adam_iter: int = arg(256, help="Adam iterations in this run (continuing the checkpoint's count)")
    adam_alpha: float = arg(1e-3, help="Adam learning rate")
    adam_min_alpha: float = arg(0.0, help="minimum learning rate, warmup included")
    adam_decay: float = arg(0.1, help="AdamW weight decay (0: plain Adam)")
    adam_decay_min_ndim: int = arg(2, help="decay only tensors with at least this many dimensions")
    adam_beta1: float = arg(0.9, help="Adam beta1")
    adam_beta2: float = arg(0.999, help="Adam beta2")
    adam_gclip: float = arg(1.0, help="gradient clipping (global norm); 0 disables")
    adam_epsf: float = arg(0.0, help="stop when the relative loss change is below this; 0 disables")
    warmup: int = arg(100, help="warmup iterations")
    cos_decay_steps: int = arg(1000, help="cosine decay iterations")
    cos_decay_restart: float = arg(1.1, help="growth of the cosine cycle after each restart")
    cos_decay_min: float = arg(0.1, help="cosine decay minimum")
    enable_restart: bool = toggle(False, "--enable-restart", "--disable-restart", "restart the cosine decay")
    opt_past: int = arg(0, help="iterations looked back for the delta convergence test; 0 disables")
    opt_delta: float = arg(1e-5, help="delta for the convergence test")
    opt_max_no_improvement: int = arg(0, help="stop after N iterations without a new best loss; 0 disables")
    batch: int = arg(8, "-b", "--batch", help="samples per batch")
    grad_acc: int = arg(1, help="gradient accumulation steps (effective batch = batch * grad-acc)")
    # --- performance
    threads: int | None = arg(None, "-t", "--threads", help="CPU threads (default: torch's)")
    use_checkpointing: bool = toggle(True, "--use-checkpointing", "--no-checkpointing", "gradient checkpointing")
    cache_base: bool = arg(False, help="keep a dequantized float copy of a quantized base: faster on CPU, but the base "
                                       "then takes float memory (default: it stays packed in its GGUF blocks)")
    base_cache_mb: float = arg(0.0, help="MiB of recently dequantized base weights to reuse (forward -> backward, "
                                         "recompute -> backward; exact values); 0: dequantize on every use")
    use_flash: bool = toggle(True, "--use-flash", "--no-flash", "fused attention (PyTorch SDPA picks the kernel)")
    device: str = arg("auto", help="auto | cpu | cuda | mps")
    dtype: str | None = arg(None, help="compute dtype of the base (f32 | bf16 | f16; default f32 on CPU)")
    seed: int = arg(-1, "-s", "--seed", help="RNG seed (-1: from the clock)")
    quiet: bool = arg(False, "--quiet", help="no per-iteration lines (the progress bar stays)", action="store_true")


@dataclass
class FinetuneResult:
    iteration: int  # optimizer iterations done in total (checkpoint's + this run's)
    losses: list[float] = field(default_factory=list)  # training loss per iteration of this run
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    test_ppl: float | None = None
    lora_files: list[str] = field(default_factory=list)
    checkpoint_files: list[str] = field(default_factory=list)
    peft_dir: str | None = None
    tokens_per_s: float = 0.0
    peak_mem_bytes: int = 0
    interrupted: bool = False
    stop_reason: str = ""


# ------------------------------------------------------------------------------------------- preparation

def say(msg: str) -> None:
    print(f"finetune: {msg}", file=sys.stderr, flush=True)


def _resolve_ranks(cfg: FinetuneConfig, shapes: dict[str, tuple[int, ...]], n_layer: int, tied: bool,
                   path: str) -> dict[str, int]:
    """GGUF weight name -> rank, from --lora-r, --rank-*, --target and --lora-layers; checked against shapes."""
    for flag in ("rank_att_norm", "rank_ffn_norm", "rank_out_norm"):
        if getattr(cfg, flag):
            raise ToolkitError(f"--{flag.replace('_', '-')}: llama.cpp's adapter loader ignores norm LoRA, so "
                               "toolkit does not train it (use 0)")
    per_kind: dict[str, int] = {}
    for flag, kinds in RANK_FLAGS.items():
        r = getattr(cfg, flag)
        for k in kinds:
            per_kind[k] = cfg.lora_r if r is None else int(r)
    targets = {t.removesuffix(".weight") for t in cfg.target}
    known = set(per_kind)
    bad = [t for t in targets if t not in known and not t.startswith("blk.")]
    if bad:
        raise ToolkitError(f"--target: unknown tensor kind(s) {', '.join(sorted(bad))} (use {', '.join(sorted(known))})")
    first = n_layer - cfg.lora_layers if cfg.lora_layers else 0
    ranks: dict[str, int] = {}
    for name in shapes:
        if not name.endswith(".weight"):
            continue
        stem = name[:-7]
        kind = stem.split(".")[-1]
        if kind not in per_kind or (kind == "output" and tied):
            continue
        if kind == "token_embd" and tied:
            # llama.cpp looks up the tied output's LoRA by the same tensor, so a token_embd LoRA would be
            # applied to the output matmul too, where its shapes abort the graph: never train it there
            if cfg.rank_tok_embd or "token_embd" in targets:
                raise ToolkitError("token_embd LoRA on a model with tied output embeddings cannot be used by "
                                   "llama.cpp (it would apply it to the output too): drop --rank-tok-embd/--target "
                                   "token_embd", path)
            continue
        if stem.startswith("blk."):
            if int(stem.split(".")[1]) < first:
                continue
        elif cfg.lora_layers and kind != "output":
            continue  # --lora-layers: blocks only (plus the head, as mlx-lm's last layers)
        if targets and kind not in targets and stem not in targets:
            continue
        r = per_kind[kind]
        if r <= 0:
            continue
        lim = min(shapes[name])
        if r > lim:
            raise ToolkitError(f"LoRA rank {r} is larger than tensor '{name}' allows ({list(shapes[name])}: at most "
                               f"{lim})", path)
        ranks[name] = r
    if not ranks:
        raise ToolkitError("no tensors to train (check --target / --rank-* / --lora-layers)")
    return ranks


@dataclass
class Data:
    train: Samples
    val: Samples | None
    test: Samples | None


def _max_token_bytes(tokens: list[str]) -> int:
    return max((len(t.encode("utf-8")) for t in tokens), default=1)


def _is_text_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() not in (".jsonl", ".json", ".parquet", ".csv", ".arrow")


def load_data(cfg: FinetuneConfig, tok: Any, token_texts: list[str]) -> Data:
    """All data read and tokenized up front, so bad input fails before the model is built."""
    rt = RecordTokenizer(tok, cfg.mask_prompt)
    sample_start = process_escapes(cfg.sample_start) if cfg.escape else cfg.sample_start
    max_tb = _max_token_bytes(token_texts)

    def text_samples(path: str) -> Samples:
        p = Path(path)
        if not p.exists():
            raise ToolkitError("no such file", path)
        data = p.read_bytes()
        return tokenize_text(data, lambda t: tok.encode(t, add_bos=False, special=False), cfg.ctx, sample_start,
                             cfg.include_sample_start, cfg.overlapping_samples, max_tb, path)

    def any_samples(path: str, split: str = "train") -> Samples:
        if _is_text_file(Path(path)):
            return text_samples(path)
        return records_to_samples(read_records(path, split), rt, cfg.ctx, path)

    if cfg.data:
        d = Path(cfg.data)
        if not (d / "train.jsonl").is_file():
            raise ToolkitError("no train.jsonl in the --data folder", str(d))
        train = records_to_samples(read_records(d / "train.jsonl"), rt, cfg.ctx, str(d / "train.jsonl"))
        val = records_to_samples(read_records(d / "valid.jsonl"), rt, cfg.ctx, str(d / "valid.jsonl")) \
            if (d / "valid.jsonl").is_file() else None
        test = records_to_samples(read_records(d / "test.jsonl"), rt, cfg.ctx, str(d / "test.jsonl")) \
            if (d / "test.jsonl").is_file() else None
    elif cfg.train_data:
        train = any_samples(cfg.train_data)
        val = test = None
        p = Path(cfg.train_data)
        if p.is_dir() and ((p / "dataset_dict.json").exists()):  # a DatasetDict: its own splits
            import datasets

            splits = datasets.load_from_disk(str(p))
            if "validation" in splits:
                val = records_to_samples([dict(r) for r in splits["validation"]], rt, cfg.ctx, str(p))
            if "test" in splits:
                test = records_to_samples([dict(r) for r in splits["test"]], rt, cfg.ctx, str(p))
    else:
        raise ToolkitError("no training data: give --train-data FILE or --data DIR")
    if cfg.val_data:
        val = any_samples(cfg.val_data)
    if cfg.test_data:
        test = any_samples(cfg.test_data)
    if val is None and cfg.val_split > 0:
        train, val = split_holdout(train, cfg.val_split)
    if cfg.test and test is None:
        raise ToolkitError("--test needs test data (--test-data FILE or test.jsonl in --data)")
    return Data(train, val, test)


# ------------------------------------------------------------------------------------------- the LoRA

def _lora_tensors(model: torch.nn.Module, ranks: dict[str, int]) -> dict[str, torch.Tensor]:
    """'blk.0.attn_q.weight.lora_a' -> the trainable parameter (A [r, in] / B [out, r], adapter.py's form)."""
    targets = model.lora_targets()
    out: dict[str, torch.Tensor] = {}
    for name in ranks:
        a, b = targets[name].pair(ADAPTER)
        out[name + ".lora_a"], out[name + ".lora_b"] = a, b
    return out


def _setup_packed_base(model: torch.nn.Module, cache: bool) -> None:
    """The quantized linears stay packed (unless --cache-base) and dequantize block rows on every use, forward
    and backward, in chunks small enough that transients do not dominate."""
    from toolkit.qlinear import QuantLinear

    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.cache_weights = cache
            mod.use_kernels = False  # training computes in float from the blocks, as the exported adapter assumes
            mod.drop_cache()


def _param_groups(params: dict[str, torch.Tensor], cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW decay only on tensors with ndim >= --adam-decay-min-ndim, as ggml's Adam."""
    decay = [p for p in params.values() if p.ndim >= cfg.adam_decay_min_ndim]
    plain = [p for p in params.values() if p.ndim < cfg.adam_decay_min_ndim]
    groups = [{"params": decay, "weight_decay": cfg.adam_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def make_optimizer(params: dict[str, torch.Tensor], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.use_lbfgs:
        return torch.optim.LBFGS(list(params.values()), lr=cfg.adam_alpha if cfg.adam_alpha else 1.0, max_iter=1,
                                 history_size=10, line_search_fn="strong_wolfe")
    fused = all(p.device.type == "cuda" for p in params.values())
    return torch.optim.AdamW(_param_groups(params, cfg), lr=cfg.adam_alpha, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=1e-8, foreach=not fused, fused=fused or None)


def _head_weight(head: torch.nn.Module) -> Callable[[int, int], torch.Tensor] | None:
    """Rows [r0, r1) of the output head's weight as float32, or None when the head is not a plain frozen linear
    (a LoRA on the output, an unknown module): then the loss goes through the model's own logits."""
    from toolkit.qlinear import QuantLinear

    if isinstance(head, QuantLinear):
        if head.cache_weights:
            cached = head.cached_weight(torch.float32)
            return lambda r0, r1: cached[r0:r1]
        return lambda r0, r1: head._chunk(r0, r1, torch.float32)
    if isinstance(head, torch.nn.Linear) and not head.weight.requires_grad and head.bias is None:
        return lambda r0, r1: head.weight[r0:r1].float()
    return None


def _chunked_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """Sum of weighted token losses through the chunked head, or None if the model's head does not allow it."""
    head = getattr(model, "output", None)
    rows = _head_weight(head) if head is not None else None
    if rows is None or getattr(model.args, "final_softcap", 0.0):
        return None
    model.output = torch.nn.Identity()  # the model's forward then returns the final normed hidden states
    try:
        h = model(x)  # [B, T, dim]
    finally:
        model.output = head
    h = h.flatten(0, 1).float()
    n_vocab = int(model.args.vocab_size)
    # chunks of ~16 MiB of logits and of dequantized head rows (the head is the largest matrix of small models)
    step = max(256, min((1 << 22) // max(h.shape[0], 1), (1 << 22) // h.shape[1]))
    return head_loss(h, y.flatten(), w.flatten().float(), rows, n_vocab, step)


def batch_loss(model: torch.nn.Module, b: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the positions that count (llama.cpp: every position of the batch)."""
    x = b.inputs.to(device, non_blocking=True)
    y = b.targets.to(device, non_blocking=True)
    w = b.weights.to(device, non_blocking=True)
    n = int(b.weights.sum())
    total = _chunked_loss(model, x, y, w)
    if total is not None:
        return total / max(n, 1), n
    logits = model(x)  # [B, T, V] float32
    if n == b.weights.numel():
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    else:
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")  # [B*T]
        loss = (losses * w.flatten()).sum() / max(n, 1)
    return loss, n


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: Samples, cfg: FinetuneConfig, tok: Any, n_vocab: int,
             device: torch.device, max_batches: int | None = None) -> float:
    """Mean loss per counted token over `samples` (file order)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in eval_batches(samples, cfg.batch, cfg.ctx, tok.bos_id, tok.eos_id, n_vocab, max_batches,
                          separate_with_eos=cfg.separate_with_eos, separate_with_bos=cfg.separate_with_bos,
                          fill_with_next_samples=cfg.fill_with_next_samples):
        loss, n = batch_loss(model, b, device)
        total += float(loss) * n
        count += n
    model.train(was)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------- reporting

def peak_memory(device: torch.device) -> int:
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


def converged(state: ck.TrainState, loss: float, cfg: FinetuneConfig) -> str:
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


# ------------------------------------------------------------------------------------------- the run

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


def _resolved_seed(seed: int) -> int:
    return int(time.time()) & 0x7FFFFFFF if seed is None or seed < 0 else int(seed)


def finetune(cfg: FinetuneConfig, on_iteration: Callable[[int, float], None] | None = None) -> FinetuneResult:
    """Train (or continue training) the LoRA; write checkpoints and adapters as configured."""
    from toolkit.gguf_io import open_gguf
    from toolkit.model import ModelArgs, build, pick_device, pick_dtype
    from toolkit.tokenizer import Tokenizer

    # ---- everything that can be wrong with the input, before any work
    if cfg.ctx <= 0 or cfg.batch <= 0:
        raise ToolkitError("--ctx and --batch must be positive")
    g = open_gguf(cfg.model_base)
    args = ModelArgs.from_gguf(g)
    if cfg.ctx > args.ctx_len:
        raise ToolkitError(f"--ctx {cfg.ctx} is larger than the model's training context {args.ctx_len}",
                           cfg.model_base)
    tok = Tokenizer.from_gguf(g)
    resume = None
    if cfg.checkpoint_in and Path(cfg.checkpoint_in).is_file():
        resume = ck.load_checkpoint(cfg.checkpoint_in)
        say(f"resuming from {cfg.checkpoint_in} at iteration {resume.state.iteration}")
    else:
        say(f"no checkpoint at {cfg.checkpoint_in!r}: starting from scratch")
    shapes = {n: t.shape for n, t in g.tensors.items()}
    tied = "output.weight" not in g.tensors
    if resume is not None:
        lora_cfg = resume.config.get("lora", {})
        ranks = {k: int(v) for k, v in lora_cfg.get("ranks", {}).items()}
        alpha = float(lora_cfg.get("alpha", cfg.lora_alpha))
        if ranks != _resolve_ranks(cfg, shapes, args.n_layer, tied, cfg.model_base) or alpha != cfg.lora_alpha:
            say("the checkpoint's LoRA ranks and alpha are used (they differ from this command's options)")
        missing = [n for n in ranks if n not in shapes]
        if missing:
            raise ToolkitError(f"checkpoint trains '{missing[0]}', which the base model does not have", cfg.checkpoint_in)
    else:
        ranks = _resolve_ranks(cfg, shapes, args.n_layer, tied, cfg.model_base)
        alpha = cfg.lora_alpha
    data = load_data(cfg, tok, g.get("tokenizer.ggml.tokens", []))
    for note in data.train.notes:
        say("warning: " + note)
    n_vocab = args.vocab_size
    seed = _resolved_seed(cfg.seed)

    # ---- model + adapter
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(seed)
    model = build(g, dtype, rope_base=cfg.rope_freq_base, rope_scale=cfg.rope_freq_scale, norm_eps=cfg.norm_rms_eps)
    _setup_packed_base(model, cfg.cache_base)
    wpool.attach(model, cfg.base_cache_mb)
    if device.type != "cpu":
        model = model.to(device)
    model.add_trainable_adapter(ADAPTER, ranks, alpha, cfg.lora_dropout)
    params = _lora_tensors(model, ranks)
    model.gradient_checkpointing = cfg.use_checkpointing
    model.train()
    opt = make_optimizer(params, cfg)
    state = ck.TrainState()
    if resume is not None:
        with torch.no_grad():
            for name, p in params.items():
                if name not in resume.lora:
                    raise ToolkitError(f"checkpoint lacks '{name}'", cfg.checkpoint_in)
                p.copy_(resume.lora[name].to(p.device, p.dtype))
        if resume.optimizer_type != ("lbfgs" if cfg.use_lbfgs else "adam"):
            say(f"checkpoint used {resume.optimizer_type}: starting a fresh optimizer state")
        else:
            opt.load_state_dict(resume.optimizer)
        state = resume.state
        ck.set_rng_state(resume.rng)
    order = SampleOrder(data.train, seed, state.shuffle, cfg.force_reshuffle, say)
    state.shuffle = order.state
    sched = Schedule(cfg.adam_alpha, cfg.adam_min_alpha, cfg.warmup, cfg.cos_decay_steps, cfg.cos_decay_restart,
                     cfg.cos_decay_min, cfg.enable_restart)
    resolved = dataclasses.asdict(cfg)
    resolved["seed"] = seed
    resolved["lora"] = {"ranks": ranks, "alpha": alpha}
    n_params = sum(p.numel() for p in params.values())
    say(f"{len(ranks)} tensors, {n_params:,} trainable parameters; {len(data.train)} samples, "
        f"{len(data.train.tokens)} tokens; ctx {cfg.ctx}, batch {cfg.batch}x{cfg.grad_acc}, device {device}")

    # ---- saving
    result = FinetuneResult(iteration=state.iteration)
    log = MetricsLog(cfg.log_file or None)

    def save() -> None:
        it = state.iteration
        if not cfg.only_write_lora and cfg.checkpoint_out:
            snap = ck.Checkpoint({n: p.detach().float().cpu().clone() for n, p in params.items()}, opt.state_dict(),
                                 "lbfgs" if cfg.use_lbfgs else "adam", state, resolved, ck.rng_state(), g.arch)
            result.checkpoint_files += ck.save_with_latest(cfg.checkpoint_out, cfg.pattern_fn_it, cfg.fn_latest, it,
                                                           lambda p: ck.save_checkpoint(p, snap))
        if cfg.lora_out:
            from toolkit.adapter import write_gguf_adapter

            adapter = model.export_adapter(ADAPTER)
            result.lora_files += ck.save_with_latest(cfg.lora_out, cfg.pattern_fn_it, cfg.fn_latest, it,
                                                     lambda p: write_gguf_adapter(adapter, p))

    # ---- the loop
    n_iter = cfg.lbfgs_iter if cfg.use_lbfgs else cfg.adam_iter
    first_iter = state.iteration
    last_save = first_iter
    tokens_per_iter = cfg.batch * cfg.grad_acc * cfg.ctx
    ms_per_iter = 0.0
    train_curve: list[tuple[int, float]] = []
    t_start = time.perf_counter()
    tokens_seen = 0
    from tqdm import tqdm

    bar = tqdm(total=n_iter, desc="finetune", unit="it", dynamic_ncols=True, file=sys.stderr)
    with _StopFlag() as flag:
        for step in range(n_iter):
            t0 = time.perf_counter()
            it = state.iteration + 1
            s = sched(it)
            loss_value, n_tok = _train_step(model, opt, order, cfg, s, tok, n_vocab, device, params)
            state.iteration = it
            state.tokens += tokens_per_iter
            tokens_seen += n_tok
            dt = (time.perf_counter() - t0) * 1000
            ms_per_iter = dt if ms_per_iter == 0 else ms_per_iter * 0.3 + dt * 0.7  # llama.cpp's smoothing
            eta = (n_iter - step - 1) * ms_per_iter
            result.losses.append(loss_value)
            train_curve.append((it, loss_value))
            elapsed = time.perf_counter() - t_start
            tps = tokens_seen / elapsed if elapsed > 0 else 0.0
            mem = peak_memory(device)
            sh = order.state
            if not cfg.quiet:
                bar.write(f"iter={it:6d} sample={min(1 + sh.next_sample, sh.sample_count)}/{sh.sample_count} "
                          f"sched={s:.6f} loss={loss_value:.6f} dt={fmt_duration(ms_per_iter)} "
                          f"eta={fmt_duration(eta)}", file=sys.stderr)
            bar.set_postfix_str(f"loss={loss_value:.4f} {tps:.0f} tok/s peak={mem / 2**30:.2f} GiB")
            bar.update(1)
            log.write(iter=it, loss=loss_value, sched=s, lr=cfg.adam_alpha * s, epoch=sh.epochs, tokens=state.tokens,
                      dt_ms=dt, tok_s=tps, peak_mem=mem)
            if on_iteration is not None:
                on_iteration(it, loss_value)
            if not math.isfinite(loss_value):
                result.stop_reason = "loss is not finite"
                break
            if data.val is not None and cfg.steps_per_eval > 0 and it % cfg.steps_per_eval == 0:
                vl = evaluate(model, data.val, cfg, tok, n_vocab, device, cfg.val_batches or None)
                result.val_losses.append((it, vl))
                bar.write(f"iter={it:6d} val_loss={vl:.6f}", file=sys.stderr)
                log.write(iter=it, val_loss=vl)
            reason = converged(state, loss_value, cfg)
            if cfg.save_every > 0 and it - last_save >= cfg.save_every:
                save()
                last_save = it
            if reason:
                result.stop_reason = reason
                break
            if flag.stop:
                result.interrupted = True
                result.stop_reason = "interrupted"
                break
    bar.close()
    if state.iteration > last_save:
        save()
    result.iteration = state.iteration
    elapsed = time.perf_counter() - t_start
    result.tokens_per_s = tokens_seen / elapsed if elapsed > 0 else 0.0
    result.peak_mem_bytes = peak_memory(device)
    if data.val is not None and (not result.val_losses or result.val_losses[-1][0] != state.iteration) \
            and not result.interrupted:
        vl = evaluate(model, data.val, cfg, tok, n_vocab, device, cfg.val_batches or None)
        result.val_losses.append((state.iteration, vl))
        say(f"validation loss {vl:.4f}")
        log.write(iter=state.iteration, val_loss=vl)
    if cfg.test and data.test is not None and not result.interrupted:
        tl = evaluate(model, data.test, cfg, tok, n_vocab, device)
        result.test_ppl = math.exp(tl)
        say(f"test loss {tl:.4f}, perplexity {result.test_ppl:.3f}")
        log.write(iter=state.iteration, test_loss=tl, test_ppl=result.test_ppl)
    if cfg.peft_out:
        from toolkit.adapter import write_peft_adapter

        write_peft_adapter(model.export_adapter(ADAPTER), cfg.peft_out, g)
        result.peft_dir = cfg.peft_out
    if cfg.plot:
        plot_losses(cfg.plot, train_curve, result.val_losses)
    if result.losses:
        say(f"done: iteration {state.iteration}, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
            f"{result.tokens_per_s:.0f} tok/s, peak memory {result.peak_mem_bytes / 2**30:.2f} GiB"
            + (f" ({result.stop_reason})" if result.stop_reason else ""))
    for f in result.lora_files[-2:]:
        say(f"adapter: {f}")
    return result


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, order: SampleOrder, cfg: FinetuneConfig,
                sched: float, tok: Any, n_vocab: int, device: torch.device,
                params: dict[str, torch.Tensor]) -> tuple[float, int]:
    """One optimizer iteration: grad-acc batches, clipping, the update. Returns (mean loss, loss tokens)."""
    lr = cfg.adam_alpha * sched
    for group in opt.param_groups:
        group["lr"] = lr if not cfg.use_lbfgs else (cfg.adam_alpha or 1.0)
    batches = [order.batch(cfg.batch, cfg.ctx, tok.bos_id, tok.eos_id, n_vocab, cfg.separate_with_eos,
                           cfg.separate_with_bos, cfg.fill_with_next_samples, cfg.sample_random_offsets)
               for _ in range(cfg.grad_acc)]
    if not order.samples.pad_loss:
        batches = [b.trimmed() for b in batches]
    n_tok = sum(b.n_loss_tokens for b in batches)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for b in batches:
            loss, _ = batch_loss(model, b, device)
            (loss / cfg.grad_acc).backward()
            total += loss.detach() / cfg.grad_acc
        if cfg.adam_gclip > 0 and not cfg.use_lbfgs:  # L-BFGS needs the true gradient of the loss
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.adam_gclip)
        return total

    if cfg.use_lbfgs:
        loss = opt.step(closure)
    else:
        loss = closure()
        opt.step()
    return float(loss), n_tok


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(FinetuneConfig, argv, prog="toolkit finetune",
                       description="Train a LoRA adapter on a GGUF base model (llama.cpp finetune's options).")
    result = finetune(cfg)
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
