"""Frozen layers over packed GGUF blocks: QuantLinear (matmul on blocks dequantized chunk by chunk, autograd to
the input only) and QuantEmbedding (dequantizes only the gathered rows). The codec is toolkit.quants; the CPU
decode kernels are toolkit.qkernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import qkernels
from .errors import ToolkitError
from .gguf_io import QType, as_qtype, row_bytes
from .quants import dequant_problem, dequantize_rows, quantize

__all__ = ["CHUNK_ELEMENTS", "QuantEmbedding", "QuantLinear"]

CHUNK_ELEMENTS = 1 << 24  # at most this many dequantized values alive at once per layer (64 MiB fp32)
SLICE_ELEMENTS = 1 << 19  # matmul_sliced's slice: 2 MiB of float32, which stays in cache until multiplied


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized chunk by chunk; backward gives grad x only (W is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        layer: QuantLinear = ctx.layer
        return layer._matmul_t(gy), None



def _packed_rows(raw: torch.Tensor, qtype: QType, rows: int, cols: int, what: str) -> torch.Tensor:
    """raw GGUF blocks as uint8 [rows, row_bytes], checked against the type and the shape they must fill."""
    why = dequant_problem(qtype)
    if why is not None:
        raise ToolkitError(why)
    rb = row_bytes(qtype, cols)
    if raw.dtype != torch.uint8:
        raw = raw.contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() != rb * rows:
        raise ToolkitError(f"{qtype.name} {what} [{rows}, {cols}] needs {rb * rows} bytes, got {raw.numel()}")
    return raw.reshape(rows, rb)

class QuantLinear(torch.nn.Module):
    """A frozen linear layer over packed GGUF blocks (`qweight`: uint8 [out_features, row_bytes]).

    `forward(x)` dequantizes chunks of output rows on the fly (peak extra memory: CHUNK_ELEMENTS values) and
    computes in x's dtype; gradients flow to x, never to the weight.

    Two per-instance switches trade exactness or memory for speed (neither copy is a buffer: never saved,
    never in the state dict, rebuilt lazily after .to()):
    * `cache_weights`: a dequantized copy is made on first use and reused (exact; 4-8x the packed memory).
    * `use_kernels`: on CPU, inputs of up to qkernels.max_rows() rows go through torch's weight-only int4 kernel
      (Q4_0/Q4_1/Q4_K, repacked losslessly apart from bf16 scales) or a bf16 copy (other types); larger inputs
      dequantize blocks as usual. Inference turns it on for CPU decoding (toolkit.qkernels says why).
      With `use_bf16_copy` as well, inputs of qkernels.bf16_rows() rows or more (prefill included) use a bf16
      copy.
    With `use_ggml` (weights mode "ggml", the CPU default where libggml loads) inputs multiply through libggml's
    own mul_mat over the blocks (qkernels.ggml_form: llama.cpp's arithmetic): inputs of up to
    qkernels.GGML_MAX_ROWS rows, and any input for the types of qkernels.GGML_TILED; larger inputs of other types
    dequantize blocks.
    Finetune leaves them off so a quantized base stays packed in memory. It may give the layers a shared
    `weight_pool` (toolkit.wpool.WeightPool): whole-weight dequantizations then go through that byte-budgeted
    pool of recently used copies (exact values; finetune's --base-cache-mb).
    """

    cache_weights = False
    use_kernels = False
    use_bf16_copy = False
    use_ggml = False
    weight_pool = None

    def __init__(self, raw: torch.Tensor, qtype: QType, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.qtype = as_qtype(qtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("qweight", _packed_rows(raw, self.qtype, self.out_features, self.in_features, "weight"))
        if bias is not None:
            self.register_buffer("bias", bias.detach())
        else:
            self.bias = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, qtype: QType, bias: torch.Tensor | None = None) -> QuantLinear:
        out_f, in_f = weight.shape
        return cls(quantize(weight, qtype), qtype, in_f, out_f, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in] (float32). A fresh tensor each time: prefer weight_float()."""
        return self.weight_float()

    def weight_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = dequantize_rows(self.qweight, self.qtype, self.in_features)
        return w if dtype == torch.float32 else w.to(dtype)

    def _chunk(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        pool = self.weight_pool
        if pool is not None and r0 == 0 and r1 == self.out_features:
            return pool.get((self, dtype), lambda: self._dequantize(r0, r1, dtype))
        return self._dequantize(r0, r1, dtype)

    def _dequantize(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        w = dequantize_rows(self.qweight[r0:r1], self.qtype, self.in_features)
        return w if dtype == torch.float32 else w.to(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        chunks = _row_chunks(self.out_features, self.in_features)
        if len(chunks) == 1:
            return torch.matmul(x, self._chunk(0, self.out_features, x.dtype).t())
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for r0, r1 in chunks:
            out[..., r0:r1] = torch.matmul(x, self._chunk(r0, r1, x.dtype).t())
        return out

    def matmul_sliced(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ W.T in float32 for inputs of a few rows, exact: the blocks dequantized a cache-sized slice at a
        time into one buffer, on this thread, and each slice multiplied while in cache. A few rows make the product
        bound by the bytes read, and this way the weight is read packed instead of written and read back in float32
        (bf16 kernel forms fall back on it where the CPU has no bf16 dot products)."""
        x = x.float()
        step = max(1, SLICE_ELEMENTS // self.in_features)
        out = x.new_empty(x.shape[0], self.out_features)
        buf = torch.empty(min(step, self.out_features), self.in_features)
        for r0 in range(0, self.out_features, step):
            r1 = min(r0 + step, self.out_features)
            w = dequantize_rows(self.qweight[r0:r1], self.qtype, self.in_features, buf[:r1 - r0], spread=False)
            torch.mm(x, w.t(), out=out[:, r0:r1])
        return out

    def _matmul_t(self, gy: torch.Tensor) -> torch.Tensor:
        gx = None
        for r0, r1 in _row_chunks(self.out_features, self.in_features):
            part = torch.matmul(gy[..., r0:r1], self._chunk(r0, r1, gy.dtype))
            gx = part if gx is None else gx.add_(part)
        return gx

    def cached_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized copy [out, in] in `dtype`, made once (cache_weights mode)."""
        w = self.__dict__.get("_wcache")
        if w is None or w.dtype != dtype or w.device != self.qweight.device:
            w = self.weight_float(dtype)
            self.__dict__["_wcache"] = w
        return w

    def kernel_weight(self):
        """The qkernels form of the weight (CPU), made once (use_kernels mode)."""
        pw = self.__dict__.get("_kcache")
        if pw is None:
            if self.use_ggml:
                pw = qkernels.ggml_form(self.qweight, self.qtype, self.in_features)
            else:
                pw = qkernels.with_blocks(qkernels.pack(self.qweight, self.qtype, self.in_features),
                                         self.matmul_sliced)
            self.__dict__["_kcache"] = pw
        return pw

    def bf16_weight(self):
        """The bf16 copy as a qkernels form (use_bf16_copy), made once; the kernel form itself where that is one."""
        if qkernels.kind(self.qtype, self.in_features) == "bf16":
            return qkernels.copy_only(self.kernel_weight())
        pw = self.__dict__.get("_bcache")
        if pw is None:
            pw = self.__dict__["_bcache"] = qkernels.bf16_copy(self.qweight, self.qtype, self.in_features)
        return pw

    def drop_cache(self) -> None:
        self.__dict__.pop("_wcache", None)
        self.__dict__.pop("_kcache", None)
        self.__dict__.pop("_bcache", None)
        if self.weight_pool is not None:
            self.weight_pool.discard(self)

    def kernel_form(self, x: torch.Tensor) -> str | None:
        """Which kernel form multiplies x: "bf16" (the bf16 copy), "kernel" (kernel_weight()) or None (blocks)."""
        if not self.use_kernels or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
            return None
        if self.use_ggml:
            few = x.numel() <= qkernels.GGML_MAX_ROWS * self.in_features
            return "kernel" if few or self.qtype in qkernels.GGML_TILED else None
        if self.use_bf16_copy and x.numel() >= qkernels.bf16_rows() * self.in_features:
            return "bf16"
        return "kernel" if x.numel() <= qkernels.max_rows() * self.in_features else None

    def _apply(self, fn, recurse=True):  # .to(device) and friends: the copy is rebuilt lazily
        self.drop_cache()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        form = self.kernel_form(x)
        if form is not None:
            y = qkernels.matmul(x, self.bf16_weight() if form == "bf16" else self.kernel_weight())
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.cache_weights:
            return F.linear(x, self.cached_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if x.requires_grad and torch.is_grad_enabled():
            y = _QuantMatmul.apply(x, self)
        else:
            y = self._matmul(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


class QuantEmbedding(torch.nn.Module):
    """A frozen embedding table over packed GGUF blocks; forward dequantizes only the gathered rows."""

    def __init__(self, raw: torch.Tensor, qtype: QType, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.qtype = as_qtype(qtype)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.register_buffer("qweight", _packed_rows(raw, self.qtype, self.num_embeddings, self.embedding_dim,
                                                     "embedding"))

    @classmethod
    def from_float(cls, weight: torch.Tensor, qtype: QType) -> QuantEmbedding:
        n, dim = weight.shape
        return cls(quantize(weight, qtype), qtype, n, dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_float()

    def weight_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = dequantize_rows(self.qweight, self.qtype, self.embedding_dim)
        return w if dtype == torch.float32 else w.to(dtype)

    # eager even inside a compiled step: a few gathered rows leave inductor nothing to gain, and once compiled for
    # one quant type, a second model of another type in the process got wrong values from the recompiled graph
    @torch.compiler.disable
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.index_select(0, ids.reshape(-1).to(self.qweight.device))
        return dequantize_rows(rows, self.qtype, self.embedding_dim).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"
