"""llama.cpp as an oracle, through llama-cpp-python's low-level ctypes API (real libllama, no Python sampling).

    llama_logits(model, tokens, adapters=[(file, scale), ...], n_ctx=512) -> np.ndarray [T, vocab]
    llama_tokenize(model, text, add_bos=True, special=True) -> list[int]
    llama_detokenize(model, ids) -> bytes
    llama_perplexity(model, tokens, n_ctx) -> float  (llama-perplexity's strided figure, from these logits)

Models are loaded once per path and kept (they are small); a fresh context per call, so no state leaks.
"""
from __future__ import annotations

import ctypes
import math
import os
from functools import lru_cache
from typing import Sequence

import numpy as np

N_THREADS = int(os.environ.get("TOOLKIT_TEST_THREADS", "2"))


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


@lru_cache(maxsize=1)
def _lib():
    import llama_cpp as L

    L.llama_backend_init()
    try:  # silence llama.cpp's loading chatter
        @L.llama_log_callback
        def _quiet(level, text, user_data):  # noqa: ANN001
            pass

        _lib.quiet = _quiet  # keep the callback alive
        L.llama_log_set(_quiet, ctypes.c_void_p(0))
    except Exception:
        pass
    return L


@lru_cache(maxsize=8)
def _model(path: str, vocab_only: bool = False):
    L = _lib()
    p = L.llama_model_default_params()
    p.n_gpu_layers = 0
    p.vocab_only = vocab_only
    m = L.llama_model_load_from_file(str(path).encode(), p)
    if not m:
        raise RuntimeError(f"llama.cpp could not load {path}")
    return m


@lru_cache(maxsize=16)
def _adapter(model_path: str, adapter_path: str):
    L = _lib()
    a = L.llama_adapter_lora_init(_model(model_path), str(adapter_path).encode())
    if not a:
        raise RuntimeError(f"llama.cpp could not load adapter {adapter_path}")
    return a


def n_vocab(model_path: str) -> int:
    L = _lib()
    return L.llama_vocab_n_tokens(L.llama_model_get_vocab(_model(str(model_path))))


def llama_tokenize(model_path, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
    """llama_tokenize(add_special=add_bos, parse_special=special): BOS only if the vocab adds one."""
    L = _lib()
    vocab = L.llama_model_get_vocab(_model(str(model_path), vocab_only=False))
    data = text.encode("utf-8")
    n_max = len(data) + 16
    buf = (L.llama_token * n_max)()
    n = L.llama_tokenize(vocab, data, len(data), buf, n_max, add_bos, special)
    if n < 0:
        raise RuntimeError(f"llama_tokenize needs {-n} tokens")
    return list(buf[:n])


def llama_detokenize(model_path, ids: Sequence[int], special: bool = True) -> bytes:
    L = _lib()
    vocab = L.llama_model_get_vocab(_model(str(model_path)))
    out = b""
    buf = ctypes.create_string_buffer(256)
    for t in ids:
        n = L.llama_token_to_piece(vocab, int(t), buf, 256, 0, special)
        out += buf.raw[:n]
    return out


def llama_logits(model_path, tokens: Sequence[int], adapters: Sequence[tuple[str, float]] = (),
                 n_ctx: int = 512) -> np.ndarray:
    """Logits of every position [T, vocab] (float32) for one sequence, optional LoRA adapters with scales."""
    L = _lib()
    model_path = str(model_path)
    model = _model(model_path)
    T = len(tokens)
    cp = L.llama_context_default_params()
    cp.n_ctx = max(n_ctx, T)
    cp.n_batch = cp.n_ubatch = max(T, 1)
    cp.n_threads = cp.n_threads_batch = N_THREADS
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    try:
        if adapters:
            ptrs = (L.llama_adapter_lora_p_ctypes * len(adapters))(*[_adapter(model_path, str(f)) for f, _ in adapters])
            scales = (ctypes.c_float * len(adapters))(*[float(s) for _, s in adapters])
            rc = L.llama_set_adapters_lora(ctx, ptrs, len(adapters), scales)
            if rc != 0:
                raise RuntimeError(f"llama_set_adapters_lora returned {rc}")
        batch = L.llama_batch_init(T, 0, 1)
        try:
            batch.n_tokens = T
            for i, t in enumerate(tokens):
                batch.token[i] = int(t)
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            nv = n_vocab(model_path)
            ptr = L.llama_get_logits(ctx)
            return np.ctypeslib.as_array(ptr, shape=(T, nv)).copy()
        finally:
            L.llama_batch_free(batch)
    finally:
        L.llama_free(ctx)


def strided_nll(logits_of_chunk, tokens: Sequence[int], n_ctx: int, bos_id: int | None = None) -> tuple[float, int]:
    """llama-perplexity's scheme (tools/perplexity): chunks of n_ctx tokens, the first token of each chunk
    replaced by BOS when the vocab adds one, only the second half of each chunk scored.
    logits_of_chunk(list[int]) -> [n_ctx, vocab]. Returns (sum of -log p, count)."""
    n_chunk = len(tokens) // n_ctx
    first = n_ctx // 2
    nll, count = 0.0, 0
    for c in range(n_chunk):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        lg = np.asarray(logits_of_chunk(chunk), dtype=np.float64)
        for j in range(first, n_ctx - 1):
            row = lg[j]
            m = row.max()
            lse = m + math.log(np.exp(row - m).sum())
            nll += lse - row[tokens[c * n_ctx + j + 1]]
            count += 1
    return nll, count


def llama_perplexity(model_path, tokens: Sequence[int], n_ctx: int = 512, bos_id: int | None = None,
                     adapters: Sequence[tuple[str, float]] = ()) -> float:
    nll, count = strided_nll(lambda ch: llama_logits(model_path, ch, adapters, n_ctx), tokens, n_ctx, bos_id)
    return math.exp(nll / count)


def llama_sampler_filter(logits: np.ndarray, sampler: str, *args, accepted: Sequence[int] = ()) -> dict[int, float]:
    """Run one of llama.cpp's samplers (top_k, top_p, min_p, penalties) over logits [V]; returns the surviving
    candidates {id: logit} (penalties: every candidate, with its penalized logit). `accepted`: tokens fed to
    llama_sampler_accept first (the penalties' history)."""
    L = _lib()
    init = getattr(L, f"llama_sampler_init_{sampler}")
    smpl = init(*args)
    try:
        for t in accepted:
            L.llama_sampler_accept(smpl, int(t))
        n = len(logits)
        data = (L.llama_token_data * n)()
        for i, v in enumerate(logits):
            data[i].id, data[i].logit, data[i].p = i, float(v), 0.0
        arr = L.llama_token_data_array(data, n, -1, False)
        L.llama_sampler_apply(smpl, ctypes.byref(arr))
        return {int(arr.data[i].id): float(arr.data[i].logit) for i in range(arr.size)
                if arr.data[i].logit != float("-inf")}
    finally:
        L.llama_sampler_free(smpl)


def llama_greedy(model_path, tokens: Sequence[int], n: int, n_ctx: int = 512) -> list[int]:
    """n greedy tokens after `tokens` (argmax of llama.cpp's logits, recomputed over the whole sequence)."""
    seq = list(tokens)
    for _ in range(n):
        seq.append(int(llama_logits(model_path, seq, n_ctx=n_ctx)[-1].argmax()))
    return seq[len(tokens):]
