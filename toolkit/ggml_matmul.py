"""llama.cpp's own CPU matmul for packed weights: libggml's ggml_mul_mat over a weight's GGUF blocks, called
through ctypes on the libggml-base/libggml-cpu that llama-cpp-python ships (the same optional dependency as
toolkit.ggml_codec).

A product x [M, in] @ W.T is a one-node ggml graph: the weight tensor points at the QuantLinear's own blocks (no
copy), the input and output tensors at torch buffers set before each call, so a graph is built once per weight and
row count and reused. ggml quantizes the activations to 8 bits per block (Q8_0/Q8_1) and runs its integer dot
products, as llama.cpp does for every quantized weight: on the AVX2 CPU measured these beat torch's int4 kernel
for one row and tie it at 4-16, and beat emulated bf16 GEMMs at every row count; past ~32 rows most types are
faster as a float GEMM on dequantized blocks, which is where QuantLinear sends them (README, serve section,
"llama.cpp's matmul as the CPU default", has the figures). The results are llama.cpp's, not bit-equal with the
float path.

The graphs run on one ggml threadpool per thread count (torch.get_num_threads()), whose threads sleep between
calls instead of spinning, so they leave the cores to torch's own threads.

libggml's struct ggml_tensor is used through one field, `data`, at an offset computed from ggml.h's layout and
checked against ggml_get_data on a real tensor when the library loads: a library laid out otherwise is not used.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
import weakref

import torch
from gguf import GGMLQuantizationType as Q

from . import ggml_codec

__all__ = ["GgmlWeight", "available", "unavailable_reason"]

P = ctypes.c_void_p
GGML_TYPE_F32 = 0
MAX_GRAPHS = 32  # row counts kept per weight (decode batch sizes and prefill chunks come and go)


class _InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", P), ("no_alloc", ctypes.c_bool)]


class _CPlan(ctypes.Structure):  # struct ggml_cplan (ggml-cpu.h)
    _fields_ = [("work_size", ctypes.c_size_t), ("work_data", P), ("n_threads", ctypes.c_int),
                ("threadpool", P), ("abort_callback", P), ("abort_callback_data", P), ("use_ref", ctypes.c_bool)]


class _PoolParams(ctypes.Structure):  # struct ggml_threadpool_params (GGML_MAX_N_THREADS = 512)
    _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


# ggml.h's struct ggml_tensor up to `data`: type (+4 padding), buffer, ne[4], nb[4], op, op_params[16], flags,
# src[10], view_src, view_offs
_DATA_OFFSET = 8 + 8 + 4 * 8 + 4 * 8 + 4 + 64 + 4 + 10 * 8 + 8 + 8


def _declare(base: ctypes.CDLL, cpu: ctypes.CDLL) -> None:
    base.ggml_init.restype, base.ggml_init.argtypes = P, [_InitParams]
    base.ggml_free.argtypes = [P]
    base.ggml_tensor_overhead.restype = ctypes.c_size_t
    base.ggml_graph_overhead_custom.restype = ctypes.c_size_t
    base.ggml_graph_overhead_custom.argtypes = [ctypes.c_size_t, ctypes.c_bool]
    base.ggml_new_tensor_2d.restype = P
    base.ggml_new_tensor_2d.argtypes = [P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_mul_mat.restype, base.ggml_mul_mat.argtypes = P, [P, P, P]
    base.ggml_new_graph_custom.restype = P
    base.ggml_new_graph_custom.argtypes = [P, ctypes.c_size_t, ctypes.c_bool]
    base.ggml_build_forward_expand.argtypes = [P, P]
    base.ggml_get_data.restype, base.ggml_get_data.argtypes = P, [P]
    base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_PoolParams), ctypes.c_int]
    cpu.ggml_graph_plan.restype, cpu.ggml_graph_plan.argtypes = _CPlan, [P, ctypes.c_int, P]
    cpu.ggml_graph_compute.restype = ctypes.c_int
    cpu.ggml_graph_compute.argtypes = [P, ctypes.POINTER(_CPlan)]
    cpu.ggml_threadpool_new.restype = P
    cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_PoolParams)]


def _layout_ok(base: ctypes.CDLL) -> bool:
    ctx = base.ggml_init(_InitParams(1 << 12, None, False))
    if not ctx:
        return False
    try:
        t = base.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 3, 5)
        ne = (ctypes.c_int64 * 2).from_address(t + 16)
        return P.from_address(t + _DATA_OFFSET).value == base.ggml_get_data(t) and tuple(ne) == (3, 5)
    finally:
        base.ggml_free(ctx)


@functools.cache
def _load() -> tuple[tuple[ctypes.CDLL, ctypes.CDLL] | None, str | None]:
    """((libggml-base, libggml-cpu), None) or (None, why not); tried once per process."""
    try:
        base = ggml_codec.library()
        d = ggml_codec._lib_dir()
    except OSError as e:
        return None, str(e)
    for name in ("libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll"):
        if (d / name).exists():
            try:
                cpu = ctypes.CDLL(str(d / name), mode=getattr(os, "RTLD_GLOBAL", 0))
            except OSError as e:
                return None, f"{d / name}: {e}"
            break
    else:
        return None, f"no libggml-cpu under {d}"
    needed = ("ggml_graph_plan", "ggml_graph_compute", "ggml_threadpool_new", "ggml_cpu_init")
    if not all(hasattr(cpu, f) for f in needed) or not hasattr(base, "ggml_threadpool_params_init"):
        return None, f"{d}: libggml-cpu lacks the graph and threadpool API (llama-cpp-python >= 0.3.8)"
    _declare(base, cpu)
    cpu.ggml_cpu_init()
    if not _layout_ok(base):
        return None, f"{d}: libggml's struct ggml_tensor is laid out otherwise than this module expects"
    return (base, cpu), None


def unavailable_reason() -> str | None:
    """Why libggml's matmul cannot be used here, or None when it can."""
    if ggml_codec.codec() == "torch":
        return "TOOLKIT_CODEC=torch keeps libggml out of this process"
    return _load()[1]


