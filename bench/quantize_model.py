"""`toolkit quantize` against llama.cpp's `llama_model_quantize` (llama-cpp-python), same model, same threads.

    python bench/quantize_model.py [--types IQ4_XS,Q4_K_M] [--rounds 2] [--threads 2] [--model M]

Each round runs both as whole commands in fresh processes, alternating (ours includes Python and torch start-up;
llama.cpp's the library load), then checks that every tensor's type and bytes are the same. Writes
bench/results/quantize-model.md. Skips with a line when llama-cpp-python is missing.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORACLE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread, p.allow_requantize = int(sys.argv[3]), int(sys.argv[4]), True
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"quantize_model: {cmd[:4]} failed: {p.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t


def same_tensors(a: Path, b: Path) -> bool:
    import numpy as np

    from toolkit.gguf_io import open_gguf

    ga, gb = open_gguf(a), open_gguf(b)
    return list(ga.tensors) == list(gb.tensors) and all(
        t.qtype == gb.tensors[n].qtype and np.array_equal(t.raw().numpy(), gb.tensors[n].raw().numpy())
        for n, t in ga.tensors.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="IQ4_XS,Q4_K_M")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="GGUF to quantize (default: the bundled SmolLM2 Q4_1)")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("quantize_model: skipped: llama-cpp-python is not installed (the peer)")
        return 0
    from toolkit.bundled import smollm2_gguf
    from toolkit.convert.quantize import parse_ftype

    model = args.model or str(smollm2_gguf())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types.split(","):
            ftype = int(parse_ftype(qtype)[0])
            ours, ref = Path(tmp) / "ours.gguf", Path(tmp) / "ref.gguf"
            t_ours, t_ref = [], []
            for _ in range(args.rounds):
                t_ours.append(timed([sys.executable, "-m", "toolkit.cli", "quantize", model, str(ours), qtype,
                                     "-t", str(args.threads), "--no-progress"]))
                t_ref.append(timed([sys.executable, "-c", ORACLE, model, str(ref), str(ftype), str(args.threads)]))
            ratios = [r / o for o, r in zip(t_ours, t_ref)]
            rows.append(f"| {qtype} | {', '.join(f'{t:.2f}' for t in t_ours)} | {', '.join(f'{t:.2f}' for t in t_ref)} "
                        f"| {', '.join(f'{r:.2f}x' for r in ratios)} | {same_tensors(ours, ref)} |")
            print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    text = (f"# toolkit quantize vs llama_model_quantize\n\n`python bench/quantize_model.py --types {args.types} "
            f"--rounds {args.rounds} --threads {args.threads}`; {Path(model).name}, {args.threads} threads; measured "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load:.1f} at the end. "
            "Whole commands, "
            "alternating; speed = llama.cpp's time / ours per round.\n\n"
            "| type | toolkit s | llama.cpp s | speed vs llama.cpp | same tensors |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    out = ROOT / "bench" / "results" / "quantize-model.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
