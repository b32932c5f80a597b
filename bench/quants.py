"""Quantize / dequantize throughput of toolkit.quants against libggml (llama.cpp's C, through ctypes) and
gguf-py's numpy, measured in one run on the same 4096x4096 float32 tensor, with the same thread count.

    python bench/quants.py [--threads N] [--repeat R] [--types Q4_K,Q6_K,Q8_0] [--device cpu|cuda]
                           [--clock wall|cpu] [--out FILE]

MB/s counts the float32 side (64 MiB for 4096x4096). libggml's ggml_quantize_chunk / to_float are
single-threaded calls, so they are run on N row ranges from N Python threads (ctypes releases the GIL);
torch gets torch.set_num_threads(N). gguf-py's numpy is single-threaded whatever N is, and cannot quantize
K-quants at all. Every timing is the best of R runs; our bytes are checked against libggml's each time.
"ours" is the torch codec (TOOLKIT_CODEC=torch); the second table times toolkit's default, which on the CPU hands
the block types to libggml itself (toolkit.ggml_codec), so its ratio shows what the dispatch costs.
--clock cpu times the process's CPU (all threads; for 1 thread on a shared machine, where other jobs disturb
wall time far more) instead of the wall clock.
Writes a markdown table to bench/results/quants.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# OpenMP threads that spin while waiting turn a shared machine (other jobs on the same cores) into a many-fold
# slowdown of torch's multi-threaded ops (libggml's row ranges on Python threads are not affected); as
# toolkit.train.finetune, sleep instead. Only applies if torch is not loaded yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import gguf
import oracle_ggml
from gguf import GGMLQuantizationType

from toolkit import ggml_codec
from toolkit.qlinear import QuantLinear
from toolkit.quants import dequantize, quantize


CLOCK = time.perf_counter


def best(fn, repeat: int) -> tuple[float, object]:
    out, ts = None, []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = CLOCK()
        out = fn()
        if isinstance(out, torch.Tensor) and out.is_cuda:
            torch.cuda.synchronize()
        ts.append(CLOCK() - t)
    return min(ts), out


def split_rows(rows: int, parts: int) -> list[tuple[int, int]]:
    step = -(-rows // parts)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def ggml_quantize_mt(x: np.ndarray, qtype, pool: ThreadPoolExecutor, threads: int) -> bytes:
    parts = list(pool.map(lambda rr: oracle_ggml.ggml_quantize(x[rr[0]:rr[1]], qtype), split_rows(len(x), threads)))
    return b"".join(parts)


def ggml_dequantize_mt(raw: np.ndarray, qtype, cols: int, pool: ThreadPoolExecutor, threads: int) -> np.ndarray:
    """One fresh result, as ours: each thread's to_float writes its rows of it in place."""
    out = np.empty((raw.shape[0], cols), np.float32)

    def one(rr):
        oracle_ggml.ggml_dequantize(raw[rr[0]:rr[1]], qtype, (rr[1] - rr[0]) * cols, out=out[rr[0]:rr[1]])

    list(pool.map(one, split_rows(raw.shape[0], threads)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default="Q4_K,Q6_K,Q8_0")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quants.md"))
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if not oracle_ggml.available():
        print("llama-cpp-python's libggml is needed for this benchmark", file=sys.stderr)
        return 1

    torch.set_num_threads(args.threads)
    n = args.size
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    xt = torch.from_numpy(x).to(args.device)
    mb = x.nbytes / 1e6
    rows, decode_rows, default_rows = [], [], []

    def measure(name: str, pool: ThreadPoolExecutor) -> None:
        qt = GGMLQuantizationType[name]
        # quantize: libggml, ours, gguf-py (where it can)
        t_c, ref = best(lambda: ggml_quantize_mt(x, qt, pool, args.threads), args.repeat)
        ggml_codec.set_codec("torch")
        t_t, ours = best(lambda: quantize(xt, qt), max(1, args.repeat - 1))
        exact_q = ours.cpu().numpy().tobytes() == ref
        try:
            t_g, _ = best(lambda: gguf.quants.quantize(x, qt), args.repeat)
        except NotImplementedError:
            t_g = None
        raw = np.frombuffer(ref, np.uint8).reshape(n, -1)
        raw_t = torch.from_numpy(raw.copy()).to(args.device)
        # dequantize
        dr = max(5, args.repeat)  # cheap: more tries against a noisy machine
        d_c, ref_f = best(lambda: ggml_dequantize_mt(raw, qt, n, pool, args.threads), dr)
        d_t, ours_f = best(lambda: dequantize(raw_t, qt, (n, n)), dr)
        d_g, _ = best(lambda: gguf.quants.dequantize(raw, qt), dr)
        exact_d = np.array_equal(ours_f.cpu().numpy().view(np.uint32), ref_f.view(np.uint32))
        ggml_codec.set_codec("auto")
        used = "libggml" if ggml_codec.handles(qt, "dequantize", xt.device) else "torch"
        t_a, ours_a = best(lambda: quantize(xt, qt), max(1, args.repeat - 1))
        d_a, ours_af = best(lambda: dequantize(raw_t, qt, (n, n)), dr)
        same_a = ours_a.cpu().numpy().tobytes() == ref and np.array_equal(ours_af.cpu().numpy().view(np.uint32),
                                                                           ref_f.view(np.uint32))
        default_rows.append((name, used, mb / t_a, t_c / t_a, mb / d_a, d_c / d_a, same_a))
        ggml_codec.set_codec("torch")
        rows.append((name, mb / t_t, mb / t_c, None if t_g is None else mb / t_g, t_c / t_t,
                     None if t_g is None else t_g / t_t, exact_q, mb / d_t, mb / d_c, mb / d_g,
                     d_c / d_t, d_g / d_t, exact_d))
        print(f"{name}: quantize {mb / t_t:.0f} MB/s (libggml {mb / t_c:.0f}, x{t_c / t_t:.2f}; exact {exact_q})  "
              f"dequantize {mb / d_t:.0f} MB/s (libggml x{d_c / d_t:.2f}, gguf-py x{d_g / d_t:.2f}; exact {exact_d})",
              flush=True)
        # QuantLinear decode (one token) against a dense fp32 matmul on the dequantized weight
        layer = QuantLinear(raw_t, qt, n, n)
        dense = ours_f
        v = torch.randn(1, n, device=args.device)
        with torch.no_grad():
            l_q, _ = best(lambda: layer(v), args.repeat + 2)
            l_d, _ = best(lambda: v @ dense.t(), args.repeat + 2)
            l_k = float("nan")
            if args.device == "cpu":  # the inference path: torch's int4 kernel / a bf16 copy (toolkit.qkernels)
                layer.use_kernels = True
                layer(v)  # builds the kernel form once
                l_k, _ = best(lambda: layer(v), args.repeat + 2)
        decode_rows.append((name, l_q * 1e3, l_d * 1e3, raw.nbytes / 2**20, dense.numel() * 4 / 2**20, l_k * 1e3,
                            layer.kernel_weight().kind if args.device == "cpu" else "-"))

    with ThreadPoolExecutor(args.threads) as pool:
        for name in args.types.split(","):
            measure(name, pool)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    lines = [
        "# toolkit.quants throughput",
        "",
        (f"`python bench/quants.py --threads {args.threads}{' --clock cpu' if args.clock == 'cpu' else ''}` on a "
         f"{n}x{n} float32 tensor ({mb:.0f} MB), device "
         f"{args.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
         f"{os.cpu_count()} CPUs, load average {load:.1f} at the end, best of {args.repeat} (quantize) / "
         f"{max(5, args.repeat)} (dequantize), {'process CPU time' if args.clock == 'cpu' else 'wall clock'}."),
        "libggml: llama-cpp-python's build, N row ranges on N threads; gguf-py: numpy, one thread.",
        ("Ratios are ours / theirs in throughput (> 1: we are faster). exact: bytes (quantize) or float bits "
         "(dequantize) identical to libggml's."),
        "",
        "| type | quantize MB/s | libggml | gguf-py | vs libggml | vs gguf-py | exact | dequantize MB/s | libggml | gguf-py | vs libggml | vs gguf-py | exact |",
        "|---|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} | {fmt(r[3], '.0f')} | {r[4]:.2f}x | {fmt(r[5], '.2f')}"
                     f"{'' if r[5] is None else 'x'} | {'yes' if r[6] else 'NO'} | {r[7]:.0f} | {r[8]:.0f} | {r[9]:.0f} | "
                     f"{r[10]:.2f}x | {r[11]:.2f}x | {'yes' if r[12] else 'NO'} |")
    lines += [
        "",
        "toolkit's default codec (TOOLKIT_CODEC=auto: libggml for CPU block types when llama-cpp-python is installed):",
        "",
        "| type | codec | quantize MB/s | vs libggml | dequantize MB/s | vs libggml | exact |",
        "|---|---|---:|---:|---:|---:|:-:|",
    ]
    for r in default_rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.2f}x | {r[4]:.0f} | {r[5]:.2f}x | {'yes' if r[6] else 'NO'} |")
    lines += [
        "",
        f"QuantLinear decode (x: [1, {n}]): packed weight dequantized on the fly (training's path), the CPU kernel",
        "path inference uses (`use_kernels`: int4 kernel or bf16 copy), and a dense fp32 matmul on the",
        "already-dequantized weight (which would cost the memory in the last column).",
        "",
        "| type | QuantLinear, blocks ms | QuantLinear, kernel ms (form) | dense fp32 ms | packed MiB | dense MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in decode_rows:
        lines.append(f"| {r[0]} | {r[1]:.1f} | {r[5]:.2f} ({r[6]}) | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} |")
    if load > (os.cpu_count() or 1):
        lines += ["", (f"Note: the machine was oversubscribed (load {load:.1f} on {os.cpu_count()} CPUs) while this "
                       "ran, so absolute numbers are low and ratios noisy; rerun on an idle machine for reference figures.")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
