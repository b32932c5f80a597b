"""Perplexity throughput: `toolkit perplexity` against llama.cpp's `llama-perplexity` on the bundled SmolLM2-135M
Q4_1 GGUF, same text, chunk size and threads, each in its own process (wall time, process CPU time and peak RSS
from wait4). Prefill-shaped work: every chunk is one forward pass over ctx tokens, so this is also the prompt
processing that bounds time to first token on long prompts.

Rows: toolkit with --weights auto (the default: libggml's mul_mat where llama-cpp-python's libggml loads, else as
packed), --weights packed (torch's kernels for few rows, blocks dequantized for every prefill-sized matmul), --weights
bf16 (a bf16 copy of the weights for inputs of qkernels.bf16_rows() rows or more) and --weights float (a float32 copy: exact).
Writes bench/results/perplexity.md.

    python bench/perplexity.py [--threads 2] [--ctx 256] [--file configs/data/planets-train.txt] [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def timed(cmd: list[str]) -> tuple[float, float, float, str]:
    """(wall s, CPU s, peak RSS GB, combined output) of one process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{out[-2000:]}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1e6, out


def ppl_of(out: str) -> float:
    m = re.findall(r"(?:PPL = |Final estimate: PPL = )([0-9.]+)", out)
    return float(m[-1]) if m else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--file", default=str(ROOT / "configs" / "data" / "planets-train.txt"))
    ap.add_argument("--repeat", type=int, default=2, help="rounds; each figure is the best")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "perplexity.md"))
    args = ap.parse_args()
    from peers import llama_tool
    from toolkit.bundled import smollm2_gguf
    from toolkit.qkernels import native_bf16

    model = str(smollm2_gguf())
    runs: dict[str, list[str]] = {}
    tool = llama_tool("llama-perplexity")
    if tool:
        runs["llama.cpp llama-perplexity"] = [tool, "-m", model, "-f", args.file, "-c", str(args.ctx),
                                              "-t", str(args.threads)]
    for w in ("auto", "packed", "bf16", "float"):
        runs[f"toolkit --weights {w}"] = [sys.executable, "-m", "toolkit.cli", "perplexity", "-m", model,
                                          "-f", args.file, "-c", str(args.ctx), "-t", str(args.threads),
                                          "--weights", w]
    best: dict[str, tuple[float, float, float, float]] = {}
    for _ in range(args.repeat):
        for name, cmd in runs.items():
            wall, cpu, rss, out = timed(cmd)
            old = best.get(name)
            if old is None or wall < old[0]:
                best[name] = (wall, cpu, rss, ppl_of(out))
            print(f"{name}: {wall:.2f} s wall, {cpu:.2f} CPU s, {rss:.2f} GB, PPL {ppl_of(out):.4f}", flush=True)
    peer = best.get("llama.cpp llama-perplexity")
    lines = [f"SmolLM2-135M-Instruct Q4_1, `{Path(args.file).name}`, ctx {args.ctx}, {args.threads} threads, "
             f"best of {args.repeat} by wall time, each run a fresh process (load included); torch "
             f"{__import__('torch').__version__}, {platform.machine()}, CPU bf16 instructions: "
             f"{'yes' if native_bf16() else 'no'}, load average {os.getloadavg()[0]:.1f} at the end. "
             "`python bench/perplexity.py " + " ".join(sys.argv[1:]) + "`", "",
             "| engine | wall s | vs llama.cpp | CPU s | vs llama.cpp | peak RSS GB | PPL |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (wall, cpu, rss, ppl) in best.items():
        vs_w = f"{peer[0] / wall:.2f}x" if peer else "n/a"
        vs_c = f"{peer[1] / cpu:.2f}x" if peer else "n/a"
        lines.append(f"| {name} | {wall:.2f} | {vs_w} | {cpu:.2f} | {vs_c} | {rss:.2f} | {ppl:.4f} |")
    lines += ["", "vs llama.cpp: its time / ours (> 1: we are faster). PPL differs by tokenization details and "
              "arithmetic (llama.cpp rounds activations to 8 bits on quantized weights; bf16 rounds to 8 "
              "significant bits; float is exact to the dequantized weights)."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
