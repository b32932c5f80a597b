"""One linear at a time: libggml's mul_mat over the GGUF blocks (the "ggml" weights mode's form) against the
"packed" mode's forms (torch's int4 kernel for Q4_0/Q4_1/Q4_K, a bf16 copy or the sliced blocks for other types,
dequantized blocks past qkernels.max_rows() rows) on the real model's weights: block 0's linears and the head.

Each weight is timed warm (the same weight called repeatedly), alternating the two forms; error is the largest
deviation from the exact float product over the largest |value|. Writes bench/results/ggml_matmul.md.

    python bench/ggml_matmul.py [--threads 2] [--rows 1,4,16,64,256]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def timed(f, x, reps: int) -> float:
    f(x)
    t = time.perf_counter()
    for _ in range(reps):
        f(x)
    return (time.perf_counter() - t) / reps * 1e3


def mode(lin, ggml: bool):
    """The layer in the packed mode (False), or libggml's product over its blocks (True: the ggml mode's form,
    whatever the row count; the mode itself leaves large inputs of some types to the blocks, qkernels.GGML_TILED)."""
    from toolkit import qkernels

    if ggml:
        pw = qkernels.ggml_form(lin.qweight, lin.qtype, lin.in_features)
        return lambda x: qkernels.matmul(x, pw)
    if lin.use_ggml or not lin.use_kernels:
        lin.use_kernels, lin.use_ggml = True, False
        lin.drop_cache()
    return lin


def packed_form(lin, x) -> str:
    from toolkit import qkernels

    if mode(lin, False).kernel_form(x) is None:
        return "blocks"
    pw = lin.kernel_weight()
    if pw.kind == "int4":
        return "int4"
    return "sliced blocks" if pw.blocks is not None and x.shape[0] > qkernels.EMULATED_BF16_MAX_ROWS else "bf16 copy"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,16,64,256")
    ap.add_argument("--out", default=str(RESULTS / "ggml_matmul.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from toolkit import ggml_matmul, qkernels
    from toolkit.bundled import smollm2_gguf
    from toolkit.model import load
    from toolkit.qlinear import QuantLinear

    if not ggml_matmul.available():
        print(f"skipped: {ggml_matmul.unavailable_reason()}")
        return 0
    model, _ = load(smollm2_gguf(), device="cpu", weights="packed")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and (".0." in n or n == "output")}
    lines = [f"SmolLM2-135M-Instruct Q4_1 (Q8_0 head), {args.threads} thread(s), torch {torch.__version__}, "
             f"{platform.machine()}, CPU bf16 instructions: {'yes' if qkernels.native_bf16() else 'no'}. "
             f"Milliseconds a call, warm; `python bench/ggml_matmul.py --threads {args.threads} --rows {args.rows}`",
             "", "| weight | type | rows | packed mode (form) | libggml | packed / libggml | error packed "
             "| error libggml |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            for name, lin in layers.items():
                x = torch.randn(rows, lin.in_features, generator=torch.Generator().manual_seed(rows))
                exact = x @ lin.weight_float().t()
                reps = max(2, int(2e6 // (rows * lin.in_features * lin.out_features // 64 + 1)))
                packed, ggml = mode(lin, False), mode(lin, True)
                ours, mine = packed(x), ggml(x)
                form = packed_form(lin, x)
                tp = timed(packed, x, reps)
                tg = timed(ggml, x, reps)
                tp = min(tp, timed(packed, x, reps))  # packed, ggml, packed: the better packed time
                err = lambda y: float((y - exact).abs().max() / exact.abs().max())  # noqa: E731
                lines.append(f"| {name} | {lin.qtype.name} | {rows} | {tp:.3f} ({form}) | {tg:.3f} | "
                             f"{tp / tg:.2f}x | {err(ours):.1e} | {err(mine):.1e} |")
                print(lines[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parents[1]))
    sys.exit(main())
