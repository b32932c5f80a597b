"""The wire format of `toolkit serve`: OpenAI request bodies (validated), response bodies, SSE framing.

Pure data in, pure data out: nothing here touches the model, so it is tested without one. Field names,
defaults and error shapes follow the OpenAI API; sampling defaults (toolkit.infer.sampling.DEFAULTS, their one
home) and the `lora` field follow llama-server, so the same body gives the same text as `toolkit infer` with
the same flags and seed; the engine gets a request as a SamplingParams.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .sampling import DEFAULTS, SamplingParams

MAX_STOP = 4  # OpenAI's limit on stop sequences


class APIError(Exception):
    """An error that becomes an HTTP response: `{"error": {"message", "type", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.type, self.param)


def error_body(status: int, message: str, type: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


class LoraRef(BaseModel):
    """One entry of llama-server's `lora` list: adapter id (from GET /lora-adapters) and its scale."""

    model_config = ConfigDict(extra="forbid")
    id: int
    scale: float

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("scale must be a finite number")
        return v


def check_lora_list(refs: list[LoraRef] | None) -> list[LoraRef] | None:
    if refs is not None:
        ids = [r.id for r in refs]
        if len(ids) != len(set(ids)):
            raise ValueError("an adapter id appears twice in 'lora'")
    return refs


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. Unknown fields are ignored, as OpenAI
    clients send extras (user, logit_bias=None, ...); fields we cannot honour are refused below."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer OpenAI name for max_tokens
    temperature: float = DEFAULTS.temperature
    top_k: int = DEFAULTS.top_k
    top_p: float = DEFAULTS.top_p
    min_p: float = DEFAULTS.min_p
    repeat_penalty: float = DEFAULTS.repeat_penalty
    repeat_last_n: int = DEFAULTS.penalty_last_n  # llama-server's name for penalty_last_n
    presence_penalty: float = DEFAULTS.presence_penalty
    frequency_penalty: float = DEFAULTS.frequency_penalty
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False
    cache_prompt: bool = True  # llama-server's: reuse a slot's cached start of the prompt
    lora: list[LoraRef] | None = None
    logprobs: Any = None
    stream_options: dict[str, Any] | None = None

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _non_negative(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence is empty")
        return stops

    @field_validator("lora")
    @classmethod
    def _lora(cls, v: list[LoraRef] | None) -> list[LoraRef] | None:
        return check_lora_list(v)

    @model_validator(mode="after")
    def _supported(self) -> "SamplingFields":
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 <= self.top_p <= 1.0 or not 0.0 <= self.min_p <= 1.0:
            raise ValueError("top_p and min_p must be in [0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repeat_last_n < 0:
            raise ValueError("repeat_last_n must be >= 0")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat_penalty must be > 0")
        if self.n != 1:
            raise ValueError("only n=1 is supported")
        if self.logprobs not in (None, False):
            raise ValueError("logprobs are not supported")
        return self

    def limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = 16  # OpenAI's default for the legacy completions endpoint
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            return v[0]
        if isinstance(v, list) and any(t < 0 for t in v):  # type: ignore[operator]
            raise ValueError("token ids must be >= 0")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """OpenAI allows content as a list of parts; only text parts can be served by a text model."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        out = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"unsupported message content part {part.get('type')!r}: only text",
                               param="messages")
            out.append(part["text"])
        return "".join(out)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> None:
        if v:
            raise ValueError("tool calling is not supported")
        return None

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class LoadRequest(BaseModel):
    """POST /lora-adapters/load: a file *name* inside --adapter-dir, never a path."""

    model_config = ConfigDict(extra="forbid")
    name: str
    scale: float = 0.0  # loaded but not applied, as --lora-init-without-apply; POST /lora-adapters applies it

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("scale must be a finite number")
        return v


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int


def sampling_of(req: SamplingFields, n_prompt: int, n_ctx: int, eot_ids: frozenset[int]) -> SamplingParams:
    """The request's SamplingParams, its generation bounded by the context (a slot's n_ctx): a prompt that
    leaves no room is refused (400). `eot_ids` end the generation unless the request sets ignore_eos."""
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    room = n_ctx - n_prompt
    if room <= 0:
        raise APIError(400, f"the prompt has {n_prompt} tokens; the context size is {n_ctx}",
                       type="context_length_exceeded", param="prompt")
    limit = req.limit()
    return SamplingParams(
        max_tokens=room if limit is None else min(limit, room),
        temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
        repeat_penalty=req.repeat_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, penalty_last_n=req.repeat_last_n, seed=req.seed,
        stop_ids=frozenset() if req.ignore_eos else frozenset(eot_ids),
    )


# ---- stop sequences -------------------------------------------------------------------------------------


class StopMatcher:
    """Finds stop sequences in streamed text without ever emitting text that a stop may still claim.

    feed(piece) -> (text safe to emit now, stopped). Text that could be the start of a stop sequence is
    held back until the next piece decides it; `flush()` releases it at the end.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max((self._overlap(s) for s in self.stops), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def _overlap(self, stop: str) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of `stop`."""
        for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:k]):
                return k
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ---- responses ------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(n_prompt: int, n_completion: int, n_cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens: prompt tokens a slot's cache held."""
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion,
            "prompt_tokens_details": {"cached_tokens": n_cached}}


def completion_body(rid: str, model: str, text: str, finish: str | None, use: dict | None = None,
                    chunk: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str, finish: str | None, use: dict | None) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish}],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None,
               use: dict | None = None, choices: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
    }
    if use is not None:
        body["usage"] = use
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
