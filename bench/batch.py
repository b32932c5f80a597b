"""Batched decoding (toolkit.infer.batch) on the SmolLM2-135M Q4_1 GGUF: generated tokens/s with 1, 4 and 16
rows decoding together, against one sequence on the single-sequence loop (toolkit.generate's), in one process.

Each row has its own prompt (different lengths) and, with --adapters N, one of N random r=16 adapters on every
linear (row i -> adapter i % N; rows without one when N is 0). Only decode steps are timed (every row past its
prefill). Without adapters, llama.cpp's own batched decoding (llama-batched-bench, same GGUF and threads) gets
rows of its own when that peer is built (bench/build_llama_tools.sh). Writes bench/results/batch.md.

    python bench/batch.py [--threads 2] [--tokens 32] [--rows 1,4,16] [--adapters 0] [--compile] [--weights auto]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

WORDS = ("the lighthouse keeper found a message in a bottle that told of a ship lost in the storm and of a "
         "sailor who waited on the rocks for morning").split()


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[i % 7: i % 7 + 6 + (i * 5) % 17]) for i in range(n)]


def random_adapters(model, n: int, r: int = 16) -> list[str]:
    from tiny import random_lora
    from toolkit.adapter import Adapter

    shapes = {t: (int(m.out_features), int(m.in_features)) for t, m in model.lora_targets().items()
              if t.startswith("blk.")}
    names = []
    for i in range(n):
        names.append(model.add_adapter(Adapter(random_lora(shapes, r, 100 + i, 0.02), float(r), "llama"),
                                       f"r{i}", 0.0))
    return names


def decode_tps(model, tok, rows: int, n: int, names: list[str]) -> float:
    import torch
    from toolkit.infer.batch import BatchEngine
    from toolkit.infer.sampling import SamplingParams

    ids = [tok.encode(p) for p in prompts(rows)]
    engine = BatchEngine(model, rows, max(map(len, ids)) + n + 1)
    for i, p in enumerate(ids):
        engine.add(p, SamplingParams(max_tokens=n, temperature=0.0),
                   {names[i % len(names)]: 1.0} if names else None)
    while any(s.next_token is None for s in engine._seqs if s is not None):  # prefill every row
        engine.step()
    made, t0, c0 = 0, time.perf_counter(), time.process_time()
    while engine.active:
        made += sum(tok_ is not None for _, tok_, _ in engine.step())
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    engine.close()
    return made / dt, made / dc


def single_tps(model, tok, n: int, names: list[str]) -> float:
    from toolkit.infer.generate import GenStats, generate_tokens

    if names:
        model.set_adapters({names[0]: 1.0})
    stats = GenStats()
    it = generate_tokens(model, tok.encode(prompts(1)[0]), n, temperature=0.0, stats=stats)
    next(it)  # past the prefill
    c0 = time.process_time()
    made = sum(1 for _ in it)
    dc = time.process_time() - c0
    model.set_adapters({})
    return (stats.gen_tokens - 1) / stats.gen_s, made / dc


def llama_batched(threads: int, tokens: int, rows: list[int]) -> dict[int, float] | None:
    """llama.cpp's own batched decoding on the same GGUF and threads (llama-batched-bench: B sequences of a
    16-token prompt, `tokens` generated each, decoded together): generated tok/s per B, or None (no peer)."""
    import re
    import subprocess

    from peers import llama_tool
    from toolkit.bundled import smollm2_gguf

    exe = llama_tool("llama-batched-bench")
    if exe is None:
        return None
    cmd = [exe, "-m", str(smollm2_gguf()), "-t", str(threads), "-tb", str(threads), "-c", str(max(rows) * 512),
           "-npp", "16", "-ntg", str(tokens), "-npl", ",".join(map(str, rows)), "-ngl", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # rows of its table: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    found = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and re.fullmatch(r"\d+", cells[2] or ""):
            found[int(cells[2])] = float(cells[7])
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--adapters", type=int, default=0)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--repeat", type=int, default=2, help="rounds; each figure is the best")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch.md"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from toolkit.bundled import smollm2_gguf
    from toolkit.model import load
    from toolkit.qkernels import native_bf16

    model, tok = load(smollm2_gguf(), device="cpu", weights=args.weights, compile=args.compile)
    names = random_adapters(model, args.adapters)
    rows = [int(r) for r in args.rows.split(",")]
    decode_tps(model, tok, max(rows), 4, names)  # warm-up: kernel weights, plans (and compiled graphs)
    single_tps(model, tok, 4, names)
    best: dict = {}

    def keep(key, figures):
        best[key] = tuple(max(a, b) for a, b in zip(best.get(key, (0.0, 0.0)), figures))

    for _ in range(args.repeat):
        keep("single", single_tps(model, tok, args.tokens, names))
        for r in rows:
            keep(r, decode_tps(model, tok, r, args.tokens, names))
    base = best[rows[0]]
    mode = f"weights {args.weights}" + (", --compile" if args.compile else "")
    lines = [f"SmolLM2-135M-Instruct Q4_1, {args.threads} thread(s), {mode}, {args.tokens} greedy tokens a row, "
             f"adapters: {args.adapters or 'none'} (r=16 on every linear, row i -> adapter i % N); best of "
             f"{args.repeat}; torch {torch.__version__}, {platform.machine()}, CPU bf16 instructions: "
             f"{'yes' if native_bf16() else 'no'}, load average "
             f"{os.getloadavg()[0]:.1f} at the end. tok/CPU-s: generated tokens per second of process CPU time "
             "(steadier than wall time on a shared machine). `python bench/batch.py " + " ".join(sys.argv[1:]) + "`",
             "", "| rows | generated tok/s | vs 1 row | tok/CPU-s | vs 1 row |", "|---|---:|---:|---:|---:|"]
    for key in ["single", *rows]:
        w, c = best[key]
        name = "single-sequence loop (toolkit.generate's)" if key == "single" else f"{key} (BatchEngine)"
        lines.append(f"| {name} | {w:.1f} | {w / base[0]:.2f}x | {c:.1f} | {c / base[1]:.2f}x |")
    peer = llama_batched(args.threads, args.tokens, rows) if not args.adapters else None
    if peer and rows[0] in peer:  # (it applies one adapter set to every sequence: no per-row adapters to compare)
        for r in rows:
            lines.append(f"| {r} (llama.cpp's llama-batched-bench, same run) | {peer[r]:.1f} | "
                         f"{peer[r] / peer[rows[0]]:.2f}x | | |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
