"""A seeded fuzzer for the toolkit's file readers: real files, mutated, fed to the real commands.

Seed files are made in code (a tiny llama GGUF, a GGUF adapter, a PEFT folder, a GGLA file, a finetune
checkpoint) plus the bundled SmolLM2 GGUF. A case is (seed number, target, tool, mutation): truncation, bit
flips, or one header field set to a hostile value (counts, offsets, types, dims, string lengths and bytes,
alignment; safetensors header entries; adapter_config.json fields; checkpoint JSON). Each case runs
`toolkit.cli.main(argv)` in a forked copy of this process (no interpreter start per case; a segfault or hang
ends that child, not the run), with fd 1/2 captured, a memory cap and a timeout, and must end with exit 0 or
exit 1 and one `toolkit: error:` line naming an input, no traceback, and no output or temp file left behind
on failure. Every case is reproducible from its mutation (a small dict): `run_case(corpus, case)`.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT = "The quick brown fox jumps over the lazy dog. " * 20

# --- seed files ----------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    root: Path
    model: Path  # tiny llama GGUF, Q8_0 weights, general.alignment = 32
    adapter: Path  # GGUF adapter for it, general.alignment = 64
    peft: Path  # PEFT folder of the same adapter
    ggla: Path  # old llama.cpp adapter file
    checkpoint: Path  # toolkit finetune checkpoint of the tiny model (1 iteration)
    data: Path  # training text
    smollm2: Path  # the bundled real model

    def seed_path(self, target: str) -> Path:
        return getattr(self, target)


def _with_alignment(src: Path, dst: Path, alignment: int) -> Path:
    """Rewrite a GGUF with an explicit general.alignment key (so its value can be fuzzed)."""
    from gguf import GGUFValueType
    from gguf.gguf_writer import GGUFValue

    from toolkit.gguf_io import TensorSpec, copy_metadata, open_gguf, write_gguf

    g = open_gguf(src)
    meta = copy_metadata(g)
    meta["general.alignment"] = GGUFValue(alignment, GGUFValueType.UINT32, None)
    specs = [TensorSpec(n, t.qtype, t.shape, t.raw().numpy()) for n, t in g.tensors.items()]
    write_gguf(dst, meta, specs, alignment=alignment)
    return dst


def _write_ggla(path: Path, pairs: dict[str, Any], r: int, alpha: int) -> Path:
    """convert-lora-to-ggml.py's layout: b'algg', version, r, alpha; per tensor n_dims, name_len, ftype, ne, name,
    padding to 32, f32 data (loraA stored as A.T, loraB as B)."""
    import numpy as np

    with open(path, "wb") as f:
        f.write(b"algg" + struct.pack("<iii", 1, r, alpha))
        for gg, pair in pairs.items():
            for suffix, t in ((".loraA", pair.a.T.contiguous().numpy()), (".loraB", pair.b.numpy())):
                name = (gg + suffix).encode()
                f.write(struct.pack("<iii", 2, len(name), 0) + struct.pack("<ii", *t.shape[::-1]) + name)
                f.seek((f.tell() + 31) & -32)
                t.astype(np.float32).tofile(f)
    return path


def build_corpus(root: Path) -> Corpus:
    """Make every seed file under root (a few seconds; the checkpoint comes from a real 1-iteration finetune)."""
    from tiny import make_tiny_gguf, random_lora

    from toolkit.adapter import Adapter, write_gguf_adapter, write_peft_adapter
    from toolkit.bundled import smollm2_gguf
    from toolkit.cli import main

    root.mkdir(parents=True, exist_ok=True)
    seeds = root / "seeds"
    seeds.mkdir(exist_ok=True)
    tmp = make_tiny_gguf(seeds / "plain.gguf", n_layer=1, dim=32, n_head=2, n_kv=1, ffn=64, qtype="Q8_0")
    model = _with_alignment(tmp, seeds / "model.gguf", 32)
    tmp.unlink()
    shapes = {"blk.0.attn_q.weight": (32, 32), "blk.0.attn_v.weight": (16, 32), "blk.0.ffn_down.weight": (32, 64)}
    ad = Adapter(random_lora(shapes, r=2, seed=3, std=0.1), alpha=4.0, arch="llama")
    write_gguf_adapter(ad, seeds / "plain-adapter.gguf", base=model)
    adapter = _with_alignment(seeds / "plain-adapter.gguf", seeds / "adapter.gguf", 64)
    (seeds / "plain-adapter.gguf").unlink()
    peft = seeds / "peft"
    write_peft_adapter(ad, peft, base=model)
    ggla = _write_ggla(seeds / "adapter.ggla", ad.tensors, r=2, alpha=4)
    data = seeds / "data.txt"
    data.write_text(TEXT)
    ck_dir = seeds / "ck"
    ck_dir.mkdir(exist_ok=True)
    cwd = os.getcwd()
    try:
        os.chdir(ck_dir)
        rc = main(finetune_argv(model, data, "none.gguf", ck_dir) + ["--lora-r", "2"])
    finally:
        os.chdir(cwd)
    assert rc == 0, "seed finetune failed"
    checkpoint = seeds / "checkpoint.gguf"
    shutil.move(ck_dir / "ck-1.gguf", checkpoint)
    shutil.rmtree(ck_dir)
    return Corpus(root, model, adapter, peft, ggla, checkpoint, data, smollm2_gguf())


def finetune_argv(model: Path, data: Path, ck_in: Path | str, out: Path) -> list[str]:
    return ["finetune", "-m", str(model), "--checkpoint-in", str(ck_in), "--checkpoint-out",
            str(out / "ck-ITERATION.gguf"), "--lora-out", str(out / "lora-ITERATION.gguf"), "--train-data",
            str(data), "--adam-iter", "1", "-c", "16", "-b", "1", "--log-file", "", "--save-every", "1", "--seed",
            "1", "-t", "1", "--quiet"]


# --- where the fields are ------------------------------------------------------------------------------------

@dataclass
class Field:
    name: str  # "header:n_kv", "kv:general.alignment:value", "ti:blk.0.attn_q.weight:ne1", ...
    kind: str  # what it is: count, key_len, str_len, str, type, value, alignment, n_dims, ne, ttype, offset, ...
    offset: int
    fmt: str  # struct format, or "bytes:N" for raw bytes


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_fields(buf: bytes | memoryview) -> tuple[list[Field], int]:
    """Every header field of a GGUF with its offset (a few elements of each array), and where the header ends.
    An independent walker (not toolkit.gguf_io), so the fuzzer does not share the reader's assumptions."""
    out: list[Field] = [Field("header:version", "version", 4, "<I"), Field("header:n_tensors", "count", 8, "<Q"),
                        Field("header:n_kv", "count", 16, "<Q")]
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def string(label: str, kind: str, record: bool = True) -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        if record:
            out.append(Field(f"{label}:len", kind + "_len", pos, "<Q"))
            if n:
                out.append(Field(f"{label}:bytes", kind, pos + 8, f"bytes:{n}"))
        s = bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", "replace")
        pos += 8 + n
        return s

    for _ in range(n_kv):
        kpos = pos
        key = string("", "key", record=False)
        out += [Field(f"kv:{key}:key_len", "key_len", kpos, "<Q"), Field(f"kv:{key}:key", "key", kpos + 8,
                                                                          f"bytes:{pos - kpos - 8}")]
        (vtype,) = struct.unpack_from("<I", buf, pos)
        out.append(Field(f"kv:{key}:type", "vtype", pos, "<I"))
        pos += 4
        if vtype == 8:
            string(f"kv:{key}", "str")
        elif vtype in _GGUF_SCALARS:
            kind = "alignment" if key == "general.alignment" else "value"
            out.append(Field(f"kv:{key}:value", kind, pos, _GGUF_SCALARS[vtype]))
            pos += struct.calcsize(_GGUF_SCALARS[vtype])
        elif vtype == 9:
            sub, n = struct.unpack_from("<IQ", buf, pos)
            out += [Field(f"kv:{key}:arr_type", "vtype", pos, "<I"), Field(f"kv:{key}:count", "arr_count", pos + 4,
                                                                             "<Q")]
            pos += 12
            if sub == 8:
                for i in range(n):
                    string(f"kv:{key}[{i}]", "str", record=i in (0, 1, n // 2, n - 1))
            else:
                size = struct.calcsize(_GGUF_SCALARS[sub])
                if n:
                    out.append(Field(f"kv:{key}[0]", "value", pos, _GGUF_SCALARS[sub]))
                pos += size * n
        else:
            raise ValueError(f"seed has value type {vtype}")
    for _ in range(n_tensors):
        npos = pos
        name = string("", "name", record=False)
        out += [Field(f"ti:{name}:name_len", "str_len", npos, "<Q"),
                Field(f"ti:{name}:name", "str", npos + 8, f"bytes:{pos - npos - 8}")]
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        out.append(Field(f"ti:{name}:n_dims", "n_dims", pos, "<I"))
        pos += 4
        for k in range(n_dims):
            out.append(Field(f"ti:{name}:ne{k}", "ne", pos, "<Q"))
            pos += 8
        out += [Field(f"ti:{name}:type", "ttype", pos, "<I"), Field(f"ti:{name}:offset", "offset", pos + 4, "<Q")]
        pos += 12
    return out, pos


def ggla_fields(buf: bytes) -> tuple[list[Field], int]:
    out = [Field("header:magic", "magic", 0, "bytes:4"), Field("header:version", "version", 4, "<i"),
           Field("header:r", "rank", 8, "<i"), Field("header:alpha", "value", 12, "<i")]
    pos = 16
    while pos < len(buf):
        n_dims, name_len, _ = struct.unpack_from("<iii", buf, pos)
        name = buf[pos + 12 + 4 * n_dims:pos + 12 + 4 * n_dims + name_len].decode()
        out += [Field(f"t:{name}:n_dims", "n_dims", pos, "<i"), Field(f"t:{name}:name_len", "str_len", pos + 4, "<i"),
                Field(f"t:{name}:ftype", "ttype", pos + 8, "<i")]
        ne = struct.unpack_from(f"<{n_dims}i", buf, pos + 12)
        out += [Field(f"t:{name}:ne{k}", "ne", pos + 12 + 4 * k, "<i") for k in range(n_dims)]
        out.append(Field(f"t:{name}:name", "str", pos + 12 + 4 * n_dims, f"bytes:{name_len}"))
        pos = (pos + 12 + 4 * n_dims + name_len + 31) & -32
        n = 1
        for d in ne:
            n *= d
        pos += 4 * n
    return out, 16


# --- mutations -----------------------------------------------------------------------------------------------

GGUF_TARGETS = ("model", "adapter", "checkpoint", "smollm2")


def _hostile_int(rng: random.Random, fmt: str, old: int, size: int) -> int:
    bits = 8 * struct.calcsize(fmt)
    signed = fmt[-1].islower()
    top = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    picks = [0, 1, 2, 3, 5, old + 1, old - 1, old * 2, old + 32, top, -1, size, size // 2, size + 1,
             rng.randrange(0, 64), rng.randrange(0, max(size, 1) * 2)]
    if bits >= 32:
        picks += [1 << 31, (1 << 32) - 1, (1 << 31) - 1]
    if bits == 64:
        picks += [1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63]
    v = rng.choice(picks)
    lo = -(1 << (bits - 1)) if signed else 0
    if not lo <= v <= top:
        v &= (1 << bits) - 1
        if signed and v > top:
            v -= 1 << bits
    return v


def _hostile_bytes(rng: random.Random, old: bytes) -> bytes:
    b = bytearray(old)
    how = rng.choice(["ff", "nul", "random", "swap", "dot"])
    i = rng.randrange(len(b))
    if how == "ff":
        b[i] = 0xFF  # invalid UTF-8
    elif how == "nul":
        b[i] = 0
    elif how == "random":
        for j in rng.sample(range(len(b)), min(len(b), rng.randint(1, 3))):
            b[j] = rng.randrange(256)
    elif how == "swap" and len(b) > 1:
        j = rng.randrange(len(b))
        b[i], b[j] = b[j], b[i]
    else:
        b[i] = ord(".")
    return bytes(b)


def _field_mutation(rng: random.Random, fields: list[Field], size: int, buf: bytes) -> dict[str, Any]:
    kinds = sorted({f.kind for f in fields})
    kind = rng.choice(kinds)
    f = rng.choice([f for f in fields if f.kind == kind])
    if f.fmt.startswith("bytes:"):
        old = bytes(buf[f.offset:f.offset + int(f.fmt[6:])])
        return {"kind": "field", "field": f.name, "hex": _hostile_bytes(rng, old).hex()}
    (old,) = struct.unpack_from(f.fmt, buf, f.offset)
    if f.fmt in ("<f", "<d"):
        v: Any = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30])
    elif f.fmt == "<?":
        v = rng.choice([True, False])
    elif f.kind in ("vtype", "ttype"):
        v = rng.choice([0, 1, 2, 4, 6, 7, 8, 9, 10, 12, 13, 16, 24, 26, 27, 30, 31, 39, 40, 99, (1 << 31) - 1])
    elif f.kind == "alignment":
        v = rng.choice([0, 1, 3, 8, 16, 24, 64, 128, 1 << 20, 1 << 31, (1 << 32) - 1])
    else:
        v = _hostile_int(rng, f.fmt, int(old), size)
    return {"kind": "field", "field": f.name, "value": v}


