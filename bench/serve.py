"""`toolkit serve` under load: 16 concurrent clients over 4 LoRA adapters vs the same load with no adapters.

One `toolkit serve` process on the SmolLM2 GGUF (loopback only) with 4 random r=16 adapters on every linear,
loaded with --lora-init-without-apply. Load A: request i asks for adapter i % 4 through its `lora` field.
Load B (the peer, same server, same run): the same requests with `"lora": []`. Every request generates exactly
--max-tokens tokens (ignore_eos), so both loads do the same token work. Writes bench/results/serve.md.

    python bench/serve.py [--requests 64] [--clients 16] [--max-tokens 16] [--threads 1] [--rounds 2]

The two loads alternate in --rounds rounds (each round: requests/rounds of each), so a change in the machine's
background load during the run hits both loads alike.
"""
from __future__ import annotations

import argparse
import os
import concurrent.futures as cf
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "Three tips for learning Python:",
           "The best way to make tea is", "In 1969, the first humans", "A good name for a cat is",
           "The ocean is blue because", "My favourite season is autumn because"]


def make_adapters(base: Path, folder: Path, n: int, rank: int) -> list[Path]:
    from toolkit.adapter import Adapter, LoraPair, write_gguf_adapter
    from toolkit.gguf_io import open_gguf

    g = open_gguf(base)
    out = []
    for k in range(n):
        gen = torch.Generator().manual_seed(k)
        tensors = {name: LoraPair(torch.randn(rank, info.shape[1], generator=gen) * 0.02,
                                  torch.randn(info.shape[0], rank, generator=gen) * 0.02)
                   for name, info in g.tensors.items() if name.startswith("blk.") and name.endswith(
                       ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                        "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"))}
        path = folder / f"adapter{k}.gguf"
        write_gguf_adapter(Adapter(tensors, alpha=float(rank), arch=g.arch), path)
        out.append(path)
    return out


def start_server(base: Path, adapters: list[Path], threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "toolkit.cli", "serve", "-m", str(base), "--port", "0", "--host", "127.0.0.1",
           "-t", str(threads), "--lora-init-without-apply", "--max-queue", "256"]
    for a in adapters:
        cmd += ["--lora", str(a)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, m.group(1)
    raise SystemExit(f"toolkit serve did not start (exit {proc.wait()})")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere). Robust to other jobs on the machine,
    unlike wall time: a busy shared machine stretches wall time but not the work done per token."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_load(url: str, n_req: int, clients: int, max_tokens: int, lora_of, first: int = 0, pid: int = 0) -> dict:
    """n_req requests through `clients` concurrent connections; raw latencies, wall and server CPU time, tokens,
    adapter-set groups."""

    def one(i: int) -> tuple[float, int]:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "seed": i, "ignore_eos": True,
                "lora": lora_of(i)}
        t0 = time.perf_counter()
        r = client.post(url + "/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        switches0 = client.get(url + "/health").json()["adapter_switches"]
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as pool:
            res = list(pool.map(one, range(first, first + n_req)))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        switches = client.get(url + "/health").json()["adapter_switches"] - switches0
    return {"lat": [r[0] for r in res], "wall": wall, "cpu": cpu, "tokens": sum(r[1] for r in res),
            "switches": switches}


def summary(parts: list[dict]) -> dict:
    lat = sorted(x for p in parts for x in p["lat"])
    wall = sum(p["wall"] for p in parts)
    q = statistics.quantiles(lat, n=100, method="inclusive")
    tokens = sum(p["tokens"] for p in parts)
    return {"rps": len(lat) / wall, "tok_s": tokens / wall, "p50": q[49], "p99": q[98], "wall": wall,
            "cpu_ms_tok": 1000 * sum(p["cpu"] for p in parts) / tokens, "switches": sum(p["switches"] for p in parts),
            "n": len(lat)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the server (1: on a busy 2-core machine 2 threads oversubscribe)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.md"))
    args = ap.parse_args()

    from toolkit.bundled import smollm2_gguf

    base = smollm2_gguf()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, Path(tmp), args.adapters, args.rank)
        proc, url = start_server(base, adapters, args.threads)
        try:
            for _ in range(100):
                try:
                    httpx.get(url + "/health", timeout=5)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            k = args.adapters

            def with_lora(i: int) -> list[dict]:
                return [{"id": i % k, "scale": 1.0}]

            def no_lora(i: int) -> list[dict]:
                return []

            run_load(url, 4, 4, 4, with_lora)  # warm-up: first forward passes, adapter paths
            per = args.requests // args.rounds
            parts: dict[str, list[dict]] = {"base": [], "lora": []}
            for r in range(args.rounds):
                parts["base"].append(run_load(url, per, args.clients, args.max_tokens, no_lora, r * per, proc.pid))
                parts["lora"].append(run_load(url, per, args.clients, args.max_tokens, with_lora, r * per, proc.pid))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
            base_load, lora_load = summary(parts["base"]), summary(parts["lora"])
            load_after = os.getloadavg()[0]
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    rows = [("no adapters", base_load), (f"{k} adapters (request i -> adapter i % {k})", lora_load)]
    lines = [
        f"# toolkit serve: {args.clients} concurrent clients, per-request LoRA vs no adapters",
        "",
        (f"SmolLM2-135M-Instruct Q4_1 GGUF, CPU ({platform.processor() or platform.machine()}, "
         f"{args.threads} server thread(s), torch {torch.__version__}), loopback HTTP, one `toolkit serve` process "
         f"for both loads. {base_load['n']} requests per load (in {args.rounds} alternating rounds) from "
         f"{args.clients} concurrent clients, each `/v1/completions` with {args.max_tokens} generated tokens "
         f"(ignore_eos), {k} random adapters r={args.rank} on every linear."),
        "",
        f"The machine was shared (1-minute load average {load_before:.1f} before, {load_after:.1f} after, on "
        f"{os.cpu_count()} cores), so wall-clock figures carry that noise; the server's own CPU time per generated "
        "token (prefill included) does not, and is the fairer comparison of the two loads.",
        "",
        "| load | requests/s | generated tok/s | p50 latency (s) | p99 latency (s) | server CPU ms / token | "
        "adapter-set groups |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['rps']:.2f} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                     f"{r['cpu_ms_tok']:.0f} | {r['switches']} |")
    ratio = lora_load["rps"] / base_load["rps"]
    cpu_ratio = lora_load["cpu_ms_tok"] / base_load["cpu_ms_tok"]
    lines += ["", (f"Throughput with {k} adapters: **{ratio:.2f}x** the no-adapter load "
              f"(p50 latency {lora_load['p50'] / base_load['p50']:.2f}x); server CPU per token "
              f"**{cpu_ratio:.2f}x**. Requests run on one model thread, "
              "grouped by adapter set (one `set_adapters` per group, counted above), one after another inside a "
              f"group so each response equals the request run alone. Latency is queueing-dominated: {args.clients} "
              "clients share one model."), ""]
    text = "\n".join(lines)
    from toolkit.fileutil import atomic_path

    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
