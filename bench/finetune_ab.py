"""Finetune speed, toolkit vs PEFT + transformers, alternating steps in one process.

    python bench/finetune_ab.py [--dtype f32|bf16] [--batch 1] [--ckpt] [--threads 2] [--rounds 6] [--model M] [--codecs] [--base-cache-mb N]

bench/finetune.py runs each engine in a process of its own (so that each peak RSS is its own), and on a shared
machine two processes minutes apart can differ by 30%. Here both engines live in one process and take turns, a
few steps each, for several rounds: what disturbs one round disturbs both, so the per-round ratio is what to
read. Speed only (no memory figures). Same settings as bench/finetune.py: SmolLM2-135M-Instruct Q4_1, ctx 256,
LoRA r 8 / alpha 16 on every linear of every block, AdamW; toolkit with the base packed (train_step of the real
trainer), PEFT on transformers' float copy of the same GGUF. --dtype bf16: toolkit's --dtype bf16, PEFT's model
loaded in bfloat16. --codecs runs toolkit twice, with libggml's codec and with the torch codec. Writes
bench/results/finetune-ab-[<model>-]<dtype>-b<batch>[-ckpt][-codecs]-t<threads>[-passive].md.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from finetune import CTX, RANK, peft_trainer, write_words  # bench/finetune.py: the same settings and PEFT side

ROOT = Path(__file__).resolve().parents[1]


def peft_step(model_path: str, dtype: str, batch: int, ckpt: bool):
    step, vocab = peft_trainer(model_path, ckpt, dtype)
    rng = random.Random(0)
    return lambda: step([[rng.randrange(100, vocab) for _ in range(CTX + 1)] for _ in range(batch)])


def toolkit_step(model_path: str, dtype: str, batch: int, ckpt: bool, folder: str, pool_mb: float = 0.0):
    from toolkit.model import pick_device
    from toolkit.train import dist, trainer
    from toolkit.train.finetune import FinetuneConfig

    write_words(Path(folder, "t.txt"))
    cfg = FinetuneConfig(model_base=model_path, train_data=str(Path(folder, "t.txt")), ctx=CTX, batch=batch,
                         lora_r=RANK, lora_alpha=2 * RANK, rank_tok_embd=0, rank_out=0, adam_iter=10**6, warmup=1,
                         use_checkpointing=ckpt, base_cache_mb=pool_mb, save_every=0, checkpoint_out="", lora_out="",
                         log_file="", checkpoint_in=str(Path(folder, "none.gguf")), quiet=True, seed=0,
                         dtype=None if dtype == "f32" else dtype)
    d, device = dist.start(pick_device(cfg.device), cfg.dist_timeout)
    run = trainer.prepare(cfg, d, device)
    return lambda: trainer.train_step(run, 1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ckpt", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="steps per engine per round")
    ap.add_argument("--base-cache-mb", type=float, default=0.0, help="toolkit's --base-cache-mb (default 0: no pool)")
    ap.add_argument("--model", default=None, help="GGUF base (default: the bundled SmolLM2 Q4_1)")
    ap.add_argument("--codecs", action="store_true",
                    help="toolkit twice: libggml's codec (the default where llama-cpp-python is installed) and the "
                         "torch codec (TOOLKIT_CODEC=torch), switched before each engine's steps")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from toolkit.bundled import smollm2_gguf

    from toolkit import ggml_codec

    model = a.model or str(smollm2_gguf())
    with tempfile.TemporaryDirectory() as folder:
        engines = {"PEFT": peft_step(model, a.dtype, a.batch, a.ckpt),
                   "toolkit": toolkit_step(model, a.dtype, a.batch, a.ckpt, folder, a.base_cache_mb)}
        if a.codecs:
            if not ggml_codec.available():
                print(f"--codecs: {ggml_codec.unavailable_reason()}", file=sys.stderr)
                return 1
            tk = engines.pop("toolkit")
            engines["toolkit"] = lambda: (ggml_codec.set_codec("ggml"), tk())
            engines["toolkit, torch codec"] = lambda: (ggml_codec.set_codec("torch"), tk())
        for step in engines.values():  # warm-up: first-touch, allocator, lazy inits
            step()
        cpu: dict[str, list[float]] = {k: [] for k in engines}
        wall: dict[str, list[float]] = {k: [] for k in engines}
        order = list(engines)
        for r in range(a.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first
                c0, w0 = time.process_time(), time.perf_counter()
                for _ in range(a.steps):
                    engines[name]()
                cpu[name].append((time.process_time() - c0) / a.steps)
                wall[name].append((time.perf_counter() - w0) / a.steps)
            print(f"round {r + 1}: " + ", ".join(f"{k} {cpu[k][-1]:.2f} CPU-s/step" for k in engines), flush=True)
    n = CTX * a.batch
    tag = (f"{Path(a.model).stem}-" if a.model else "") + f"{a.dtype}-b{a.batch}" + ("-ckpt" if a.ckpt else "") \
        + ("-codecs" if a.codecs else "") + (f"-pool{a.base_cache_mb:g}" if a.base_cache_mb else "") + f"-t{a.threads}" \
        + ("-passive" if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" else "")
    lines = [
        f"# finetune speed, toolkit vs PEFT, alternating in one process ({tag})",
        "",
        f"`python bench/finetune_ab.py {' '.join(sys.argv[1:])}`; {Path(model).name}, ctx {CTX}, "
        f"batch {a.batch}, r {RANK} on every linear, gradient checkpointing {'on' if a.ckpt else 'off'}, "
        f"{a.threads} threads (OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}), torch {torch.__version__}; "
        f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| engine | tok/CPU-s (median of rounds) | tok/s wall (median) |",
        "|---|---:|---:|",
    ]
    for k in engines:
        lines.append(f"| {k} | {n / statistics.median(cpu[k]):.1f} | {n / statistics.median(wall[k]):.1f} |")
    for k in [k for k in engines if k != "PEFT"]:
        ratios = [p / t for p, t in zip(cpu["PEFT"], cpu[k])]
        wratios = [p / t for p, t in zip(wall["PEFT"], wall[k])]
        lines += ["", f"{k} / PEFT per round, tokens per CPU-second: " + ", ".join(f"{x:.2f}x" for x in ratios)
                  + f" (median **{statistics.median(ratios):.2f}x**); wall: " + ", ".join(f"{x:.2f}x" for x in wratios)
                  + f" (median {statistics.median(wratios):.2f}x)."]
    out = ROOT / "bench" / "results" / f"finetune-ab-{tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
