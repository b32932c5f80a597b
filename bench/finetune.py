"""Finetune throughput and peak memory: toolkit vs PEFT + transformers, same base, same settings, one run.

    python bench/finetune.py [--steps 5] [--steps-batched 3] [--batches 1,8] [--base-cache-mb 16] [--threads 2]
                             [--skip-3b]

1. SmolLM2-135M-Instruct Q4_1 GGUF, ctx 256, batch 1 and 8, LoRA r 8 (alpha 16) on every linear of every block,
   AdamW, with and without gradient checkpointing:
   - toolkit: `finetune()` with the base packed in its GGUF blocks (default), packed with a --base-cache-mb pool
     of reused dequantized weights, and with --cache-base;
   - PEFT: transformers loads the same GGUF (dequantized to float32), PEFT LoRA on q/k/v/o/gate/up/down,
     torch AdamW, the same token batches.
   Each configuration runs in its own process (peak RSS = that process's ru_maxrss); tokens/s is measured
   over the steps after the first (warm-up).
2. A 3B-shaped Q8_0 base (open_llama 3B v2's shapes, random weights, written streaming with quants.quantize
   and deleted afterwards) at ctx 256, r 4: toolkit's peak RSS against llama.cpp's finetune guide figure
   (3.02 GB of buffers plus the model).

Writes bench/results/finetune.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "finetune.md"
CTX, RANK, ALPHA = 256, 8, 16
PEFT_BASELINE = {False: (167.0, 1.90), True: (117.0, 1.43)}  # tok/s, GB peak measured earlier (issue 7)


# ----------------------------------------------------------------------------------------------- workers

def _peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _token_batches(steps: int, vocab: int, batch: int) -> list[list[list[int]]]:
    import random

    rng = random.Random(0)
    return [[[rng.randrange(100, vocab) for _ in range(CTX + 1)] for _ in range(batch)] for _ in range(steps)]


def write_words(path: Path) -> None:
    """A text of unrelated words for toolkit's side: a sample at every token position (no --sample-start)."""
    import random

    rng = random.Random(0)
    words = ["alpha", "river", "stone", "violet", "engine", "quiet", "orbit", "maple", "copper", "tiger"]
    path.write_text(" ".join(rng.choice(words) for _ in range(4000)))


def worker_toolkit(model: str, steps: int, ckpt: bool, cache: bool, rank: int, out: dict, batch: int = 1,
                   pool_mb: float = 0.0, mmap_mb: float = 0.0, dtype: str | None = None) -> None:
    """Through the public finetune() with a random-token text file, so the whole loop is measured."""
    from toolkit.train.finetune import FinetuneConfig, finetune

    with tempfile.TemporaryDirectory() as d:
        write_words(Path(d, "t.txt"))
        times: list[float] = []
        cpu: list[float] = []
        last = [time.perf_counter(), time.process_time()]

        def tick(it: int, loss: float) -> None:
            now, now_cpu = time.perf_counter(), time.process_time()
            times.append(now - last[0])
            cpu.append(now_cpu - last[1])
            last[0], last[1] = now, now_cpu

        cfg = FinetuneConfig(model_base=model, train_data=str(Path(d, "t.txt")), ctx=CTX, batch=batch,
                             lora_r=rank, lora_alpha=2 * rank, rank_tok_embd=0, rank_out=0, adam_iter=steps, warmup=1,
                             use_checkpointing=ckpt, cache_base=cache, base_cache_mb=pool_mb, mmap_threshold_mb=mmap_mb,
                             save_every=0, checkpoint_out="", lora_out="",
                             log_file="", checkpoint_in=str(Path(d, "none.gguf")), quiet=True, seed=0, dtype=dtype)
        finetune(cfg, on_iteration=tick)
    steady, steady_cpu = times[1:] or times, cpu[1:] or cpu
    n = CTX * batch
    out.update(tok_s=n / (sum(steady) / len(steady)), tok_cpu_s=n / (sum(steady_cpu) / len(steady_cpu)),
               peak_gb=_peak_gb())