def _layout(target: str, path: Path) -> tuple[list[Field], int, int]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(min(size, 8 << 20))  # SmolLM2's header is ~2 MB
    fields, end = (ggla_fields(head) if target == "ggla" else gguf_fields(head))
    return fields, end, size


_LAYOUTS: dict[tuple[str, str], tuple[list[Field], int, int]] = {}


def layout(target: str, path: Path) -> tuple[list[Field], int, int]:
    key = (target, str(path))
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _layout(target, path)
    return _LAYOUTS[key]


def _head(path: Path, n: int = 8 << 20) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


_PEFT_CFG_VALUES: list[Any] = [None, 0, -1, 1, 3, 1 << 40, 1.5, "x", "", [], {}, True, float("nan"), 1e308]
_PEFT_CFG_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules", "peft_type",
                  "use_dora", "fan_in_fan_out", "bias", "modules_to_save", "base_model_name_or_path",
                  "trainable_token_indices", "lora_bias"]


def make_mutation(rng: random.Random, corpus: Corpus, target: str) -> dict[str, Any]:
    if target == "peft":
        return _peft_mutation(rng, corpus)
    path = corpus.seed_path(target)
    fields, end, size = layout(target, path)
    if target == "smollm2":  # a few expensive copies: truncations and flips only
        kind = rng.choice(["truncate", "flip"])
    elif target == "checkpoint":
        kind = rng.choices(["truncate", "flip", "field", "json"], [2, 2, 5, 3])[0]
    else:
        kind = rng.choices(["truncate", "flip", "field"], [2, 2, 6])[0]
    if kind == "truncate":
        where = rng.random()
        at = rng.randrange(0, end) if where < 0.4 else rng.randrange(end, size) if where < 0.8 else \
            max(0, size - rng.randrange(1, 64))
        return {"kind": "truncate", "at": at}
    if kind == "flip":
        hi = end if rng.random() < 0.7 else size
        return {"kind": "flip", "bits": sorted(rng.randrange(0, hi * 8) for _ in range(rng.randint(1, 8)))}
    if kind == "json":
        return _json_mutation(rng, corpus.checkpoint)
    return _field_mutation(rng, fields, size, _head(path, max(f.offset for f in fields) + 64))


