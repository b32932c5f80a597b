"""Decode speed with one r=16 LoRA adapter on every linear vs no adapter, toolkit and llama.cpp in one run.

    python bench/lora.py [--threads 2] [--tokens 64] [--repeat 3] [--device cpu|cuda] [--compile no|yes|both]

Model: the bundled SmolLM2-135M-Instruct Q4_1 GGUF (30 layers x 7 linears = 210 adapted linears). Decode is
measured teacher-forced: a 16-token prompt, then --tokens single-token steps through the KV cache with fixed
token ids (the same ids for every configuration, so nothing but the adapter differs). llama.cpp runs the same
GGUF and the same GGUF adapter through llama-cpp-python (llama_decode one token at a time, same threads).
Each engine and mode runs in its own process (bench/isolate.py); each figure is the best of --repeat runs.
Writes a markdown table to bench/results/lora.md.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from toolkit.adapter import Adapter, BaseInfo, LoraPair, write_gguf_adapter
from toolkit.bundled import smollm2_gguf
from toolkit.model import load

from isolate import isolated

RANK = 16


def make_adapter(model_path: Path, out: Path) -> Path:
    """r=16 on every linear of every block (attn_q/k/v/output, ffn_gate/up/down), random non-zero A and B."""
    info = BaseInfo.of(model_path)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for n, shape in info.shapes.items():
        if n.startswith("blk.") and len(shape) == 2:
            out_f, in_f = shape
            tensors[n] = LoraPair(torch.randn(RANK, in_f, generator=g) * 0.01, torch.randn(out_f, RANK, generator=g) * 0.01)
    write_gguf_adapter(Adapter(tensors, 2.0 * RANK, info.arch), out, base=info)
    return out


@torch.inference_mode()
def toolkit_decode(model, prompt: list[int], steps: list[int], device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds for len(steps) single-token decode steps after a prefill of `prompt`."""
    model.setup_caches(1, len(prompt) + len(steps))
    try:
        model(torch.tensor([prompt], device=device), input_pos=torch.arange(len(prompt), device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        for i, tok in enumerate(steps):
            p = len(prompt) + i
            model(torch.tensor([[tok]], device=device), input_pos=torch.tensor([p], device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        model.clear_caches()


def llama_decode(model_path: Path, adapter: Path | None, prompt: list[int], steps: list[int],
                 threads: int) -> tuple[float, float]:
    import oracle_llama

    L = oracle_llama._lib()
    m = oracle_llama._model(str(model_path))
    cp = L.llama_context_default_params()
    cp.n_ctx = len(prompt) + len(steps) + 8
    cp.n_batch = max(len(prompt), 1)
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(m, cp)
    try:
        if adapter is not None:
            ptr = (L.llama_adapter_lora_p_ctypes * 1)(oracle_llama._adapter(str(model_path), str(adapter)))
            scale = (ctypes.c_float * 1)(1.0)
            if L.llama_set_adapters_lora(ctx, ptr, 1, scale) != 0:
                raise RuntimeError("llama_set_adapters_lora failed")
        arr = (L.llama_token * len(prompt))(*prompt)
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(prompt))) != 0:
            raise RuntimeError("llama_decode failed")
        one = (L.llama_token * 1)()
        t0, c0 = time.perf_counter(), time.process_time()
        for tok in steps:
            one[0] = tok
            if L.llama_decode(ctx, L.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed")
            L.llama_get_logits_ith(ctx, -1)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        L.llama_free(ctx)


def _best(runs: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    return {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in runs.items()}


def toolkit_runs(path: Path, adapter: Path, prompt: list[int], steps: list[int], threads: int, compiled: bool,
                 device: str, repeat: int) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) seconds for: no adapter ever loaded, adapter loaded at scale 0, adapter active."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    labels = ("none", "off", "lora")
    plain, _ = load(path, device=device, compile=compiled)  # never had an adapter: the baseline
    model, _ = load(path, device=device, compile=compiled)
    name = model.load_adapter(adapter, scale=0.0)
    for label in labels:  # warm-up (compiled: one graph per adapter structure, made here)
        model.set_adapters({name: 1.0} if label == "lora" else {})
        toolkit_decode(plain if label == "none" else model, prompt, steps[:8], dev)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in labels}
    for _ in range(repeat):  # alternate, so machine load hits all alike
        for label in labels:
            model.set_adapters({name: 1.0} if label == "lora" else {})
            runs[label].append(toolkit_decode(plain if label == "none" else model, prompt, steps, dev))
    return _best(runs)


def llama_runs(path: Path, adapter: Path, prompt: list[int], steps: list[int], threads: int,
               repeat: int) -> dict[str, tuple[float, float]]:
    runs: dict[str, list[tuple[float, float]]] = {"none": [], "lora": []}
    files = {"none": None, "lora": adapter}
    llama_decode(path, adapter, prompt, steps[:8], threads)
    for _ in range(repeat):
        for label in runs:
            runs[label].append(llama_decode(path, files[label], prompt, steps, threads))
    return _best(runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="2", help="thread counts, comma-separated (e.g. 1,2)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--compile", choices=("no", "yes", "both"), default="both",
                    help="toolkit's decode step eager, through torch.compile (--compile), or both")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora.md"))
    args = ap.parse_args()
    thread_counts = [int(t) for t in str(args.threads).split(",")]
    path = Path(smollm2_gguf())
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(100, 40000, 15).tolist()
    steps = rng.integers(100, 40000, args.tokens).tolist()
    rows: list[tuple[str, int, dict[str, tuple[float, float]]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(path, Path(tmp) / "r16.gguf")
        variants = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
        for threads in thread_counts:  # every engine in its own process (bench/isolate.py)
            for compiled in variants:
                how = "--compile" if compiled else "eager"
                print(f"toolkit {how}, {threads} threads ...", file=sys.stderr)
                best = isolated(toolkit_runs, path, adapter, prompt, steps, threads, compiled, args.device,
                                args.repeat)
                rows.append((f"toolkit {how} (torch {torch.__version__}, {args.device})", threads, best))
            if not args.no_llama and args.device == "cpu":
                print(f"llama.cpp, {threads} threads ...", file=sys.stderr)
                best = isolated(llama_runs, path, adapter, prompt, steps, threads, args.repeat)
                rows.append(("llama.cpp (llama-cpp-python, CPU)", threads, best))
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# LoRA decode overhead",
        "",
        (f"SmolLM2-135M-Instruct Q4_1, one r={RANK} adapter on all 210 block linears (F32 A/B), {args.tokens} "
         f"decode steps after a 16-token prompt, best of {args.repeat} alternating runs; "
         f"{platform.machine()}, load average {load_avg:.1f} during the run. `python bench/lora.py`"),
        "",
        "Wall-clock tok/s; overheads from wall time and from process CPU time (steadier on a shared machine, but it",
        "also counts spin-waiting threads). `loaded, scale 0`: the adapter attached but switched off.",
        "",
        ("| engine | threads | no adapter tok/s | loaded, scale 0 tok/s | r=16 active tok/s | adapter ms/token | "
         "overhead (wall) | overhead (CPU time) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, threads, r in rows:
        (w0, c0), (w1, c1) = r["none"], r["lora"]
        off = f"{args.tokens / r['off'][0]:.1f}" if "off" in r else "-"
        lines.append(f"| {label} | {threads} | {args.tokens / w0:.1f} | {off} | {args.tokens / w1:.1f} | "
                     f"{1000 * (w1 - w0) / args.tokens:.2f} | {100 * (w1 / w0 - 1):+.1f}% | {100 * (c1 / c0 - 1):+.1f}% |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
