"""`toolkit infer`: generate text with a GGUF model (llama.cpp's flag names), LoRA adapters unmerged.

    toolkit infer -m model.gguf -p "Once upon a time" -n 128 --temp 0.7 --lora a.gguf --lora-scaled b.gguf 0.5

Text streams to stdout; prompt and generation speed go to stderr at the end (as llama.cpp prints them).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit.config import arg, compile_arg, parse_config, parse_lora_flags, weights_arg
from toolkit.errors import ToolkitError
from toolkit.infer.sampling import DEFAULTS as D


@dataclass
class InferConfig:
    model: str = arg(None, "-m", "--model", help="GGUF model file", required=True)
    prompt: str = arg(None, "-p", "--prompt", help="prompt text")
    file: str = arg(None, "-f", "--file", help="read the prompt from this file")
    n_predict: int = arg(D.max_tokens, "-n", "--n-predict", help="tokens to generate (-1: until end of text or context)")
    temp: float = arg(D.temperature, "--temp", help="temperature (0: greedy)")
    top_k: int = arg(D.top_k, "--top-k", help="top-k sampling (0: off)")
    top_p: float = arg(D.top_p, "--top-p", help="top-p sampling (1.0: off)")
    min_p: float = arg(D.min_p, "--min-p", help="min-p sampling (0.0: off)")
    repeat_penalty: float = arg(D.repeat_penalty, "--repeat-penalty", help="penalize repeated tokens (1.0: off)")
    repeat_last_n: int = arg(D.penalty_last_n, "--repeat-last-n", help="how many recent tokens the penalties look at")
    presence_penalty: float = arg(D.presence_penalty, "--presence-penalty", help="presence penalty (0.0: off)")
    frequency_penalty: float = arg(D.frequency_penalty, "--frequency-penalty", help="frequency penalty (0.0: off)")
    seed: int = arg(-1, "-s", "--seed", help="RNG seed (-1: random)")
    ctx_size: int = arg(4096, "-c", "--ctx-size", help="context size (0: the model's)")
    threads: int = arg(0, "-t", "--threads", help="CPU threads (0: torch's default)")
    ignore_eos: bool = arg(False, "--ignore-eos", help="keep generating past end-of-text")
    device: str = arg("auto", "--device", help="auto, cpu, cuda or mps", choices=["auto", "cpu", "cuda", "mps"])
    dtype: str = arg(None, "--dtype", help="compute dtype: f32, f16, bf16 (default: f32 on CPU, bf16 on CUDA)")
    weights: str = weights_arg()
    compile: bool = compile_arg()
    chat: bool = arg(False, "--chat", help="apply the GGUF chat template; interactive turns on a TTY")
    system: str = arg(None, "--system", help="system message for --chat")
    lora: list[str] = arg([], "--lora", action="append", metavar="FILE",
                          help="LoRA adapter (GGUF, PEFT dir or GGLA), repeatable")
    lora_scaled: list[list[str]] = arg([], "--lora-scaled", action="append", nargs=2, metavar=("FILE", "SCALE"),
                                       help="LoRA adapter with a scale, repeatable")
    verbose_prompt: bool = arg(False, "--verbose-prompt", help="print the prompt's tokens to stderr")


def _prompt_text(cfg: InferConfig) -> str:
    if cfg.file:
        p = Path(cfg.file)
        if not p.is_file():
            raise ToolkitError("prompt file not found", cfg.file)
        return p.read_text(encoding="utf-8", errors="replace")
    return cfg.prompt or ""


def _print_stats(stats, load_s: float) -> None:
    print(f"\n\nload time   = {load_s * 1000:10.2f} ms", file=sys.stderr)
    print(f"prompt eval = {stats.prompt_s * 1000:10.2f} ms / {stats.prompt_tokens:5d} tokens "
          f"({stats.prompt_tps:8.2f} tokens per second)", file=sys.stderr)
    print(f"eval time   = {stats.gen_s * 1000:10.2f} ms / {stats.gen_tokens:5d} runs   "
          f"({stats.gen_tps:8.2f} tokens per second)", file=sys.stderr)


def infer(cfg: InferConfig, out=None) -> str:
    """Run one generation (or an interactive chat) as configured; returns the generated text."""
    from toolkit.infer.generate import GenStats, stream
    from toolkit.model import load

    out = out or sys.stdout
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    if cfg.compile:
        print("compiling the decode step (torch.compile) ...", file=sys.stderr)
    model, tok = load(cfg.model, device=cfg.device, dtype=cfg.dtype, weights=cfg.weights,
                      adapters=parse_lora_flags(cfg.lora, cfg.lora_scaled), compile=cfg.compile)
    load_s = time.perf_counter() - t0
    n_ctx = cfg.ctx_size if cfg.ctx_size > 0 else model.args.ctx_len
    kw = dict(temperature=cfg.temp, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
              repeat_penalty=cfg.repeat_penalty, presence_penalty=cfg.presence_penalty,
              frequency_penalty=cfg.frequency_penalty, penalty_last_n=cfg.repeat_last_n,
              seed=None if cfg.seed < 0 else cfg.seed, ignore_eos=cfg.ignore_eos, n_ctx=n_ctx)
    n = cfg.n_predict if cfg.n_predict >= 0 else n_ctx

    def run(prompt: str, echo: bool) -> str:
        ids = tok.encode(prompt, special=True)
        if cfg.verbose_prompt:
            print(" ".join(str(i) for i in ids), file=sys.stderr)
        if echo:
            out.write(prompt)
            out.flush()
        stats = GenStats()
        pieces = []
        for piece in stream(model, tok, ids, n, stats=stats, **kw):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        _print_stats(stats, load_s)
        return "".join(pieces)

    if not cfg.chat:
        text = _prompt_text(cfg)
        return run(text, echo=True)
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    first = _prompt_text(cfg)
    interactive = sys.stdin.isatty() and out is sys.stdout
    reply = ""
    if first:
        messages.append({"role": "user", "content": first})
        reply = run(tok.apply_chat_template(messages, add_generation_prompt=True), echo=False)
        messages.append({"role": "assistant", "content": reply})
        out.write("\n")
    while interactive:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = run(tok.apply_chat_template(messages, add_generation_prompt=True), echo=False)
        messages.append({"role": "assistant", "content": reply})
        out.write("\n")
    return reply


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(InferConfig, argv, prog="toolkit infer", description=__doc__.splitlines()[0])
    if not cfg.chat and not cfg.prompt and not cfg.file:
        raise ToolkitError("give a prompt with -p TEXT or -f FILE (or use --chat)")
    infer(cfg)
    return 0
