"""The model side of `toolkit serve`: an adapter registry and one worker thread that owns the model.

Why one worker. The model (and its LoRA layers) is a single mutable object: the active adapter set is state
inside it. Exactly one thread touches it, so a request's adapter set can never leak into another request's
forward pass (no cross-talk by construction, no locks inside the model), and loading/unloading adapters runs
on that same thread between generations. HTTP handlers only enqueue work and await events.

Why grouping, not padded batches. Waiting requests are taken in groups that share an adapter set (the oldest
request's set first, then every waiting request with the same set), so a burst over 4 adapters costs 4
`set_adapters` calls, not one per request, and each group runs back to back. Inside a group requests run one
after another rather than as one padded batch: a [B, ...] matmul computes each row with other kernels and
reduction orders than the same row alone (torch CPU, a [8, 576] x [576, 1536] linear: every row differs from
its solo result, by up to 3e-5), so sampled tokens could drift from what the request gives on its own, and the
model's KV cache takes one position vector for the whole batch (prompts of different lengths would need
padding masks it does not have). Running them one by one makes every response bit-identical to `toolkit
infer` with that set and seed, which the issue requires; bench/serve.py measures what it costs.

Unloading while requests still use an adapter: the id leaves the registry at once (new requests cannot name
it), and the worker frees the weights only when the last request that resolved it has finished.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from .server_protocol import APIError, LoraRef, Sampling, StopMatcher

AdapterSet = tuple[tuple[str, float], ...]  # (model adapter name, scale), sorted, zero scales dropped


class Backend(Protocol):
    """What the engine needs from a model. `ModelBackend` (server_backend.py) is the real one."""

    n_ctx: int
    vocab_size: int
    model_id: str

    def encode(self, text: str) -> list[int]: ...
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def load_adapter(self, path: str, name: str) -> None: ...
    def unload_adapter(self, name: str) -> None: ...
    def set_adapters(self, scales: dict[str, float]) -> None: ...
    def generate(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[int]:
        """Token ids after the prompt, end-of-generation tokens excluded; stops at max_tokens or EOS."""
        ...


# ---- adapters -------------------------------------------------------------------------------------------


@dataclass
class AdapterEntry:
    id: int
    name: str  # name inside the model (unique for the life of the server: ids are never reused)
    path: str
    scale: float  # the global scale (POST /lora-adapters)

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "scale": self.scale}


class AdapterRegistry:
    """Ids -> adapters, the global scales, and how many admitted requests still use each adapter.

    Ids are stable: unloading id 1 does not renumber id 2 (llama-server never unloads, so ids there are list
    positions; here a client's id keeps meaning the same file)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, AdapterEntry] = {}
        self._next_id = 0
        self._refs: collections.Counter[str] = collections.Counter()
        self._doomed: set[str] = set()

    def reserve(self) -> tuple[int, str]:
        with self._lock:
            i = self._next_id
            self._next_id += 1
            return i, f"lora{i}"

    def add(self, id: int, name: str, path: str, scale: float) -> AdapterEntry:
        with self._lock:
            entry = self._entries[id] = AdapterEntry(id, name, path, scale)
            return entry

    def infos(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e.info() for e in sorted(self._entries.values(), key=lambda e: e.id)]

    def _check_ids(self, refs: list[LoraRef]) -> None:
        unknown = [r.id for r in refs if r.id not in self._entries]
        if unknown:
            raise APIError(400, f"unknown adapter id {unknown[0]} (GET /lora-adapters lists them)", param="lora")

    def set_scales(self, refs: list[LoraRef]) -> None:
        """llama-server's POST /lora-adapters: the listed adapters get these scales, every other one 0."""
        with self._lock:
            self._check_ids(refs)
            given = {r.id: r.scale for r in refs}
            for e in self._entries.values():
                e.scale = given.get(e.id, 0.0)

    def acquire(self, refs: list[LoraRef] | None) -> AdapterSet:
        """The adapter set one request runs with: its own `lora` list (unlisted adapters off), else the global
        scales as they are now. Counts the request as a user of those adapters until `release`."""
        with self._lock:
            if refs is None:
                pairs = [(e.name, e.scale) for e in self._entries.values()]
            else:
                self._check_ids(refs)
                pairs = [(self._entries[r.id].name, r.scale) for r in refs]
            aset = tuple(sorted((n, float(s)) for n, s in pairs if s != 0.0))
            self._refs.update(n for n, _ in aset)
            return aset

    def release(self, aset: AdapterSet) -> None:
        with self._lock:
            self._refs.subtract(n for n, _ in aset)

    def remove(self, id: int) -> AdapterEntry:
        with self._lock:
            if id not in self._entries:
                raise APIError(404, f"unknown adapter id {id}", param="id")
            entry = self._entries.pop(id)
            self._doomed.add(entry.name)
            return entry

    def paths(self) -> set[str]:
        with self._lock:
            return {e.path for e in self._entries.values()}

    def reap(self) -> list[str]:
        """Removed adapters that no admitted request uses any more: safe to free now."""
        with self._lock:
            free = [n for n in self._doomed if self._refs[n] <= 0]
            self._doomed.difference_update(free)
            for n in free:
                del self._refs[n]
            return free


# ---- jobs -----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One generation. `emit` is called from the worker thread with ("text", str), then exactly one of
    ("done", finish_reason, n_prompt, n_completion) or ("error", status, message)."""

    prompt_ids: list[int]
    sampling: Sampling
    adapters: AdapterSet
    emit: Callable[[tuple], None]
    cancelled: threading.Event


class IncrementalDecoder:
    """Token ids -> text pieces. A token may end inside a UTF-8 character (byte-level BPE); such text decodes
    to U+FFFD, so it is held back until the following tokens complete it."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.sent = decode, [], 0

    def add(self, tok: int) -> str:
        self.ids.append(tok)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece

    def flush(self) -> str:
        text = self.decode(self.ids)
        piece, self.sent = text[self.sent:], len(text)
        return piece


class Engine:
    """Owns the backend on one worker thread; `submit` from any thread; `call` runs a function there."""

    def __init__(self, backend: Backend, registry: AdapterRegistry, max_queue: int = 64):
        self.backend, self.registry, self.max_queue = backend, registry, max_queue
        self._cv = threading.Condition()
        self._jobs: list[Job] = []
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="toolkit-serve-model", daemon=True)
        self.groups_run = 0  # how many set_adapters switches happened (for tests and the bench)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error")
            if len(self._jobs) >= self.max_queue:
                raise APIError(503, f"the server is busy ({self.max_queue} requests waiting); retry later",
                               type="server_error")
            self._jobs.append(job)
            self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the model thread between generations (adapter load/unload)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error")
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._jobs)

    # -- the model thread --

    def _take(self) -> tuple[list, list[Job]] | None:
        with self._cv:
            while not (self._jobs or self._calls or self._stopping):
                self._cv.wait()
            if self._stopping:
                return None
            calls = list(self._calls)
            self._calls.clear()
            group: list[Job] = []
            if self._jobs:
                key = self._jobs[0].adapters
                group = [j for j in self._jobs if j.adapters == key]
                self._jobs = [j for j in self._jobs if j.adapters != key]
            return calls, group

    def _loop(self) -> None:
        while (work := self._take()) is not None:
            calls, group = work
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the awaiting handler
                        fut.set_exception(e)
            self._reap()
            if group:
                self._run_group(group)
                self._reap()
        with self._cv:
            left, self._jobs = self._jobs, []
        for job in left:
            self.registry.release(job.adapters)
            job.emit(("error", 503, "the server is shutting down"))

    def _reap(self) -> None:
        for name in self.registry.reap():
            self.backend.unload_adapter(name)

    def _run_group(self, group: list[Job]) -> None:
        self.groups_run += 1
        try:
            self.backend.set_adapters(dict(group[0].adapters))
        except Exception as e:  # noqa: BLE001 - report to every request of the group, keep serving
            for job in group:
                self.registry.release(job.adapters)
                job.emit(("error", 500, f"could not apply adapters: {e}"))
            return
        for job in group:
            try:
                if not job.cancelled.is_set():
                    self._run_job(job)
            except Exception as e:  # noqa: BLE001 - one failed request must not stop the server
                job.emit(("error", 500, f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.registry.release(job.adapters)

    def _run_job(self, job: Job) -> None:
        s = job.sampling
        stops = StopMatcher(s.stop)
        text = IncrementalDecoder(self.backend.decode)
        n, finish = 0, "stop"  # the generator ending early means EOS
        tokens = self.backend.generate(job.prompt_ids, s)
        try:
            for tok in tokens:
                n += 1
                out, stopped = stops.feed(text.add(tok))
                if out:
                    job.emit(("text", out))
                if stopped:
                    break
                if job.cancelled.is_set():  # client went away: stop spending compute on it
                    return
            else:
                if n >= s.max_tokens:
                    finish = "length"
                out, stopped = stops.feed(text.flush())
                out += "" if stopped else stops.flush()
                if out:
                    job.emit(("text", out))
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        job.emit(("done", finish, len(job.prompt_ids), n))