def _json_paths(obj: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _json_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += _json_paths(v, path + (i,))
    return out


def _json_mutation(rng: random.Random, ck: Path) -> dict[str, Any]:
    from toolkit.gguf_io import open_gguf

    g = open_gguf(ck)
    key = rng.choice(["training.state", "training.config", "optimizer.state"])
    doc = json.loads(g.metadata[key])
    paths = _json_paths(doc)
    p = list(rng.choice(paths[1:] or paths))
    value = rng.choice([None, -1, 0, 1 << 40, "x", [], {}, 1.5, [1, 2], {"__tensor__": "opt.999"},
                        {"__tensor__": "blk.0.attn_q.weight.lora_a", "dtype": "float32", "shape": [3]}])
    if rng.random() < 0.15:
        return {"kind": "json", "key": key, "path": [], "raw": g.metadata[key][: rng.randrange(len(g.metadata[key]))]}
    return {"kind": "json", "key": key, "path": p, "value": value}


def _peft_mutation(rng: random.Random, corpus: Corpus) -> dict[str, Any]:
    st = corpus.peft / "adapter_model.safetensors"
    buf = st.read_bytes()
    (hlen,) = struct.unpack_from("<Q", buf, 0)
    kind = rng.choices(["cfg", "cfg_raw", "st_truncate", "st_flip", "st_len", "st_json", "missing"],
                       [5, 1, 2, 2, 1, 5, 0.3])[0]
    if kind == "cfg":
        return {"kind": "cfg", "key": rng.choice(_PEFT_CFG_KEYS), "value": rng.choice(_PEFT_CFG_VALUES + [
            {"q_proj": 0}, {"(": 2}, {"v_proj": "x"}, ["nope"], "LOHA"])}
    if kind == "cfg_raw":
        return {"kind": "cfg_raw", "text": rng.choice(["[]", "null", "1", "{", '{"r": 2', '"x"', "{}"])}
    if kind == "st_truncate":
        return {"kind": "st_truncate", "at": rng.randrange(0, len(buf))}
    if kind == "st_flip":
        hi = 8 + hlen if rng.random() < 0.7 else len(buf)
        return {"kind": "st_flip", "bits": sorted(rng.randrange(0, hi * 8) for _ in range(rng.randint(1, 6)))}
    if kind == "st_len":
        return {"kind": "st_len", "value": rng.choice([0, 1, hlen - 1, hlen + 1, len(buf), 1 << 40, (1 << 64) - 1])}
    if kind == "missing":
        return {"kind": "missing", "file": rng.choice(["adapter_config.json", "adapter_model.safetensors"])}
    header = json.loads(buf[8:8 + hlen])
    name = rng.choice([k for k in header if k != "__metadata__"] + ["__metadata__"])
    if name == "__metadata__":
        return {"kind": "st_json", "tensor": name, "key": "toolkit.gguf_metadata",
                "value": rng.choice(["{", "[]", '{"a": [1, 99, null]}', '{"a": 5}', "null"])}
    key = rng.choice(["dtype", "shape", "data_offsets", "name"])
    if key == "dtype":
        value: Any = rng.choice(["F16", "BF16", "I64", "U8", "F64", "BOOL", "F8_E4M3", "XX"])
    elif key == "shape":
        value = rng.choice([[], [0], [2], [2, 2, 2], [1 << 40, 2], [2, 32 * 1024], [-1, 2], [2, 64], [32, 2]])
    elif key == "data_offsets":
        a, b = header[name]["data_offsets"]
        value = rng.choice([[b, a], [0, 0], [a, b + 4], [a, 1 << 40], [a + 1, b + 1], [0, b - a]])
    else:
        value = rng.choice([name.replace("lora_A", "lora_B"), name.replace(".weight", ""), "x", name + ".lora_A.weight",
                            name.replace("q_proj", "zz_proj"), name.replace("layers.0", "layers.7")])
    return {"kind": "st_json", "tensor": name, "key": key, "value": value}


# --- applying a mutation -------------------------------------------------------------------------------------

def _flip(b: bytearray, bits: list[int]) -> None:
    for bit in bits:
        if bit // 8 < len(b):
            b[bit // 8] ^= 1 << (bit % 8)


def apply_mutation(corpus: Corpus, target: str, mut: dict[str, Any], dst_dir: Path) -> Path:
    """Write the mutated input into dst_dir; returns its path (a folder for PEFT)."""
    src = corpus.seed_path(target)
    if target == "peft":
        return _apply_peft(src, mut, dst_dir / "peft")
    dst = dst_dir / ("adapter.ggla" if target == "ggla" else f"{target}.gguf")
    k = mut["kind"]
    if k == "truncate":
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            fo.write(fi.read(mut["at"]))
        return dst
    if k == "json":
        return _apply_json(src, mut, dst)
    if target == "smollm2":  # 98 MB: copy, then patch in place
        shutil.copyfile(src, dst)
        with open(dst, "r+b") as fh:
            for bit in mut["bits"]:
                fh.seek(bit // 8)
                (c,) = fh.read(1)
                fh.seek(bit // 8)
                fh.write(bytes([c ^ (1 << (bit % 8))]))
        return dst
    b = bytearray(src.read_bytes())
    if k == "flip":
        _flip(b, mut["bits"])
    elif k == "field":
        f = next(f for f in layout(target, src)[0] if f.name == mut["field"])
        if "hex" in mut:
            new = bytes.fromhex(mut["hex"])
            b[f.offset:f.offset + len(new)] = new
        else:
            struct.pack_into(f.fmt, b, f.offset, mut["value"])
    else:
        raise ValueError(f"unknown mutation {k}")
    dst.write_bytes(bytes(b))
    return dst


def _set_path(doc: Any, path: list, value: Any) -> Any:
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


def _apply_json(src: Path, mut: dict[str, Any], dst: Path) -> Path:
    from toolkit.gguf_io import TensorSpec, copy_metadata, open_gguf, write_gguf

    g = open_gguf(src)
    meta = copy_metadata(g)
    if "raw" in mut:
        text = mut["raw"]
    else:
        text = json.dumps(_set_path(json.loads(g.metadata[mut["key"]]), mut["path"], mut["value"]))
    meta[mut["key"]] = text
    write_gguf(dst, meta, [TensorSpec(n, t.qtype, t.shape, t.raw().numpy()) for n, t in g.tensors.items()])
    return dst


def _apply_peft(src: Path, mut: dict[str, Any], dst: Path) -> Path:
    shutil.copytree(src, dst)
    k = mut["kind"]
    cfg_p, st_p = dst / "adapter_config.json", dst / "adapter_model.safetensors"
    if k == "cfg":
        cfg = json.loads(cfg_p.read_text())
        cfg[mut["key"]] = mut["value"]
        cfg_p.write_text(json.dumps(cfg))
    elif k == "cfg_raw":
        cfg_p.write_text(mut["text"])
    elif k == "missing":
        (dst / mut["file"]).unlink()
    else:
        b = bytearray(st_p.read_bytes())
        (hlen,) = struct.unpack_from("<Q", b, 0)
        if k == "st_truncate":
            b = b[: mut["at"]]
        elif k == "st_flip":
            _flip(b, mut["bits"])
        elif k == "st_len":
            struct.pack_into("<Q", b, 0, mut["value"])
        elif k == "st_json":
            header = json.loads(b[8:8 + hlen])
            data = b[8 + hlen:]
            if mut["tensor"] == "__metadata__":
                header.setdefault("__metadata__", {})[mut["key"]] = mut["value"]
            elif mut["key"] == "name":
                header[mut["value"]] = header.pop(mut["tensor"])
            else:
                header[mut["tensor"]][mut["key"]] = mut["value"]
            h = json.dumps(header).encode()
            h += b" " * (-len(h) % 8)
            b = bytearray(struct.pack("<Q", len(h)) + h + data)
        else:
            raise ValueError(f"unknown mutation {k}")
        st_p.write_bytes(bytes(b))
    return dst


# --- the commands --------------------------------------------------------------------------------------------

# (target, tool) pairs and their weights in a run: cheap readers often, finetune and SmolLM2 a few times
PLAN: list[tuple[str, str, int]] = [
    ("model", "infer", 12), ("model", "export", 5), ("model", "convert", 4), ("model", "finetune", 1),
    ("adapter", "infer", 6), ("adapter", "convert", 6), ("adapter", "export", 5),
    ("peft", "infer", 6), ("peft", "convert", 7), ("peft", "export", 4),
    ("ggla", "infer", 5), ("ggla", "convert", 6), ("ggla", "export", 3),
    ("checkpoint", "finetune", 8), ("smollm2", "infer", 2),
]


def case_argv(corpus: Corpus, target: str, tool: str, mut_path: Path, out: Path) -> list[str]:
    model = mut_path if target in ("model", "smollm2") else corpus.model
    if tool == "infer":
        argv = ["infer", "-m", str(model), "-p", "hi", "-n", "2", "--temp", "0", "--ignore-eos", "-t", "1",
                "--device", "cpu", "-c", "64"]
        return argv if target in ("model", "smollm2") else argv + ["--lora", str(mut_path)]
    if tool == "export":
        lora = corpus.adapter if target == "model" else mut_path
        return ["export-lora", "-m", str(model), "-o", str(out / "merged.gguf"), "--lora", str(lora), "-t", "1",
                "--no-progress"]
    if tool == "convert":
        if target == "model":
            return ["convert", "lora", str(corpus.adapter), "-o", str(out / "peft"), "--base", str(mut_path)]
        dst = out / ("peft" if target == "adapter" else "adapter.gguf")
        return ["convert", "lora", str(mut_path), "-o", str(dst), "--base", str(corpus.model)]
    if tool == "finetune":
        ck = mut_path if target == "checkpoint" else corpus.checkpoint
        return finetune_argv(model, corpus.data, ck, out) + ["--lora-r", "2"]
    raise ValueError(tool)


@dataclass
class Case:
    seed: int
    target: str
    tool: str
    mutation: dict[str, Any]
    name: str = ""

    def label(self) -> str:
        return self.name or f"seed {self.seed} {self.target}/{self.tool} {json.dumps(self.mutation)}"


def make_cases(corpus: Corpus, n: int, base_seed: int = 0) -> list[Case]:
    """n cases in PLAN's proportions; case i uses seed base_seed + i (its mutation depends on that seed only)."""
    slots = [(t, tool) for t, tool, w in PLAN for _ in range(w)]
    cases = []
    for i in range(n):
        seed = base_seed + i
        target, tool = slots[(seed * 7) % len(slots)]  # 7 is coprime with the plan's length: every slot in turn
        rng = random.Random(seed)
        cases.append(Case(seed, target, tool, make_mutation(rng, corpus, target)))
    return cases


# --- running one case ----------------------------------------------------------------------------------------

@dataclass
class Result:
    case: Case
    outcome: str  # "exit0", "exit1" (clean), or a failure: traceback, crash, hang, bad-exit, bad-message, leftover
    rc: int | None = None
    stderr: str = ""
    detail: str = ""
    seconds: float = 0.0
    known: str = ""  # a failure owned by another change (see KNOWN)

    @property
    def ok(self) -> bool:
        return self.outcome in ("exit0", "exit1")


# failures another helper is fixing: (label, predicate on the Result) -- reported, not counted as ours
KNOWN: list[tuple[str, Any]] = [
    ("tokenizer library error (helper `defects`)",
     lambda r: r.outcome in ("traceback", "bad-message") and "toolkit/tokenizer.py" in r.detail),
]


def _child(corpus: Corpus, case: Case, case_dir: Path) -> None:
    """In the forked child: mutate, run the command with fds 1/2 on a file, write result.json, _exit."""
    code = 0
    res: dict[str, Any] = {}
    try:
        out = case_dir / "out"
        inp = case_dir / "in"
        out.mkdir(parents=True)
        inp.mkdir()
        mut_path = apply_mutation(corpus, case.target, case.mutation, inp)
        argv = case_argv(corpus, case.target, case.tool, mut_path, out)
        res["argv"] = argv
        (case_dir / "result.json").write_text(json.dumps(res))
        fd = os.open(case_dir / "stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        vm = _vm_bytes()
        if vm:  # hostile sizes must be refused before allocating: a cap turns a huge allocation into a failure
            resource.setrlimit(resource.RLIMIT_AS, (vm + (6 << 30), resource.RLIM_INFINITY))
        import torch

        torch.set_num_threads(1)
        os.chdir(out)
        from toolkit.cli import main

        try:
            res["rc"] = int(main(argv))
        except SystemExit as e:
            res["rc"] = e.code if isinstance(e.code, int) else 2
        except BaseException as e:  # noqa: BLE001 - the point: anything escaping main is a defect
            res["exc"] = f"{type(e).__name__}: {str(e)[:300]}"
            res["tb"] = traceback.format_exc()[-3000:]
        sys.stdout.flush()
        sys.stderr.flush()
        (case_dir / "result.json").write_text(json.dumps(res))
    except BaseException:  # noqa: BLE001
        (case_dir / "fuzzer-error.txt").write_text(traceback.format_exc())
        code = 3
    os._exit(code)


def _vm_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _inputs(argv: list[str]) -> list[str]:
    return [a for a in argv if "/" in a]


def _leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def judge(case: Case, case_dir: Path, status: int | None, seconds: float, timed_out: bool) -> Result:
    stderr = (case_dir / "stderr.txt").read_text(errors="replace") if (case_dir / "stderr.txt").exists() else ""
    r = Result(case, "", stderr=stderr[-4000:], seconds=seconds)
    if (case_dir / "fuzzer-error.txt").exists():
        r.outcome, r.detail = "fuzzer-error", (case_dir / "fuzzer-error.txt").read_text()[-2000:]
        return r
    res = json.loads((case_dir / "result.json").read_text()) if (case_dir / "result.json").exists() else {}
    out = case_dir / "out"
    if timed_out:
        r.outcome, r.detail = "hang", f"no exit after {seconds:.0f} s"
    elif status is not None and os.WIFSIGNALED(status):
        r.outcome, r.detail = "crash", f"killed by signal {os.WTERMSIG(status)}"
    elif "exc" in res:
        r.outcome, r.detail = "traceback", res["exc"] + "\n" + res.get("tb", "")
    else:
        r.rc = res.get("rc")
        lines = [x for x in stderr.splitlines() if x.strip()]
        errs = [x for x in lines if x.startswith("toolkit: error:")]
        left = _leftovers(out) if out.exists() else []
        temps = [x for x in left if x.rsplit("/", 1)[-1].startswith(".") and x.endswith((".tmp", ".old"))]
        if r.rc not in (0, 1):
            r.outcome, r.detail = "bad-exit", f"exit {r.rc}"
        elif "Traceback (most recent call last)" in stderr:
            r.outcome, r.detail = "bad-message", "a traceback on stderr"
        elif r.rc == 1 and (len(errs) != 1 or lines[-1] != errs[0]):
            r.outcome, r.detail = "bad-message", f"{len(errs)} error lines; last line {lines[-1:]!r}"
        elif r.rc == 1 and not any(p in errs[0] for p in _inputs(res.get("argv", []))):
            r.outcome, r.detail = "bad-message", f"the error names no input file: {errs[0]!r}"
        elif r.rc == 1 and left:
            r.outcome, r.detail = "leftover", f"failed but left {left}"
        elif temps:
            r.outcome, r.detail = "leftover", f"temp files left: {temps}"
        else:
            r.outcome = f"exit{r.rc}"
    if not r.ok:
        r.known = next((label for label, pred in KNOWN if pred(r)), "")
    return r


def run_cases(corpus: Corpus, cases: list[Case], jobs: int = 2, timeout: float = 60.0, keep: bool = False,
              progress: bool = False) -> list[Result]:
    """Run cases in forked children, `jobs` at a time. Case folders of clean cases are removed unless keep."""
    work = corpus.root / "cases"
    work.mkdir(exist_ok=True)
    pending = list(enumerate(cases))
    running: dict[int, tuple[int, Case, Path, float]] = {}
    results: dict[int, Result] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    while pending or running:
        while pending and len(running) < jobs:
            i, case = pending.pop(0)
            case_dir = work / f"{i:05d}-s{case.seed}-{case.target}-{case.tool}"
            shutil.rmtree(case_dir, ignore_errors=True)
            pid = os.fork()
            if pid == 0:
                _child(corpus, case, case_dir)
            running[pid] = (i, case, case_dir, time.monotonic())
        time.sleep(0.005)
        for pid, (i, case, case_dir, t0) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            elapsed = time.monotonic() - t0
            timed_out = False
            if not done and elapsed > timeout:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                done, timed_out = pid, True
            if done:
                del running[pid]
                r = judge(case, case_dir, status, elapsed, timed_out)
                results[i] = r
                if r.ok and not keep:
                    shutil.rmtree(case_dir, ignore_errors=True)
                if progress and (not r.ok or len(results) % 100 == 0):
                    print(f"[{len(results)}/{len(cases)}] {r.outcome:<11} {case.label()}"
                          + (f"\n    {r.detail.splitlines()[0] if r.detail else ''}" if not r.ok else ""),
                          file=sys.stderr, flush=True)
    return [results[i] for i in range(len(cases))]


def summary(results: list[Result]) -> dict[tuple[str, str], Counter]:
    table: dict[tuple[str, str], Counter] = {}
    for r in results:
        c = table.setdefault((r.case.target, r.case.tool), Counter())
        c["known" if r.known else r.outcome] += 1
    return table


def failures(results: list[Result]) -> list[Result]:
    return [r for r in results if not r.ok and not r.known]


def describe(r: Result) -> str:
    return f"{r.outcome}: {r.case.label()}\n  {r.detail[-1500:]}\n  stderr: {r.stderr[-600:]}"