def available() -> bool:
    return unavailable_reason() is None


# (pid, threads) -> (ggml_threadpool *, the lock one computation at a time holds), kept for the process's life:
# a threadpool runs one graph at a time, so threads of the caller's that multiply at once take turns
_pools: dict[tuple[int, int], tuple[int, threading.Lock]] = {}
_pools_lock = threading.Lock()


def _threadpool(n: int) -> tuple[int, threading.Lock]:
    with _pools_lock:
        key = (os.getpid(), n)
        if key not in _pools:
            base, cpu = _load()[0]
            params = _PoolParams()
            base.ggml_threadpool_params_init(ctypes.byref(params), n)
            params.poll = 0  # sleep between calls: torch's threads need the cores then
            _pools[key] = (cpu.ggml_threadpool_new(ctypes.byref(params)), threading.Lock())
        return _pools[key]


class _Graph:
    """y [m, out] = x [m, in] @ W.T as one ggml graph over W's blocks, for one row count."""

    def __init__(self, libs, raw: torch.Tensor, qtype: int, in_f: int, out_f: int, m: int, threads: int):
        base, cpu = libs
        size = base.ggml_tensor_overhead() * 3 + base.ggml_graph_overhead_custom(4, False)
        self.ctx = base.ggml_init(_InitParams(size, None, True))  # no_alloc: every tensor's data is ours
        w = base.ggml_new_tensor_2d(self.ctx, qtype, in_f, out_f)
        self.x = base.ggml_new_tensor_2d(self.ctx, GGML_TYPE_F32, in_f, m)
        self.y = base.ggml_mul_mat(self.ctx, w, self.x)
        self.graph = base.ggml_new_graph_custom(self.ctx, 4, False)
        base.ggml_build_forward_expand(self.graph, self.y)
        P.from_address(w + _DATA_OFFSET).value = raw.data_ptr()
        pool, self.lock = _threadpool(threads)  # (the lock also guards this graph's data pointers)
        self.plan = cpu.ggml_graph_plan(self.graph, threads, pool)
        self.work = torch.empty(self.plan.work_size + 64, dtype=torch.uint8)  # the activations' 8-bit blocks
        self.plan.work_data = self.work.data_ptr()
        self.x_data = P.from_address(self.x + _DATA_OFFSET)
        self.y_data = P.from_address(self.y + _DATA_OFFSET)
        self._free = weakref.finalize(self, base.ggml_free, self.ctx)


class GgmlWeight:
    """A packed weight [out, in] (its GGUF blocks, uint8 [out, row_bytes], CPU) multiplied by libggml."""

    def __init__(self, raw: torch.Tensor, qtype: Q, in_features: int, out_features: int):
        self.raw = raw.contiguous()
        self.qtype, self.in_features, self.out_features = int(qtype), int(in_features), int(out_features)
        # (rows, threads, pid) -> graph: a forked child must not use its parent's threadpool, whose threads it lacks
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._making = threading.Lock()

    def _graph(self, m: int, threads: int) -> _Graph:
        key = (m, threads, os.getpid())
        g = self._graphs.get(key)
        if g is None:
            with self._making:
                g = self._graphs.get(key)
                if g is None:
                    if len(self._graphs) >= MAX_GRAPHS:
                        self._graphs.pop(next(iter(self._graphs)))
                    g = self._graphs[key] = _Graph(_load()[0], self.raw, self.qtype, self.in_features,
                                                   self.out_features, m, threads)
        return g

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] -> x @ W.T [M, out], float32."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        out = x.new_empty(x.shape[0], self.out_features)
        if x.shape[0] == 0:
            return out
        g = self._graph(x.shape[0], torch.get_num_threads())
        with g.lock:
            g.x_data.value, g.y_data.value = x.data_ptr(), out.data_ptr()
            status = _load()[0][1].ggml_graph_compute(g.graph, ctypes.byref(g.plan))
        if status != 0:  # GGML_STATUS_SUCCESS
            raise RuntimeError(f"libggml's mul_mat failed (status {status})")
        return out
