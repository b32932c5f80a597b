"""The model side of `toolkit serve`: an adapter registry and a continuous-batching scheduler on one model thread.

One model thread. The model, its adapters and the batch's KV cache are mutable state; exactly one thread touches
them, so there are no locks inside the model, and adapter loads/unloads (`call`) run on that same thread between
two engine steps, never inside one. HTTP handlers only submit Jobs and await their events.

Continuous batching. The thread drives one toolkit.infer.batch.BatchEngine with --parallel slots of --ctx-size
tokens each. Every tick: run queued adapter calls, free the slots of requests whose client went away
(BatchEngine.cancel), free unloaded adapters nobody uses any more, move waiting requests into free slots (FIFO;
the prompt is prefilled in chunks over the following steps), then one `step()`: a prefill chunk for new slots and
one token for every decoding slot, all in one forward pass. A request joins at the next step and leaves the
batch the step it finishes, so a short request never waits for a long one, and 16 clients cost one batched
forward per token rather than 16.

Adapters per row. Each slot carries its own adapter set (its `lora` field, else the global scales when it was
admitted), applied by the engine to that row only, so requests with different sets share a step and no set leaks
into another request. The engine computes a row in a batch with the same math as alone (greedy tokens equal
`toolkit.generate` with that set; float logits within 1e-4 relative: a [B, ...] matmul may reduce in another
order than [1, ...]), and seeded sampling uses one generator per slot.

Back-pressure. At most --max-queue requests wait for a slot; more get HTTP 503 (a JSON error) at once, so a burst
cannot grow memory without bound. A client that hangs up while waiting is dropped from the queue; one that hangs
up while generating frees its slot at the next step.

Unloading while requests still use an adapter: the id leaves the registry at once (new requests cannot name
it), and the thread frees the weights only when the last request that resolved it has finished.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from toolkit.errors import ToolkitError

from .sampling import SamplingParams
from .server_protocol import APIError, LoraRef, StopMatcher

AdapterSet = tuple[tuple[str, float], ...]  # (model adapter name, scale), sorted, zero scales dropped


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class Batch(Protocol):
    """toolkit.infer.batch.BatchEngine's interface (what the scheduler uses of it)."""

    n_free: int
    active: list[int]

    def add(self, prompt_ids: list[int], params: SamplingParams, adapters: dict[str, float] | None = None,
            reuse: bool = True) -> int: ...
    def reused(self, slot: int) -> int: ...
    def step(self) -> list[tuple[int, int | None, bool]]: ...
    def prefill(self) -> list[tuple[int, int | None, bool]]: ...
    def decode(self) -> list[tuple[int, int | None, bool]]: ...
    def cancel(self, slot: int) -> None: ...


class Backend(Protocol):
    """What the engine needs from a model. `ModelBackend` (server_backend.py) is the real one."""

    n_ctx: int  # per slot
    vocab_size: int
    model_id: str
    eot_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def detokenizer(self) -> Detokenizer: ...
    def load_adapter(self, path: str, name: str) -> None: ...
    def unload_adapter(self, name: str) -> None: ...
    def new_batch(self, n_slots: int) -> Batch: ...


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

    def names(self) -> list[str]:
        with self._lock:
            return [e.name for e in sorted(self._entries.values(), key=lambda e: e.id)]

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
    """One generation. `emit` is called from the model thread with ("text", str), then exactly one of
    ("done", finish_reason, n_prompt, n_completion, n_cached) or ("error", status, message); n_cached: prompt
    tokens found in a slot's cache, not prefilled (cache_prompt)."""

    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    adapters: AdapterSet
    emit: Callable[[tuple], None]
    cancelled: threading.Event
    cache_prompt: bool = True


@dataclass
class _Running:
    job: Job
    text: Detokenizer
    stops: StopMatcher
    n: int = 0  # tokens generated
    cached: int = 0  # prompt tokens reused from the slot's cache


@dataclass
class Stats:
    steps: int = 0  # engine steps that decoded at least one token
    tokens: int = 0  # generated tokens
    cancelled: int = 0  # slots freed because the client went away
    rejected: int = 0  # 503s for a full queue


