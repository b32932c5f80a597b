"""GGUF files: memory-mapped reading with clear errors, atomic streaming writes through the `gguf` package.

Shapes here are torch order (rows first): a GGUF tensor with ggml ne = [n_embd, n_vocab] has shape
(n_vocab, n_embd). Raw data stays in the file's pages (mmap, copy-on-write) until someone reads it.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Union

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.gguf_writer import GGUFValue

from .errors import ToolkitError
from .fileutil import atomic_path

GGUF_MAGIC = b"GGUF"
QType = Union[GGMLQuantizationType, str]
# the tensor types that hold plain floats (no blocks to quantize or dequantize)
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def as_qtype(qtype: QType | int) -> GGMLQuantizationType:
    """'Q4_K' / 'q4_k' / 12 / GGMLQuantizationType.Q4_K -> GGMLQuantizationType.Q4_K."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    try:
        if isinstance(qtype, str):
            return GGMLQuantizationType[qtype.upper()]
        return GGMLQuantizationType(int(qtype))
    except (KeyError, ValueError):
        raise ToolkitError(f"unknown quantization type '{qtype}'") from None


def row_bytes(qtype: QType, n_per_row: int) -> int:
    """Bytes GGUF stores for one row of n_per_row values."""
    block, size = GGML_QUANT_SIZES[as_qtype(qtype)]
    if n_per_row % block:
        raise ToolkitError(f"a row of {n_per_row} values is not a multiple of {as_qtype(qtype).name}'s block of {block}")
    return n_per_row // block * size


@dataclass
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order
    data: np.ndarray  # the file's bytes/values, as gguf-py exposes them (a view on the mmap)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def raw(self) -> torch.Tensor:
        """uint8 [rows, row_bytes] (1-D tensors: [1, row_bytes]), zero-copy over the file."""
        cols = self.shape[-1] if self.shape else 1
        flat = np.ascontiguousarray(self.data).reshape(-1).view(np.uint8)
        return torch.from_numpy(flat.reshape(-1, row_bytes(self.qtype, cols)))


@dataclass
class GGUFFile:
    path: str
    metadata: dict[str, Any]  # plain Python values
    types: dict[str, GGUFValue]  # the same values with their GGUF value types, for faithful copies
    tensors: dict[str, TensorInfo]

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_get(self, key: str, default: Any = None) -> Any:
        """`{arch}.{key}`, e.g. arch_get('block_count')."""
        return self.metadata.get(f"{self.arch}.{key}", default)

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ToolkitError(f"no tensor named '{name}'", self.path) from None


_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NP_SCALARS = {t: np.dtype(f) for t, f in _SCALARS.items()}


