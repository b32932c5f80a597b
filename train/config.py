"""finetune's options (llama.cpp's flags and defaults) and its result."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from toolkit.config import arg


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
    batch: int = arg(8, "-b", "--batch", help="samples per batch (all processes together: each takes its share)")
    grad_acc: int = arg(1, help="gradient accumulation steps (effective batch = batch * grad-acc)")
    micro_batch: int = arg(0, help="rows per forward/backward pass: a batch (or a process's share of it) runs in "
                                   "chunks of this many rows, gradients accumulated, the loss still the whole "
                                   "batch's mean; less activation memory, the same update up to float rounding "
                                   "(0: all rows at once)")
    # --- performance
    threads: int | None = arg(None, "-t", "--threads", help="CPU threads (default: torch's)")
    use_checkpointing: bool = toggle(True, "--use-checkpointing", "--no-checkpointing", "gradient checkpointing")
    cache_base: bool = arg(False, help="keep a dequantized float copy of a quantized base: faster on CPU, but the base "
                                       "then takes float memory (default: it stays packed in its GGUF blocks)")
    base_cache_mb: float = arg(0.0, help="MiB of recently dequantized base weights to reuse (forward -> backward, "
                                         "recompute -> backward; exact values); 0: dequantize on every use")
    omp_wait: str = arg("auto", choices=["auto", "spin", "passive"],
                        help="what OpenMP's idle threads do between ops: spin (libgomp's default; fastest on CPUs "
                             "of your own), passive (sleep; far faster when other jobs share the CPUs), auto "
                             "(passive if other processes keep the CPUs busy at start); OMP_WAIT_POLICY, if set, "
                             "wins")
    huge_pages: str = arg("auto", choices=["auto", "on", "off"],
                          help="CPU: torch's transparent huge pages for buffers of 2 MiB and more (THP_MEM_ALLOC_ENABLE, "
                               "which torch reads when it starts: the command line and torchrun set it, Python callers "
                               "set it themselves): fewer page faults and a lower peak with large activations; auto: "
                               "on from 1024 tokens per forward/backward pass (batch x ctx)")
    mmap_threshold_mb: float = arg(0.0, help="CPU (glibc): buffers of at least this many MiB get mappings of their "
                                             "own, given back to the system when freed, instead of the heap, where "
                                             "freed activations stay resident: a lower peak for some time in page "
                                             "faults (4 suits batch 8 at ctx 256); 0: glibc's default")
    use_flash: bool = toggle(True, "--use-flash", "--no-flash", "fused attention (PyTorch SDPA picks the kernel)")
    device: str = arg("auto", help="auto | cpu | cuda | mps")
    dtype: str | None = arg(None, help="compute dtype of the base (f32 | bf16 | f16; default f32 on CPU)")
    seed: int = arg(-1, "-s", "--seed", help="RNG seed (-1: from the clock)")
    quiet: bool = arg(False, "--quiet", help="no per-iteration lines (the progress bar stays)", action="store_true")
    # --- processes (torch.distributed)
    nproc: int = arg(1, help="processes on this machine (DDP over the LoRA): launches them through torchrun "
                             "(torch.distributed.run); under torchrun itself this is ignored")
    dist_timeout: float = arg(600.0, help="seconds a process waits for the others (a collective, a save by rank 0) "
                                          "before it gives up")


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
