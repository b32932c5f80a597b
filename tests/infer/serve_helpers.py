"""Helpers for the serve tests: start the real server (in a thread or as `toolkit serve`), and a scripted
backend whose output depends on the adapter set active *while it generates* (to catch cross-talk)."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx


class ScriptedBackend:
    """Bytes tokenizer; token i of a generation is a letter chosen by hashing (prompt, active adapters, seed,
    i), read from the adapter state *at each step*, so a set switched mid-generation shows in the text."""

    n_ctx = 64
    vocab_size = 256
    model_id = "scripted"

    def __init__(self, delay: float = 0.002):
        self.delay = delay
        self.active: dict[str, float] = {}
        self.loaded: set[str] = set()
        self.set_calls = 0
        self.unloaded: list[str] = []
        self.threads: set[str] = set()

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def chat_prompt(self, messages) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")

    def load_adapter(self, path: str, name: str) -> None:
        if not os.path.isfile(path) or Path(path).read_bytes()[:4] != b"LORA":
            raise ValueError(f"{path}: not an adapter")
        self.loaded.add(name)

    def unload_adapter(self, name: str) -> None:
        self.loaded.discard(name)
        self.unloaded.append(name)

    def set_adapters(self, scales: dict[str, float]) -> None:
        assert set(scales) <= self.loaded, (scales, self.loaded)
        self.set_calls += 1
        self.active = dict(scales)

    @staticmethod
    def expected(prompt: list[int], scales: dict[str, float], seed, n: int) -> str:
        key = repr((prompt, sorted(scales.items()), seed))
        return "".join(chr(97 + hashlib.sha256(f"{key}/{i}".encode()).digest()[0] % 26) for i in range(n))

    def generate(self, prompt_ids, sampling) -> Iterator[int]:
        self.threads.add(threading.current_thread().name)
        for i in range(sampling.max_tokens):
            time.sleep(self.delay)
            key = repr((list(prompt_ids), sorted(self.active.items()), sampling.seed))
            yield 97 + hashlib.sha256(f"{key}/{i}".encode()).digest()[0] % 26


@contextmanager
def thread_server(app) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port in this process; yields the base URL."""
    import uvicorn

    from toolkit.infer.serve import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and t.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        t.join(timeout=10)
        sock.close()


@contextmanager
def process_server(args: list[str], env: dict | None = None, timeout: float = 120) -> Iterator[str]:
    """Run `toolkit serve ARGS --port 0` as a subprocess; yields the base URL it prints."""
    cmd = [sys.executable, "-m", "toolkit.cli", "serve", "--port", "0", *args]
    e = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=e)
    url, lines = None, []
    deadline = time.time() + timeout
    try:
        assert proc.stderr is not None
        while url is None:
            line = proc.stderr.readline()
            if not line:
                raise AssertionError(f"toolkit serve exited ({proc.wait()}): {''.join(lines)}")
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
            assert time.time() < deadline, "toolkit serve did not start in time"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        for _ in range(200):
            try:
                httpx.get(url + "/health", timeout=5)  # any answer (401 included) means it is up
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_random_adapter(base: str | os.PathLike, out: str | os.PathLike, rank: int = 4, seed: int = 0,
                        std: float = 0.05, alpha: float = 0.0,
                        targets: tuple[str, ...] = ("attn_q", "attn_v", "attn_output", "ffn_up", "ffn_down")):
    """A llama.cpp GGUF LoRA adapter with random non-zero A and B on `targets` of every block of `base`."""
    from tiny import random_lora
    from toolkit.adapter import Adapter, write_gguf_adapter
    from toolkit.gguf_io import open_gguf

    g = open_gguf(base)
    shapes = {name: info.shape for name, info in g.tensors.items()
              if name.startswith("blk.") and name.split(".")[2] in targets}
    write_gguf_adapter(Adapter(random_lora(shapes, rank, seed, std), alpha=alpha, arch=g.arch), out)
    return out
