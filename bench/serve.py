"""`toolkit serve` against llama.cpp's llama-server under the same load: 16 concurrent clients, 4 LoRA adapters.

Both servers run on loopback (127.0.0.1) with the same GGUF (the bundled SmolLM2-135M-Instruct Q4_1), the same
CPU threads, 16 slots of the same context, and the same 4 random r=16 adapters on every linear (GGUF adapter
files made here), loaded without applying them. Two loads per server, each --requests streaming
`/v1/completions` from --clients concurrent clients, every request generating exactly --max-tokens tokens
(ignore_eos):
  no adapters   "lora": []
  4 adapters    request i: "lora": [{"id": i % 4, "scale": 1.0}] (llama-server's per-request field; ours too)
The servers run one at a time; the loads interleave (toolkit, llama-server, toolkit, ...) so a change in the
machine's background load hits both alike. Writes bench/results/serve.md.

    python bench/serve.py [--quick] [--requests 64] [--clients 16] [--max-tokens 64] [--threads 2]

llama-server is found by bench/peers.py ($TOOLKIT_LLAMA_BIN, ~/.cache/toolkit/llama.cpp/bin, PATH); when missing, its rows
are skipped with one line saying so.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import re
import socket
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
CACHE_ON = "on (each server reuses a slot whose cache starts with the prompt)"
CACHE_OFF = 'off (requests send "cache_prompt": false)'
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def make_adapters(base: Path, folder: Path, n: int, rank: int) -> list[Path]:
    """n random GGUF LoRA adapters (llama.cpp's format: both servers load the same files), r=rank on every
    linear of every block."""
    from toolkit.adapter import Adapter, LoraPair, write_gguf_adapter
    from toolkit.gguf_io import open_gguf

    g = open_gguf(base)
    out = []
    for k in range(n):
        gen = torch.Generator().manual_seed(k)
        tensors = {name: LoraPair(torch.randn(rank, info.shape[1], generator=gen) * 0.02,
                                  torch.randn(info.shape[0], rank, generator=gen) * 0.02)
                   for name, info in g.tensors.items()
                   if name.startswith("blk.") and name.split(".")[2] in LINEARS and name.endswith(".weight")}
        path = folder / f"adapter{k}.gguf"
        write_gguf_adapter(Adapter(tensors, alpha=float(rank), arch=g.arch), path)
        out.append(path)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited ({proc.returncode})")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url}: not healthy after {timeout:.0f} s")


def start_toolkit(base: Path, adapters: list[Path], a: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "toolkit.cli", "serve", "-m", str(base), "--host", "127.0.0.1", "--port", "0",
           "-t", str(a.threads), "--parallel", str(a.clients), "--ctx-size", str(a.ctx), "--max-queue", "256",
           "--lora-init-without-apply", "--weights", a.weights, *(["--no-compile"] if a.no_compile else [])]
    for p in adapters:
        cmd += ["--lora", str(p)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            wait_healthy(m.group(1), proc, 60)
            return proc, m.group(1)
    raise SystemExit(f"toolkit serve did not start (exit {proc.wait()})")


def start_llama(binary: Path, base: Path, adapters: list[Path], a: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(binary), "-m", str(base), "--host", "127.0.0.1", "--port", str(port), "-t", str(a.threads),
           "-tb", str(a.threads), "-np", str(a.clients), "-c", str(a.clients * a.ctx), "-ngl", "0",
           "--lora-init-without-apply"]
    for p in adapters:
        cmd += ["--lora", str(p)]
    log = open(Path(tempfile.gettempdir()) / f"bench-llama-server-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 120)
    return proc, url


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere): the work done, robust to other jobs on
    the machine, unlike wall time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def one_request(client: httpx.Client, url: str, i: int, max_tokens: int, lora: list[dict], cache: bool) -> dict:
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "seed": i, "ignore_eos": True,
            "temperature": 0.8, "lora": lora, "stream": True, "stream_options": {"include_usage": True},
            "cache_prompt": cache}
    t0 = time.perf_counter()
    ttft, pieces, used = None, 0, None
    # a fresh connection each (llama-server closes idle keep-alive connections, which a pooled client then hits)
    with client.stream("POST", url + "/v1/completions", json=body, headers={"Connection": "close"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                used = ev["usage"].get("completion_tokens")
            for ch in ev.get("choices") or []:
                if ch.get("text"):
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    return {"lat": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": used if used is not None else pieces}


def run_load(url: str, pid: int, ids: range, a: argparse.Namespace, lora_of) -> dict:
    with httpx.Client(timeout=900, limits=httpx.Limits(max_connections=a.clients)) as client:
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        with cf.ThreadPoolExecutor(a.clients) as pool:
            res = list(pool.map(lambda i: one_request(client, url, i, a.max_tokens, lora_of(i),
                                                      not a.no_cache_prompt), ids))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {"lat": [r["lat"] for r in res], "ttft": [r["ttft"] for r in res], "tokens": sum(r["tokens"] for r in res),
            "wall": wall, "cpu": cpu}


def summary(parts: list[dict]) -> dict:
    lat = sorted(x for p in parts for x in p["lat"])
    ttft = sorted(x for p in parts for x in p["ttft"])
    wall, tokens = sum(p["wall"] for p in parts), sum(p["tokens"] for p in parts)

    def q(xs: list[float], pct: int) -> float:
        return statistics.quantiles(xs, n=100, method="inclusive")[pct - 1] if len(xs) > 1 else xs[0]

    return {"n": len(lat), "rps": len(lat) / wall, "tok_s": tokens / wall, "tokens": tokens,
            "ttft50": q(ttft, 50), "p50": q(lat, 50), "p99": q(lat, 99),
            "cpu_ms_tok": 1000 * sum(p["cpu"] for p in parts) / max(tokens, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients = slots of both servers")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256, help="context per slot (llama-server: -c clients*ctx)")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="split each load into this many interleaved rounds")
    ap.add_argument("--quick", action="store_true", help="a short run: 16 requests of 16 tokens, one round")
    ap.add_argument("--no-compile", action="store_true", help="start toolkit serve with --no-compile")
    ap.add_argument("--no-cache-prompt", action="store_true",
                    help='requests ask both servers not to reuse a slot\'s cached prompt ("cache_prompt": false)')
    ap.add_argument("--weights", default="auto", help="toolkit serve --weights (auto, bf16, ...)")
    ap.add_argument("--out", default=None, help="default: bench/results/serve.md (serve-quick.md with --quick)")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.max_tokens, a.rounds = 16, 16, 1
    out = Path(a.out or ROOT / "bench" / "results" / ("serve-quick.md" if a.quick else "serve.md"))

    from toolkit.bundled import smollm2_gguf
    from toolkit.qkernels import native_bf16

    base = Path(smollm2_gguf())
    from peers import llama_tool

    found = llama_tool("llama-server")  # one line on stderr when missing
    have_llama = found is not None
    llama_bin = Path(found or "llama-server")
    k = a.adapters
    loads = {"no adapters": lambda i: [], f"{k} adapters": lambda i: [{"id": i % k, "scale": 1.0}]}
    load_before = os.getloadavg()[0]
    results: dict[tuple[str, str], list[dict]] = {}
    procs: dict[str, tuple[subprocess.Popen, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, Path(tmp), k, a.rank)
        try:
            t0 = time.perf_counter()
            procs["toolkit serve"] = start_toolkit(base, adapters, a)
            startup = time.perf_counter() - t0
            if have_llama:
                procs["llama-server"] = start_llama(llama_bin, base, adapters, a)
            warm = argparse.Namespace(**{**vars(a), "max_tokens": 4})
            for name, (proc, url) in procs.items():  # warm-up: first passes of both loads at every batch size
                for lora_of in loads.values():
                    run_load(url, proc.pid, range(a.clients), warm, lora_of)
            per = a.requests // a.rounds
            for r in range(a.rounds):
                for load, lora_of in loads.items():
                    for name, (proc, url) in procs.items():
                        part = run_load(url, proc.pid, range(r * per, (r + 1) * per), a, lora_of)
                        results.setdefault((name, load), []).append(part)
                        print(f"round {r + 1}/{a.rounds} {name:13s} {load}: {part['wall']:.1f} s", file=sys.stderr)
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    load_after = os.getloadavg()[0]
    rows = {key: summary(parts) for key, parts in results.items()}

    lines = [
        f"# toolkit serve vs llama-server: {a.clients} concurrent clients, per-request LoRA",
        "",
        (f"SmolLM2-135M-Instruct Q4_1 GGUF, CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} "
         f"cores, bf16 instructions: {'yes' if native_bf16() else 'no'}, torch {torch.__version__}), both servers "
         f"on loopback with {a.threads} threads, {a.clients} slots "
         f"of {a.ctx} tokens (llama-server `-np {a.clients} -c {a.clients * a.ctx}`), {k} random GGUF adapters "
         f"r={a.rank} on every linear loaded without applying them. Per server and load: {a.requests} streaming "
         f"`/v1/completions` from {a.clients} concurrent clients, {a.max_tokens} generated tokens each "
         f"(ignore_eos, temperature 0.8), {len(PROMPTS)} prompts in turn, prompt caching "
         f"{CACHE_OFF if a.no_cache_prompt else CACHE_ON}; "
         f"the loads interleave across the servers ({a.rounds} round(s)). "
         f"toolkit serve {'without' if a.no_compile else 'with'} torch.compile, `--weights {a.weights}` "
         f"(startup {startup:.0f} s). "
         f"1-minute load average {load_before:.1f} before, {load_after:.1f} after (other jobs shared the machine)."),
        "",
        "| server | load | requests/s | generated tok/s | TTFT p50 (s) | latency p50 (s) | latency p99 (s) | "
        "server CPU ms / token |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, load), r in rows.items():
        lines.append(f"| {name} | {load} | {r['rps']:.2f} | {r['tok_s']:.1f} | {r['ttft50']:.2f} | {r['p50']:.2f} | "
                     f"{r['p99']:.2f} | {r['cpu_ms_tok']:.1f} |")
    lines.append("")
    if not have_llama:
        lines += ["llama-server was not found (bench/build_llama_tools.sh builds it): its rows are missing.", ""]
    else:
        for load, goal in ((f"{k} adapters", 2.0), ("no adapters", 1.0)):
            ours, theirs = rows[("toolkit serve", load)], rows[("llama-server", load)]
            ratio = ours["tok_s"] / theirs["tok_s"]
            lines.append(f"- {load}: toolkit serve **{ratio:.2f}x** llama-server's throughput (goal >= {goal:g}x: "
                         f"{'met' if ratio >= goal else 'not met'}); p50 latency {ours['p50'] / theirs['p50']:.2f}x, "
                         f"TTFT p50 {ours['ttft50'] / max(theirs['ttft50'], 1e-9):.2f}x.")
        lines.append("")
    text = "\n".join(lines)
    from toolkit.fileutil import atomic_path

    with atomic_path(out) as tmp_out:
        Path(tmp_out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
