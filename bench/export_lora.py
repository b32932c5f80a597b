"""Merging an r=16 all-linear LoRA into SmolLM2 (Q4_1): time, file size, and what requantizing costs.

    python bench/export_lora.py [--threads 2] [--repeat 2] [--out FILE]

Times `toolkit export-lora` with --outtype keep (merged tensors requantized to Q4_1/Q8_0) and f16 (llama.cpp's
llama-export-lora semantics: merged tensors F16, the rest copied). The peers in the same run: the real
llama-export-lora (built by bench/build_llama_tools.sh, found by bench/peers.py; its row is skipped with one line when
missing) and the same merge written with gguf-py + numpy (GGUFReader, gguf.quants.dequantize, GGUFWriter).
Quality: llama.cpp's strided perplexity (n_ctx 256) of configs/data/planets-valid.txt for the base, the base
with the adapter unmerged, and each merged file: keep vs unmerged is the cost of requantizing.
The adapter is random (seeded, A ~ N(0, 0.05^2), B ~ N(0, 0.01^2), alpha 32): it moves perplexity measurably
without being a trained adapter. Writes a markdown table to bench/results/export_lora.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from toolkit.adapter import Adapter, LoraPair, write_gguf_adapter  # noqa: E402
from toolkit.bundled import smollm2_gguf  # noqa: E402
from toolkit.convert.export_lora import export_lora  # noqa: E402
from toolkit.gguf_io import open_gguf  # noqa: E402
from peers import llama_tool  # noqa: E402

LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def make_adapter(base: Path, path: Path, r: int = 16, seed: int = 0) -> Path:
    g = open_gguf(base)
    gen = torch.Generator().manual_seed(seed)
    t = {}
    for name, ti in g.tensors.items():
        if any(name.endswith(f"{m}.weight") for m in LINEAR):
            out, inp = ti.shape
            t[name] = LoraPair(torch.randn(r, inp, generator=gen) * 0.05, torch.randn(out, r, generator=gen) * 0.01)
    write_gguf_adapter(Adapter(t, 32.0, g.arch), path)
    return path


def gguf_py_merge(base: Path, adapter: Path, out: Path) -> None:
    """The peer: llama-export-lora's algorithm in gguf-py + numpy (merged -> F16, untouched copied)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    rb, ra = GGUFReader(str(base)), GGUFReader(str(adapter))
    lora = {t.name: t for t in ra.tensors}
    alpha = float(ra.fields["adapter.lora.alpha"].parts[-1][0])
    arch = bytes(rb.fields["general.architecture"].parts[-1]).decode()
    w = GGUFWriter(str(out), arch)
    for f in rb.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == GGUFValueType.ARRAY:
            sub = f.types[-1]
            val = [bytes(f.parts[i]).decode() if sub == GGUFValueType.STRING else f.parts[i][0] for i in f.data]
            w.add_key_value(f.name, val, vt, sub_type=sub)
        else:
            val = bytes(f.parts[-1]).decode() if vt == GGUFValueType.STRING else f.parts[-1][0]
            if f.name == "general.file_type":
                val = 1
            w.add_key_value(f.name, val, vt)
    for t in rb.tensors:
        if t.name + ".lora_a" in lora:
            x = dequantize(t.data, t.tensor_type).astype(np.float32)
            a = np.asarray(lora[t.name + ".lora_a"].data, dtype=np.float32)
            b = np.asarray(lora[t.name + ".lora_b"].data, dtype=np.float32)
            x = x + (alpha / a.shape[0]) * (b @ a)
            w.add_tensor(t.name, x.astype(np.float16), raw_dtype=Q.F16)
        else:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "export_lora.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["TOOLKIT_TEST_THREADS"] = str(args.threads)
    from oracle_llama import llama_perplexity, llama_tokenize

    base = smollm2_gguf()
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        ad = make_adapter(base, tmp / "r16.gguf")
        files = {k: tmp / f"merged-{k}.gguf" for k in ("keep", "f16", "gguf-py")}
        times = {
            "keep": best_time(lambda: export_lora(base, files["keep"], [(str(ad), 1.0)], "keep", progress=False),
                              args.repeat),
            "f16": best_time(lambda: export_lora(base, files["f16"], [(str(ad), 1.0)], "f16", progress=False),
                             args.repeat),
            "gguf-py": best_time(lambda: gguf_py_merge(base, ad, files["gguf-py"]), args.repeat),
        }
        exe = llama_tool("llama-export-lora")
        if exe:
            files["llama.cpp"] = tmp / "merged-llama.gguf"
            times["llama.cpp"] = best_time(lambda: subprocess.run(
                [exe, "-m", str(base), "--lora", str(ad), "-o", str(files["llama.cpp"]), "-t", str(args.threads)],
                check=True, capture_output=True), args.repeat)
        text = (ROOT / "configs" / "data" / "planets-valid.txt").read_text()
        toks = llama_tokenize(base, text)
        ppl = {"base (no adapter)": llama_perplexity(base, toks, 256),
               "base + adapter unmerged": llama_perplexity(base, toks, 256, adapters=[(str(ad), 1.0)])}
        for k, f in files.items():
            ppl[f"merged {k}"] = llama_perplexity(f, toks, 256)
    finally:
        sizes = {k: f.stat().st_size for k, f in files.items() if f.exists()}
        base_size = base.stat().st_size
        shutil.rmtree(tmp, ignore_errors=True)

    un = ppl["base + adapter unmerged"]
    load = os.getloadavg()[0]
    lines = [
        "# export-lora: merging an r=16 all-linear adapter into SmolLM2-135M (Q4_1)",
        "",
        f"`python bench/export_lora.py --threads {args.threads}` on {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, best of {args.repeat}, load average {load:.1f} at the end (shared machine). "
        "210 merged tensors (30 layers x 7 linears).",
        "",
        "| merge | time (s) | vs toolkit keep | output size (MB) | size vs base |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"keep": "toolkit `--outtype keep` (requantized to Q4_1/Q8_0)",
             "f16": "toolkit `--outtype f16` (llama-export-lora's output)",
             "gguf-py": "gguf-py + numpy, same merge, F16 (peer)", "llama.cpp": "llama-export-lora (peer)"}
    for k, t in times.items():
        lines.append(f"| {names[k]} | {t:.1f} | {t / times['keep']:.2f}x | {sizes[k] / 1e6:.0f} | "
                     f"{sizes[k] / base_size:.2f}x |")
    if "llama.cpp" not in times:
        lines += ["", "llama-export-lora was not found (bench/build_llama_tools.sh builds it), so the peer in this "
                      "run is the same algorithm written with gguf-py + numpy."]
    lines += ["", f"Perplexity (llama.cpp, n_ctx 256, {len(toks)} tokens of configs/data/planets-valid.txt):", "",
              "| model | perplexity | vs unmerged |", "|---|---:|---:|"]
    for k, v in ppl.items():
        lines.append(f"| {k} | {v:.4f} | {100 * (v / un - 1):+.2f}% |")
    lines += ["", "`keep` is the cost of requantizing the merged weights back to the base's 4-bit blocks; the F16 "
                  "merges carry the base's own Q4_1 rounding plus the exact delta."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
