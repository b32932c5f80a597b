"""The HTTP side of `toolkit serve` (FastAPI): routes, auth, errors, SSE. It never touches the model: it
validates, resolves the adapter set, submits a Job to the Engine (a 503 when its queue is full) and relays the
Job's events; a client that hangs up marks the Job cancelled, which frees its batch slot at the next step."""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolkit.errors import ToolkitError

from .server_engine import Engine, Job
from .server_protocol import (APIError, ChatRequest, CompletionRequest, LoadRequest, LoraRef, SamplingFields,
                              UnloadRequest, chat_body, chat_chunk, check_lora_list, completion_body, error_body,
                              new_id, sampling_of, sse, usage)

MAX_BODY = 8 << 20  # bytes; a longer body is refused (413) before it is read into memory


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
    return JSONResponse(error_body(status, message, type, param), status_code=status)


async def parse(request: Request, schema: Any) -> Any:
    """The JSON body validated against `schema` (a model or a type), whatever the Content-Type says (curl -d
    sends form-encoded): bad JSON or a bad field is a 400 naming it."""
    body = await request.body()
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})") from None
    try:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return schema.model_validate(data)
        return TypeAdapter(schema).validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        raise APIError(400, f"{where}: {msg}" if where else msg, param=where or None) from None


class Guard:
    """ASGI middleware run before routing: the API key on every path, and the body size limit."""

    def __init__(self, app: Any, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.key = ("Bearer " + api_key).encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
            resp = error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                  type="authentication_error")
            return await resp(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await error_response(413, f"request body over {self.max_body} bytes")(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            # chunked bodies carry no length: count as they arrive
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise APIError(413, f"request body over {self.max_body} bytes")
            return msg

        await self.app(scope, limited_receive, send)


class JobStream:
    """Bridges a Job's events from the model thread into this request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, event: tuple) -> None:  # model thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple]:
        """The job's events until its end. With `request`, a client that hangs up while it waits (queued behind
        other requests, or mid-generation) cancels the job, so no compute is spent on an answer nobody reads."""
        checked = self.loop.time()
        while True:
            if request is None:
                ev = await self.queue.get()
            else:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    ev = None
                # checked on a clock, not only when idle: while tokens flow the queue never times out
                if self.loop.time() - checked >= 0.5:
                    checked = self.loop.time()
                    if await request.is_disconnected():
                        self.cancelled.set()
                        return
                if ev is None:
                    continue
            yield ev
            if ev[0] != "text":
                return


def create_app(engine: Engine, api_key: str | None = None, adapter_dir: str | None = None,
               max_body: int = MAX_BODY) -> Any:
    backend, registry = engine.backend, engine.registry
    app = FastAPI(title="toolkit serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ToolkitError)
    async def _toolkit(_: Request, e: ToolkitError):  # e.g. a chat template refusing the messages
        return error_response(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), type="not_found_error" if e.status_code == 404 else
                              "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    # -- info --

    @app.get("/health")
    async def health() -> dict:
        st = engine.stats
        return {"status": "ok", "slots": engine.n_slots, "slots_busy": engine.busy(), "queued": engine.pending(),
                "steps": st.steps, "generated_tokens": st.tokens, "cancelled": st.cancelled, "rejected": st.rejected}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": backend.model_id, "object": "model", "created": 0,
                                            "owned_by": "toolkit", "meta": {"n_ctx": backend.n_ctx}}]}

    # -- adapters (llama-server's routes, plus load/unload) --

    @app.get("/lora-adapters")
    async def list_adapters() -> list:
        return registry.infos()

    @app.post("/lora-adapters")
    async def set_adapters(request: Request) -> dict:
        refs = await parse(request, list[LoraRef])
        try:
            check_lora_list(refs)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        registry.set_scales(refs)
        return {"success": True}

    @app.post("/lora-adapters/load")
    async def load_adapter(request: Request) -> dict:
        req = await parse(request, LoadRequest)
        path = resolve_in_dir(adapter_dir, req.name)
        i, name = registry.reserve()
        try:
            await asyncio.wrap_future(engine.call(lambda: backend.load_adapter(str(path), name)))
        except APIError:
            raise
        except Exception as e:  # a bad file: ToolkitError names it; the server keeps serving
            raise APIError(400, f"cannot load adapter {req.name!r}: {e}", param="name") from None
        return registry.add(i, name, str(path), req.scale).info()

    @app.post("/lora-adapters/unload")
    async def unload_adapter(request: Request) -> dict:
        req = await parse(request, UnloadRequest)
        entry = registry.remove(req.id)
        engine.wake()  # frees it now if no request is using it
        return {"success": True, "id": entry.id, "path": entry.path}

    # -- generation --

    def admit(req: SamplingFields, prompt_ids: list[int]) -> JobStream:
        # `model` is not checked: OpenAI clients insist on sending one, and there is one model to serve
        params = sampling_of(req, len(prompt_ids), backend.n_ctx, backend.eot_ids)
        if any(t >= backend.vocab_size for t in prompt_ids):
            raise APIError(400, f"a token id is outside the vocabulary (size {backend.vocab_size})", param="prompt")
        stream = JobStream()
        aset = registry.acquire(req.lora)
        job = Job(prompt_ids, params, list(req.stop or []), aset, stream.emit, stream.cancelled,  # type: ignore[arg-type]
                  req.cache_prompt)
        try:
            engine.submit(job)
        except APIError:
            registry.release(aset)
            raise
        return stream

    async def run_to_end(stream: JobStream, request: Request) -> tuple[str, str, dict]:
        parts: list[str] = []
        try:
            async for ev in stream.events(request):
                if ev[0] == "text":
                    parts.append(ev[1])
                elif ev[0] == "error":
                    raise APIError(ev[1], ev[2], type="server_error")
                else:
                    return "".join(parts), ev[1], usage(*ev[2:])
        finally:
            stream.cancelled.set()  # no-op once done; stops the work if this handler is cancelled
        raise APIError(500, "generation ended without a result", type="server_error")

    async def sse_events(stream: JobStream, first: list[bytes], piece, last) -> AsyncIterator[bytes]:
        try:
            for b in first:
                yield b
            async for ev in stream.events():
                if ev[0] == "text":
                    yield sse(piece(ev[1]))
                elif ev[0] == "error":
                    yield sse(error_body(ev[1], ev[2], type="server_error"))
                else:
                    for body in last(ev[1], usage(*ev[2:])):
                        yield sse(body)
            yield sse("[DONE]")
        finally:
            stream.cancelled.set()  # the client disconnected (or we finished): stop generating

    def sse_response(gen: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        # tokenizing a long prompt takes a while: off the event loop, so other clients are not stalled
        prompt = req.prompt
        ids = await asyncio.to_thread(backend.encode, prompt) if isinstance(prompt, str) else list(prompt)
        stream = admit(req, ids)
        rid, model = new_id("cmpl"), backend.model_id
        prefix = (req.prompt if isinstance(req.prompt, str) else backend.decode(ids)) if req.echo else ""
        if not req.stream:
            text, finish, use = await run_to_end(stream, request)
            return completion_body(rid, model, prefix + text, finish, use)

        def last(finish: str, use: dict) -> list[dict]:
            out = [completion_body(rid, model, "", finish, chunk=True)]
            if req.include_usage():
                out.append({**completion_body(rid, model, "", None, use, chunk=True), "choices": []})
            return out

        first = [sse(completion_body(rid, model, prefix, None, chunk=True))] if prefix else []
        return sse_response(sse_events(stream, first, lambda t: completion_body(rid, model, t, None, chunk=True),
                                       last))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        ids = await asyncio.to_thread(backend.chat_prompt, req.plain_messages())
        stream = admit(req, ids)
        rid, model = new_id("chatcmpl"), backend.model_id
        if not req.stream:
            text, finish, use = await run_to_end(stream, request)
            return chat_body(rid, model, text, finish, use)

        def last(finish: str, use: dict) -> list[dict]:
            out = [chat_chunk(rid, model, {}, finish)]
            if req.include_usage():
                out.append(chat_chunk(rid, model, {}, None, use, choices=False))
            return out

        first = [sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))]
        return sse_response(sse_events(stream, first, lambda t: chat_chunk(rid, model, {"content": t}, None), last))

    return Guard(app, api_key, max_body)


def resolve_in_dir(adapter_dir: str | None, name: str) -> Path:
    """A file *name* inside --adapter-dir. Paths, '..', absolute names and symlinks that lead outside the
    folder are refused (403), so a client can never make the server read an arbitrary file."""
    if not adapter_dir:
        raise APIError(403, "loading adapters over HTTP is off: start the server with --adapter-dir DIR")
    root = Path(adapter_dir).resolve()
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise APIError(403, f"{name!r} is not a plain file name inside the adapter folder", param="name")
    path = (root / name).resolve()
    if path.parent != root:  # a symlink pointing elsewhere
        raise APIError(403, f"{name!r} resolves outside the adapter folder", param="name")
    if not path.exists():
        raise APIError(404, f"no adapter named {name!r} in the adapter folder", param="name")
    return path

