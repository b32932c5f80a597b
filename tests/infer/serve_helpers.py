"""Helpers for the serve tests: start the real server (in a thread or as `toolkit serve`), and a scripted
backend with a pure-Python batch engine whose every token depends on its own slot's adapter set (to catch
cross-talk between rows) and that fails a step running an unloaded adapter."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx


class ScriptedBackend:
    """Bytes tokenizer and a FakeBatch whose token i of a sequence is a letter chosen by hashing (prompt, that
    slot's adapter set, seed, i). Every step checks that each running slot's adapters are still loaded, so an
    adapter freed while a request uses it fails the step (and the test)."""

    n_ctx = 64
    vocab_size = 256
    model_id = "scripted"
    eot_ids: frozenset[int] = frozenset()

    def __init__(self, delay: float = 0.002, prefill_chunk: int = 16):
        self.delay, self.prefill_chunk = delay, prefill_chunk
        self.loaded: set[str] = set()
        self.unloaded: list[str] = []
        self.threads: set[str] = set()
        self.batch_sizes: list[int] = []  # decoding rows per step
        self.tokens = 0
        self.batches: list[FakeBatch] = []

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def chat_prompt(self, messages) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")

    def detokenizer(self):
        from toolkit.infer.sampling import IncrementalDetokenizer

        return IncrementalDetokenizer(self.decode)

    def load_adapter(self, path: str, name: str) -> None:
        if not os.path.isfile(path) or Path(path).read_bytes()[:4] != b"LORA":
            raise ValueError(f"{path}: not an adapter")
        self.loaded.add(name)

    def unload_adapter(self, name: str) -> None:
        self.loaded.discard(name)
        self.unloaded.append(name)

    def new_batch(self, n_slots: int) -> "FakeBatch":
        b = FakeBatch(self, n_slots)
        self.batches.append(b)
        return b

    @staticmethod
    def token(prompt: list[int], scales: dict[str, float], seed, i: int) -> int:
        key = repr((list(prompt), sorted(scales.items()), seed))
        return 97 + hashlib.sha256(f"{key}/{i}".encode()).digest()[0] % 26

    @classmethod
    def expected(cls, prompt: list[int], scales: dict[str, float], seed, n: int) -> str:
        return "".join(chr(cls.token(prompt, scales, seed, i)) for i in range(n))


@dataclass
class _Seq:
    prompt: list[int]
    params: object
    adapters: dict[str, float]
    prefilled: int = 0
    n: int = 0


class FakeBatch:
    """toolkit.infer.batch.BatchEngine's contract in pure Python, for the scheduler's tests: slots, prompts prefilled
    in chunks over steps (the last chunk yields the first token), then one token per decoding slot per step's
    decode half, max_tokens and stop ids end a slot, cancel."""

    def __init__(self, backend: ScriptedBackend, n_slots: int):
        self.backend, self.n_slots = backend, n_slots
        self.seqs: dict[int, _Seq] = {}
        self.cancelled: list[int] = []

    @property
    def n_free(self) -> int:
        return self.n_slots - len(self.seqs)

    @property
    def active(self) -> list[int]:
        return sorted(self.seqs)

    def add(self, prompt_ids, params, adapters=None, reuse=True) -> int:
        from toolkit.errors import ToolkitError

        if not self.n_free:
            raise ToolkitError("no free slot")
        if len(prompt_ids) + params.max_tokens > self.backend.n_ctx:
            raise ToolkitError("the prompt does not fit")
        assert set(adapters or {}) <= self.backend.loaded, (adapters, self.backend.loaded)
        slot = min(set(range(self.n_slots)) - set(self.seqs))
        self.seqs[slot] = _Seq(list(prompt_ids), params, dict(adapters or {}))
        return slot

    def reused(self, slot: int) -> int:
        return 0  # no cache to reuse here: every prompt is prefilled

    def cancel(self, slot: int) -> None:
        del self.seqs[slot]
        self.cancelled.append(slot)

    def step(self) -> list[tuple[int, int | None, bool]]:
        return self.prefill() + self.decode()

    def prefill(self) -> list[tuple[int, int | None, bool]]:
        """Prompts advance a chunk; the one whose last chunk this is yields its first token."""
        b = self.backend
        b.threads.add(threading.current_thread().name)
        out = []
        for slot, s in list(self.seqs.items()):
            assert set(s.adapters) <= b.loaded, f"slot {slot} runs with an unloaded adapter: {s.adapters}"
            if s.prefilled < len(s.prompt):
                s.prefilled = min(len(s.prompt), s.prefilled + b.prefill_chunk)
                if s.prefilled == len(s.prompt):
                    self._token(slot, s, out)
        return out

    def decode(self) -> list[tuple[int, int | None, bool]]:
        """One token for every slot past its prompt (the ones prefilled just now included)."""
        b = self.backend
        b.threads.add(threading.current_thread().name)
        time.sleep(b.delay)
        out, decoding = [], 0
        for slot, s in list(self.seqs.items()):
            assert set(s.adapters) <= b.loaded, f"slot {slot} runs with an unloaded adapter: {s.adapters}"
            if s.prefilled < len(s.prompt):
                continue
            decoding += 1
            self._token(slot, s, out)
        if decoding:
            b.batch_sizes.append(decoding)
        return out

    def _token(self, slot: int, s: _Seq, out: list) -> None:
        b = self.backend
        tok = b.token(s.prompt, s.adapters, s.params.seed, s.n)
        if tok in s.params.stop_ids:
            out.append((slot, None, True))
            del self.seqs[slot]
            return
        s.n += 1
        b.tokens += 1
        done = s.n >= s.params.max_tokens
        out.append((slot, tok, done))
        if done:
            del self.seqs[slot]


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