class _Cursor:
    """Reads the GGUF header. gguf-py's GGUFReader builds a numpy view per string (6 s for a 49k-token
    vocabulary); this walks the same layout with struct in ~0.1 s. Writing still goes through gguf-py."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ToolkitError("truncated GGUF header", self.path) from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ToolkitError("truncated GGUF header (string runs past the end)", self.path)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def _strings(self, n: int) -> list[str]:
        buf, pos, end, out = self.buf[self.pos:], 0, len(self.buf) - self.pos, []
        unpack = struct.Struct("<Q").unpack_from
        append = out.append
        for _ in range(n):
            if pos + 8 > end:
                raise ToolkitError("truncated GGUF header (string array)", self.path)
            (k,) = unpack(buf, pos)
            pos += 8
            if pos + k > end:
                raise ToolkitError("truncated GGUF header (string array)", self.path)
            append(str(buf[pos:pos + k], "utf-8", "replace"))
            pos += k
        self.pos += pos
        return out

    def value_type(self) -> GGUFValueType:
        raw = self.take("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise ToolkitError(f"unknown metadata value type {raw}", self.path) from None

    def value(self, vtype: GGUFValueType) -> tuple[Any, GGUFValueType | None]:
        if vtype == GGUFValueType.STRING:
            return self.string(), None
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype]), None
        if vtype == GGUFValueType.ARRAY:
            sub = self.value_type()
            n = self.take("<Q")
            if sub in _NP_SCALARS:  # numeric arrays in one read
                size = _NP_SCALARS[sub].itemsize * n
                if self.pos + size > len(self.buf):
                    raise ToolkitError("truncated GGUF header (array runs past the end)", self.path)
                arr = np.frombuffer(self.buf, _NP_SCALARS[sub], n, self.pos)
                self.pos += size
                return arr.tolist(), sub
            if n > len(self.buf):
                raise ToolkitError(f"corrupt header: array of {n} items", self.path)
            if sub == GGUFValueType.STRING:
                return self._strings(n), sub
            return [self.value(sub)[0] for _ in range(n)], sub
        raise ToolkitError(f"unsupported metadata value type {vtype.name}", self.path)


def _check_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        got = head[:4]
        hint = " (an old GGML/GGLA file?)" if got in (b"algg", b"ggla", b"tjgg", b"lmgg") else ""
        raise ToolkitError(f"not a GGUF file: wrong magic {got!r}{hint}", str(path))
    if len(head) < 24:
        raise ToolkitError("truncated GGUF header", str(path))
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise ToolkitError(f"unsupported GGUF version {version}", str(path))
    # every tensor info takes >= 24 bytes and every key/value >= 13: counts beyond that are corrupt
    if n_tensors * 24 + n_kv * 13 > size:
        raise ToolkitError(f"corrupt header: {n_tensors} tensors / {n_kv} keys cannot fit in {size} bytes", str(path))


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file memory-mapped. Any malformation raises ToolkitError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ToolkitError("no such file" if not p.exists() else "not a file", str(p))
    _check_header(p)
    size = p.stat().st_size
    mm = np.memmap(p, dtype=np.uint8, mode="c")  # copy-on-write: writable views for torch, file untouched
    cur = _Cursor(memoryview(mm), str(p))
    cur.pos = 8
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    metadata: dict[str, Any] = {}
    types: dict[str, GGUFValue] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.value_type()
        value, sub = cur.value(vtype)
        metadata[key], types[key] = value, GGUFValue(value, vtype, sub)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if n_dims > 4:
            raise ToolkitError(f"tensor '{name}' has {n_dims} dimensions (GGUF allows 4)", str(p))
        ne = [cur.take("<Q") for _ in range(n_dims)]
        raw_type = cur.take("<I")
        offset = cur.take("<Q")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ToolkitError(f"tensor '{name}' has unknown type {raw_type}", str(p)) from None
        if qtype not in GGML_QUANT_SIZES:
            raise ToolkitError(f"tensor '{name}' has unknown type {raw_type}", str(p))
        infos.append((name, qtype, tuple(reversed(ne)), offset))
    alignment = metadata.get("general.alignment", 32)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ToolkitError(f"invalid general.alignment {alignment}", str(p))
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, qtype, shape, offset in infos:
        if name in tensors:
            raise ToolkitError(f"duplicate tensor '{name}'", str(p))
        n_el = math.prod(shape)  # Python ints: a corrupt dimension must not wrap around as numpy's int64 does
        block, bsize = GGML_QUANT_SIZES[qtype]
        if shape and shape[-1] % block:
            raise ToolkitError(f"tensor '{name}': row of {shape[-1]} is not a multiple of {qtype.name}'s block", str(p))
        if offset % alignment:  # llama.cpp refuses these too; an odd offset would give unaligned views
            raise ToolkitError(f"tensor '{name}' has offset {offset}, not a multiple of the alignment {alignment}",
                               str(p))
        nbytes = n_el // block * bsize
        start = data_start + offset
        if start + nbytes > size:
            raise ToolkitError(f"truncated file: tensor '{name}' runs past the end", str(p))
        view = mm[start:start + nbytes]
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            view = view.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16).reshape(shape)
        tensors[name] = TensorInfo(name, qtype, shape, view)
    return GGUFFile(str(p), metadata, types, tensors)


# --- writing ---------------------------------------------------------------------------------------------

TensorData = Union[np.ndarray, torch.Tensor, Callable[[], Union[np.ndarray, torch.Tensor]]]


@dataclass
class TensorSpec:
    """One tensor to write. `data` is float values of `shape` for F32/F16 (converted as needed), a torch.bfloat16
    tensor for BF16, or uint8 raw blocks [rows, row_bytes] for any type (toolkit.quants.encode makes them), or a zero-argument callable producing either (streaming: called
    only when that tensor is written, so a whole model never sits in memory)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order
    data: TensorData

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return rows * row_bytes(self.qtype, self.shape[-1])