def peft_trainer(model: str, ckpt: bool, dtype: str | None = None):
    """PEFT LoRA (r RANK on every linear) on transformers' float copy of the GGUF, torch AdamW, gradient clipping
    as finetune's: returns (step, vocab size); step(seqs) trains on token rows [B][CTX + 1]."""
    import logging

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    p = Path(model)
    m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                             dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    m.config.use_cache = False
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    lc = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    m = get_peft_model(m, lc)
    m.train()
    params = [q for q in m.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)

    def step(seqs: list[list[int]]) -> None:
        x = torch.tensor(seqs)
        loss = m(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, m.config.vocab_size


def worker_peft(model: str, steps: int, ckpt: bool, out: dict, batch: int = 1, dtype: str | None = None) -> None:
    step, vocab = peft_trainer(model, ckpt, dtype)
    times, cpu = [], []
    for seqs in _token_batches(steps, vocab, batch):
        t0, c0 = time.perf_counter(), time.process_time()
        step(seqs)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    steady, steady_cpu = times[1:] or times, cpu[1:] or cpu
    n = CTX * batch
    out.update(tok_s=n / (sum(steady) / len(steady)), tok_cpu_s=n / (sum(steady_cpu) / len(steady_cpu)),
               peak_gb=_peak_gb())


def make_3b_q8(path: Path) -> float:
    """open_llama 3B v2's shapes (26 blocks, 3200 wide, ffn 8640, 32000 vocab, untied), random Q8_0 weights,
    written tensor by tensor (never the whole model in memory). Returns the file size in GB."""
    import torch
    from gguf import GGMLQuantizationType as Q

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tokenizer_metadata  # SmolLM2's vocabulary: finetune only needs *a* tokenizer

    from toolkit.gguf_io import TensorSpec, write_gguf
    from toolkit.quants import quantize

    n_layer, dim, ffn, n_head = 26, 3200, 8640, 32
    meta = tokenizer_metadata()
    vocab = len(meta["tokenizer.ggml.tokens"].value)
    meta.update({"general.architecture": "llama", "general.name": "random-3b-q8_0", "llama.block_count": n_layer,
                 "llama.context_length": 2048, "llama.embedding_length": dim, "llama.feed_forward_length": ffn,
                 "llama.attention.head_count": n_head, "llama.attention.head_count_kv": n_head,
                 "llama.rope.dimension_count": dim // n_head, "llama.attention.layer_norm_rms_epsilon": 1e-6,
                 "llama.vocab_size": vocab, "general.file_type": 7})

    def q8(rows: int, cols: int, seed: int):
        def make():
            g = torch.Generator().manual_seed(seed)
            return quantize(torch.randn(rows, cols, generator=g) * 0.02, Q.Q8_0)
        return make

    def norm(n: int):
        return lambda: torch.ones(n)

    specs = [TensorSpec("token_embd.weight", Q.Q8_0, (vocab, dim), q8(vocab, dim, 1))]
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes = {"attn_q": (dim, dim), "attn_k": (dim, dim), "attn_v": (dim, dim), "attn_output": (dim, dim),
                  "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim), "ffn_down": (dim, ffn)}
        specs.append(TensorSpec(p + "attn_norm.weight", Q.F32, (dim,), norm(dim)))
        specs.append(TensorSpec(p + "ffn_norm.weight", Q.F32, (dim,), norm(dim)))
        for j, (n, s) in enumerate(shapes.items()):
            specs.append(TensorSpec(p + n + ".weight", Q.Q8_0, s, q8(*s, seed=100 * i + j + 2)))
    specs.append(TensorSpec("output_norm.weight", Q.F32, (dim,), norm(dim)))
    specs.append(TensorSpec("output.weight", Q.Q8_0, (vocab, dim), q8(vocab, dim, 99999)))
    write_gguf(path, meta, specs, progress=True)
    return path.stat().st_size / 1e9


def worker_3b(steps: int, out: dict) -> None:
    from toolkit.train.finetune import FinetuneConfig, finetune

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        model = Path(d, "random-3b-q8_0.gguf")
        t0 = time.perf_counter()
        size = make_3b_q8(model)
        gen_s = time.perf_counter() - t0
        import random

        rng = random.Random(0)
        Path(d, "t.txt").write_text("\n".join(" ".join(rng.choice(["to", "be", "or", "not", "that", "is", "the",
                                                                      "question"]) for _ in range(60))
                                              for _ in range(200)))
        times: list[float] = []
        last = [time.perf_counter()]

        def tick(it: int, loss: float) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        cfg = FinetuneConfig(model_base=str(model), train_data=str(Path(d, "t.txt")), sample_start="\\n", escape=True,
                             ctx=CTX, batch=1, lora_r=4, lora_alpha=4, adam_iter=steps, warmup=1, use_checkpointing=True,
                             save_every=0, checkpoint_out="", lora_out="", log_file="", quiet=True, seed=0,
                             checkpoint_in=str(Path(d, "none.gguf")))
        finetune(cfg, on_iteration=tick)
        out.update(model_gb=size, peak_gb=_peak_gb(), s_per_iter=sum(times) / len(times), gen_s=gen_s)


def run_worker(kind: str, args: list[str], threads: int, timeout: int) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", kind, *args, "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        raise RuntimeError(f"{kind} {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[-1][7:])


# ----------------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-3b", action="store_true")
    ap.add_argument("--steps-3b", type=int, default=1)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--ckpt", type=int, default=0)
    ap.add_argument("--cache", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1, help="(worker) samples per step")
    ap.add_argument("--batches", default="1,8", help="batch sizes to compare")
    ap.add_argument("--steps-batched", type=int, default=3, help="steps for batch sizes above 1")
    ap.add_argument("--base-cache-mb", type=float, default=16.0,
                    help="toolkit's --base-cache-mb for the pooled column (0: leave that column out)")
    ap.add_argument("--mmap-threshold-mb", type=float, default=0.0,
                    help="(worker) toolkit's --mmap-threshold-mb (0: glibc's default)")
    ap.add_argument("--dtype", default=None, help="(workers) compute dtype: finetune's --dtype; PEFT loads the model in it (default f32)")
    ap.add_argument("--huge-pages", default="auto", choices=["auto", "on", "off"],
                    help="(toolkit workers) finetune's --huge-pages, set before torch loads as the command does")
    a = ap.parse_args()
    if a.worker:
        if a.worker != "peft":
            from toolkit.train import memory

            memory.request_huge_pages(a.huge_pages, a.batch * CTX)
        import torch

        torch.set_num_threads(a.threads)
        from toolkit.bundled import smollm2_gguf

        out: dict = {}
        if a.worker == "toolkit":
            worker_toolkit(str(smollm2_gguf()), a.steps, bool(a.ckpt), bool(a.cache), RANK, out, a.batch,
                           a.base_cache_mb, a.mmap_threshold_mb, a.dtype)
        elif a.worker == "peft":
            worker_peft(str(smollm2_gguf()), a.steps, bool(a.ckpt), out, a.batch, a.dtype)
        elif a.worker == "3b":
            worker_3b(a.steps, out)
        print("RESULT " + json.dumps(out))
        return 0

    import platform

    load_before = os.getloadavg()[0]
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        for ckpt in (False, True):
            common = ["--steps", str(a.steps if batch == 1 else a.steps_batched), "--ckpt", str(int(ckpt)),
                      "--batch", str(batch)]
            peft = run_worker("peft", common, a.threads, 3600)
            ours = run_worker("toolkit", [*common, "--base-cache-mb", "0"], a.threads, 3600)
            pooled = (run_worker("toolkit", [*common, "--base-cache-mb", str(a.base_cache_mb)], a.threads, 3600)
                      if a.base_cache_mb > 0 else None)
            cached = run_worker("toolkit", [*common, "--cache", "1", "--base-cache-mb", "0"], a.threads, 3600)
            rows.append((batch, ckpt, peft, ours, pooled, cached))
            print(batch, ckpt, peft, ours, pooled, cached, flush=True)
    big = None
    saved = RESULTS.with_name("finetune-3b.json")  # the 3B part has no peer to run beside: reusable on its own
    if not a.skip_3b:
        big = run_worker("3b", ["--steps", str(a.steps_3b)], a.threads, 3600)
        big["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        saved.write_text(json.dumps(big, indent=1) + "\n")
        print(big, flush=True)
    elif saved.is_file():
        big = json.loads(saved.read_text())

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# toolkit finetune vs PEFT + transformers",
        "",
        f"SmolLM2-135M-Instruct Q4_1 GGUF, ctx {CTX}, batch {' and '.join(a.batches.split(','))}, LoRA r {RANK} / "
        f"alpha {ALPHA} on q, k, v, o, gate, up, down of every block, AdamW; {a.steps} steps per configuration at "
        f"batch 1, {a.steps_batched} above (tokens/s over the steps after the first), each in "
        f"its own process; peak = the process's peak RSS. {a.threads} threads, {cpu}. PEFT side: transformers' GGUF "
        "loader (dequantized to float32) + PEFT LoRA + torch AdamW, same token count per step. Measured in one run "
        f"of `python bench/finetune.py`; the machine was shared (1-minute load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores): absolute tokens/s are low, the ratios are "
        "what compares.",
        "",
        "tok/s: wall clock; tok/CPU-s: tokens per second of the process's CPU time (all threads), which a busy "
        "machine disturbs far less, so the speed ratios use it.",
        "",
        "Columns: PEFT; toolkit with the base packed (default); packed with `--base-cache-mb "
        f"{a.base_cache_mb:g}` (a pool of recently dequantized weights reused by the next pass, exact); "
        "`--cache-base` (a float copy of the whole base). Speed and memory ratios are against PEFT.",
        "",
        "| batch | grad. ckpt | PEFT tok/s | PEFT tok/CPU-s | PEFT peak GB | packed tok/s | tok/CPU-s | peak GB | "
        "speed | memory | pooled tok/CPU-s | peak GB | speed | memory | --cache-base tok/CPU-s | peak GB | speed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(r: dict | None, key: str, ref: dict) -> str:
        return "n/a" if r is None else f"{r[key] / ref[key]:.2f}x"

    for batch, ckpt, peft, ours, pooled, cached in rows:
        pool_cols = ("n/a | n/a" if pooled is None else f"{pooled['tok_cpu_s']:.1f} | {pooled['peak_gb']:.2f}")
        lines.append(f"| {batch} | {'on' if ckpt else 'off'} | {peft['tok_s']:.1f} | {peft['tok_cpu_s']:.1f} | "
                     f"{peft['peak_gb']:.2f} | {ours['tok_s']:.1f} | {ours['tok_cpu_s']:.1f} | {ours['peak_gb']:.2f} | "
                     f"{ratio(ours, 'tok_cpu_s', peft)} | {ratio(ours, 'peak_gb', peft)} | {pool_cols} | "
                     f"{ratio(pooled, 'tok_cpu_s', peft)} | {ratio(pooled, 'peak_gb', peft)} | "
                     f"{cached['tok_cpu_s']:.1f} | {cached['peak_gb']:.2f} | {ratio(cached, 'tok_cpu_s', peft)} |")
    lines += ["", "Goal (issue 19): >= 1.0x PEFT's tokens per CPU-second with the base packed, at <= 0.6x its peak "
              "memory (issue 7 asked 2x)."]
    if big is not None:
        lines += ["", "## 3B-shaped Q8_0 base (llama.cpp finetune guide's setting)", "",
                  "open_llama 3B v2 shapes (26 blocks, 3200 wide, ffn 8640, untied) with SmolLM2's 49152-token "
                  "vocabulary (so 3.5B parameters instead of 3.4B), "
                  f"random Q8_0 weights ({big['model_gb']:.2f} GB file), ctx {CTX}, batch 1, "
                  f"r 4, gradient checkpointing, {a.steps_3b} iteration(s) of {big['s_per_iter']:.0f} s; "
                  f"measured {big.get('measured', '')} (`--skip-3b` reuses bench/results/finetune-3b.json).",
                  "",
                  "| | s / iteration | peak RSS GB | of which the model file (mmap) | training buffers |",
                  "|---|---:|---|---|---|",
                  f"| toolkit | {big['s_per_iter']:.1f} | {big['peak_gb']:.2f} | {big['model_gb']:.2f} | "
                  f"{big['peak_gb'] - big['model_gb']:.2f} |",
                  "| llama.cpp finetune (guide: 2 threads, i7-12700H) | ~168 | 3.02 + model | model | 3.02 |",
                  "",
                  "The model file is memory-mapped and stays packed; its pages count in the RSS once touched."]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
