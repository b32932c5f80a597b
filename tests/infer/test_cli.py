"""`toolkit infer`: llama.cpp's flags, streaming to stdout, timings to stderr, adapters passed to load, errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

from oracle_llama import llama_greedy
from toolkit.cli import main as cli_main
from toolkit.config import parse_lora_flags
from toolkit.infer.cli import InferConfig
from toolkit.config import parse_config
from toolkit.gguf_io import open_gguf
from toolkit.tokenizer import Tokenizer


def test_flags_parse_like_llama_cpp():
    cfg = parse_config(InferConfig, ["-m", "x.gguf", "-p", "hi", "-n", "5", "--temp", "0.3", "--top-k", "7",
                                     "--top-p", "0.5", "--min-p", "0.1", "--repeat-penalty", "1.1",
                                     "--presence-penalty", "0.2", "--seed", "3", "-c", "256", "-t", "2",
                                     "--ignore-eos", "--device", "cpu", "--dtype", "f32", "--lora", "a.gguf",
                                     "--lora-scaled", "b.gguf", "0.5", "--lora", "c"], prog="t")
    assert (cfg.n_predict, cfg.temp, cfg.top_k, cfg.top_p, cfg.min_p, cfg.seed, cfg.ctx_size, cfg.threads) == \
        (5, 0.3, 7, 0.5, 0.1, 3, 256, 2)
    assert cfg.ignore_eos and cfg.repeat_penalty == 1.1 and cfg.presence_penalty == 0.2
    assert parse_lora_flags(cfg.lora, cfg.lora_scaled) == [("a.gguf", 1.0), ("c", 1.0), ("b.gguf", 0.5)]


def test_greedy_output_equals_llama_cpp_and_timings_go_to_stderr(tiny_llama, capsys):
    prompt = "Once upon a time"
    rc = cli_main(["infer", "-m", str(tiny_llama), "-p", prompt, "-n", "12", "--temp", "0", "--ignore-eos",
                   "-t", "2"])
    cap = capsys.readouterr()
    assert rc == 0
    tok = Tokenizer.from_gguf(open_gguf(tiny_llama))
    expected = tok.decode(llama_greedy(tiny_llama, tok.encode(prompt), 12))
    assert cap.out == prompt + expected  # the prompt is echoed, as llama-cli does
    assert "tokens per second" in cap.err and "eval time" in cap.err


def test_prompt_file_and_chat_template(tiny_llama, tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_text("Tell me a story")
    assert cli_main(["infer", "-m", str(tiny_llama), "-f", str(f), "-n", "3", "--temp", "0", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.startswith("Tell me a story")
    # --chat renders the GGUF template (not echoed); stdin is not a TTY here, so one turn
    assert cli_main(["infer", "-m", str(tiny_llama), "-p", "hi", "--chat", "-n", "3", "--temp", "0",
                     "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    tok = Tokenizer.from_gguf(open_gguf(tiny_llama))
    templated = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == tok.decode(llama_greedy(tiny_llama, tok.encode(templated), 3)) + "\n"


def test_errors_are_one_line(tiny_llama, tmp_path):
    r = subprocess.run([sys.executable, "-m", "toolkit.cli", "infer", "-m", str(tmp_path / "nope.gguf"), "-p", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == f"toolkit: error: {tmp_path / 'nope.gguf'}: no such file"
    r = subprocess.run([sys.executable, "-m", "toolkit.cli", "infer", "-m", str(tiny_llama)], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "give a prompt" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "toolkit.cli", "infer", "-m", str(tiny_llama), "-p", "x",
                        "--lora-scaled", "a.gguf", "big"], capture_output=True, text=True)
    assert r.returncode == 1 and "scale 'big' is not a number" in r.stderr