def infer_value(value: Any) -> GGUFValue:
    """Plain Python -> typed GGUF value with llama.cpp's usual types (ints are UINT32 unless negative)."""
    if isinstance(value, GGUFValue):
        return value
    if isinstance(value, bool):
        return GGUFValue(value, GGUFValueType.BOOL, None)
    if isinstance(value, int):
        return GGUFValue(value, GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32, None)
    if isinstance(value, float):
        return GGUFValue(value, GGUFValueType.FLOAT32, None)
    if isinstance(value, str):
        return GGUFValue(value, GGUFValueType.STRING, None)
    if isinstance(value, (list, tuple)):
        first = value[0] if len(value) else ""
        sub = {bool: GGUFValueType.BOOL, int: GGUFValueType.INT32, float: GGUFValueType.FLOAT32}.get(
            type(first), GGUFValueType.STRING)
        return GGUFValue(list(value), GGUFValueType.ARRAY, sub)
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _to_numpy(spec: TensorSpec) -> np.ndarray:
    data = spec.data() if callable(spec.data) else spec.data
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.uint8) if spec.qtype == GGMLQuantizationType.BF16 else data.float()
        data = data.contiguous().numpy()
    arr = np.asarray(data)
    q = spec.qtype
    if arr.dtype == np.uint8:
        raw = arr
    elif q == GGMLQuantizationType.F32:
        raw = arr.astype(np.float32, copy=False)
    elif q == GGMLQuantizationType.F16:
        raw = arr.astype(np.float16, copy=False)
    elif q == GGMLQuantizationType.BF16:
        raise ToolkitError(f"tensor '{spec.name}': BF16 data must be a torch.bfloat16 tensor or raw uint8 "
                           f"(toolkit.quants.encode converts float values)")
    else:
        raise ToolkitError(f"tensor '{spec.name}': {q.name} data must be raw uint8 blocks (quantize it first)")
    if raw.nbytes != spec.nbytes:
        raise ToolkitError(f"tensor '{spec.name}': {raw.nbytes} bytes given, {spec.nbytes} expected for "
                           f"{q.name} {list(spec.shape)}")
    return np.ascontiguousarray(raw).reshape(-1).view(np.uint8)


def write_gguf(path: str | os.PathLike, metadata: Mapping[str, Any], tensors: Iterable[TensorSpec],
               progress: bool = False, alignment: int | None = None) -> None:
    """Write a GGUF atomically (temp file + rename), streaming tensor by tensor.

    metadata values are plain Python (types inferred, see infer_value) or GGUFValue (kept as typed);
    `general.architecture` must be among them. Tensor data callables are evaluated one at a time.
    """
    meta = dict(metadata)
    arch = meta.pop("general.architecture", None)
    if arch is None:
        raise ValueError("metadata needs general.architecture")
    arch = arch.value if isinstance(arch, GGUFValue) else arch
    specs = list(tensors)
    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, arch=str(arch))
        if alignment:
            writer.data_alignment = alignment
        for key, value in meta.items():
            v = infer_value(value)
            writer.add_key_value(key, v.value, v.type, sub_type=v.sub_type)
        for s in specs:
            byte_shape = [*s.shape[:-1], row_bytes(s.qtype, s.shape[-1])]  # gguf-py turns it back into ne
            writer.add_tensor_info(s.name, byte_shape, np.dtype(np.uint8), s.nbytes, raw_dtype=s.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc=f"writing {Path(path).name}")
        for s in specs:
            writer.write_tensor_data(_to_numpy(s))
            if bar is not None:
                bar.update(s.nbytes)
        if bar is not None:
            bar.close()
        writer.close()


def copy_metadata(src: GGUFFile, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Typed metadata of `src`, ready for write_gguf (skips gguf-py's bookkeeping and `skip` keys)."""
    drop = set(skip)
    out: dict[str, Any] = {"general.architecture": src.arch}
    out.update({k: v for k, v in src.types.items() if k not in drop and k != "general.architecture"})
    return out