class Engine:
    """Owns the backend and its batch on one model thread; `submit` from any thread; `call` runs a function
    there between steps."""

    THREAD_NAME = "toolkit-serve-model"

    def __init__(self, backend: Backend, registry: AdapterRegistry, n_slots: int = 4, max_queue: int = 64):
        self.backend, self.registry, self.max_queue, self.n_slots = backend, registry, max_queue, n_slots
        self.batch = backend.new_batch(n_slots)
        self.stats = Stats()
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._running: dict[int, _Running] = {}  # slot -> request; the model thread's alone
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=self.THREAD_NAME, daemon=True)

    def warmup(self) -> None:
        """Throwaway sequences through the batch before serving (call before start): with --compile, the batched
        decode step compiles now rather than in the first requests: its graph for rows without adapters, and,
        when adapters are loaded at startup, the one for rows with some (otherwise the first request with an
        adapter compiles it); row counts, which adapters are loaded, which rows use them and their scales then
        never compile again. Nothing is emitted or counted."""
        prompt = self.backend.encode("Hello") or [0]
        names = self.registry.names()
        rounds = [[{}, {}]] + ([[{names[0]: 1.0}, {}]] if names else [])
        for sets in rounds:  # 3 tokens: one from the prefill, an eager decode step (the first after compiling
            for adapters in sets[: self.n_slots]:  # makes the kernel weights), a compiled one
                self.batch.add(prompt, SamplingParams(max_tokens=3, temperature=0.0), adapters)
            while self.batch.active:
                self.batch.step()

    def start(self) -> "Engine":
        """Run the loop on a thread of its own."""
        self._thread.start()
        return self

    def run(self, on_start: Callable[["Engine"], Any] | None = None) -> None:
        """Run the loop on the calling thread until stop() (serve.build: the thread that loaded the model);
        on_start(self) is called once this thread is the engine's (stop() joins it)."""
        self._thread = threading.current_thread()
        if on_start is not None:
            on_start(self)
        self._loop()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error")
            # slots in use + waiting (len of a dict the model thread owns: one atomic read)
            if len(self._running) + len(self._waiting) >= self.n_slots + self.max_queue:
                self.stats.rejected += 1
                raise APIError(503, f"the server is busy ({self.n_slots} slots in use, {len(self._waiting)} "
                                    "requests waiting); retry later", type="server_error")
            self._waiting.append(job)
            self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the model thread between two steps (adapter load/unload)."""
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
            return len(self._waiting)

    def busy(self) -> int:
        return len(self._running)

    # -- the model thread --

    def _loop(self) -> None:
        try:
            while self._tick():
                pass
        finally:
            with self._cv:
                left, self._waiting = list(self._waiting), collections.deque()
            left += [r.job for r in self._running.values()]
            self._running.clear()
            for job in left:
                self.registry.release(job.adapters)
                job.emit(("error", 503, "the server is shutting down"))

    def _tick(self) -> bool:
        with self._cv:
            while not (self._waiting or self._calls or self._running or self._stopping):
                self._cv.wait()
            if self._stopping:
                return False
            calls = list(self._calls)
            self._calls.clear()
        for fn, fut in calls:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the awaiting handler
                    fut.set_exception(e)
        self._drop_cancelled()
        self._reap()
        self._admit()
        if self._running:
            self._step()
            self._reap()  # an adapter whose last request just ended is freed before the thread may go idle
        return True

    def _reap(self) -> None:
        for name in self.registry.reap():
            self.backend.unload_adapter(name)

    def _drop_cancelled(self) -> None:
        for slot, r in list(self._running.items()):
            if r.job.cancelled.is_set():
                self.batch.cancel(slot)
                del self._running[slot]
                self.registry.release(r.job.adapters)
                self.stats.cancelled += 1
        with self._cv:
            if any(j.cancelled.is_set() for j in self._waiting):
                gone = [j for j in self._waiting if j.cancelled.is_set()]
                self._waiting = collections.deque(j for j in self._waiting if not j.cancelled.is_set())
            else:
                gone = []
        for job in gone:
            self.registry.release(job.adapters)

    def _admit(self) -> None:
        while self.batch.n_free > 0:
            with self._cv:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            if job.params.max_tokens == 0:  # nothing to generate: no slot, no prefill
                self.registry.release(job.adapters)
                job.emit(("done", "length", len(job.prompt_ids), 0, 0))
                continue
            try:
                slot = self.batch.add(job.prompt_ids, job.params, dict(job.adapters),  # {}: the base alone
                                      reuse=job.cache_prompt)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
                self.registry.release(job.adapters)
                status = 400 if isinstance(e, ToolkitError) else 500
                job.emit(("error", status, f"could not start the generation: {e}"))
                continue
            self._running[slot] = _Running(job, self.backend.detokenizer(), StopMatcher(job.stops),
                                           cached=self.batch.reused(slot))

    def _step(self) -> None:
        """The batch's step in its two halves, each one's events handled as soon as it returns: a request whose
        prompt completes gets its first token before the decode pass runs, and a stop string seen there frees
        the slot before it decodes."""
        produced = False
        for half in (self.batch.prefill, self.batch.decode):
            try:
                events = half()
            except Exception as e:  # noqa: BLE001 - fail the requests of this batch, keep serving
                for slot, r in list(self._running.items()):
                    try:
                        self.batch.cancel(slot)
                    except Exception:  # noqa: BLE001,S110 - already freed by the failed step
                        pass
                    self._finish(slot, error=(500, f"generation failed: {type(e).__name__}: {e}"))
                return
            produced = produced or any(tok is not None for _, tok, _ in events)
            self._handle(events)
        if produced:
            self.stats.steps += 1

    def _handle(self, events: list[tuple[int, int | None, bool]]) -> None:
        for slot, tok, finished in events:
            r = self._running.get(slot)
            if r is None:
                continue
            stopped = False
            if tok is not None:
                r.n += 1
                self.stats.tokens += 1
                out, stopped = r.stops.feed(r.text.add(tok))
                if out:
                    r.job.emit(("text", out))
                if stopped and not finished:
                    self.batch.cancel(slot)  # a stop string: the slot is free for the next request now
            if finished and not stopped:
                out, stopped = r.stops.feed(r.text.flush())
                out += "" if stopped else r.stops.flush()
                if out:
                    r.job.emit(("text", out))
            if stopped or finished:
                limit = not stopped and r.n >= r.job.params.max_tokens
                self._finish(slot, "length" if limit else "stop")

    def _finish(self, slot: int, reason: str = "stop", error: tuple[int, str] | None = None) -> None:
        r = self._running.pop(slot)
        self.registry.release(r.job.adapters)
        if error is not None:
            r.job.emit(("error", *error))
        else:
            r.job.emit(("done", reason, len(r.job.prompt_ids), r.n, r.cached))
