"""GGUF I/O against gguf-py's own reader (the oracle for the container format), and every malformation."""
from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_writer import GGUFValue

from toolkit.errors import ToolkitError
from toolkit.gguf_io import TensorSpec, copy_metadata, open_gguf, write_gguf


def _write_small(path, extra_meta=None):
    meta = {"general.architecture": "llama", "general.name": "t", "llama.block_count": 2,
            "llama.rope.freq_base": 10000.0, "tokenizer.ggml.tokens": ["a", "b", "ü"],
            "tokenizer.ggml.scores": [0.0, -1.5, 2.0], "tokenizer.ggml.token_type": [1, 3, 1],
            "tokenizer.ggml.add_bos_token": True, "signed": -3}
    meta.update(extra_meta or {})
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    h = rng.standard_normal((3, 32)).astype(np.float16)
    q8 = rng.integers(0, 255, (4, 34 * 2), dtype=np.uint8)  # 4 rows of 64 values in Q8_0 blocks
    q8[:, 0:2] = q8[:, 34:36] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)  # finite scales
    specs = [TensorSpec("w", Q.F32, (8, 64), w), TensorSpec("h", Q.F16, (3, 32), h),
             TensorSpec("q", Q.Q8_0, (4, 64), lambda: q8), TensorSpec("v", Q.F32, (5,), torch.arange(5.0))]
    write_gguf(path, meta, specs)
    return meta, {"w": w, "h": h, "q": q8}


def test_roundtrip_matches_gguf_py_reader(tmp_path):
    path = tmp_path / "m.gguf"
    meta, data = _write_small(path)
    ours = open_gguf(path)
    ref = GGUFReader(path)  # gguf-py is the oracle for the container
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type
        assert mine.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(mine.data.reshape(-1).view(np.uint8), t.data.reshape(-1).view(np.uint8))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours.metadata[key] == field.contents()
        assert ours.types[key].type == field.types[0]
    assert ours.types["llama.block_count"].type == GGUFValueType.UINT32  # llama.cpp insists on u32
    assert ours.types["signed"].type == GGUFValueType.INT32
    assert ours.types["tokenizer.ggml.token_type"].sub_type == GGUFValueType.INT32
    assert np.array_equal(ours.tensor("w").data, data["w"])
    assert torch.equal(ours.tensor("q").raw(), torch.from_numpy(data["q"]))
    assert ours.tensor("v").raw().shape == (1, 20)


def test_copy_metadata_preserves_types(tmp_path):
    src_path = tmp_path / "a.gguf"
    _write_small(src_path, {"u64": GGUFValue(7, GGUFValueType.UINT64, None)})
    src = open_gguf(src_path)
    dst_path = tmp_path / "b.gguf"
    write_gguf(dst_path, copy_metadata(src), [TensorSpec("x", Q.F32, (2,), np.ones(2, np.float32))])
    dst = open_gguf(dst_path)
    for k, v in src.types.items():
        assert dst.types[k].type == v.type and dst.metadata[k] == src.metadata[k]


def test_size_mismatch_is_refused_and_nothing_written(tmp_path):
    path = tmp_path / "bad.gguf"
    with pytest.raises(ToolkitError, match="bytes given"):
        write_gguf(path, {"general.architecture": "llama"}, [TensorSpec("x", Q.F32, (4,), np.ones(3, np.float32))])
    assert not path.exists() and not list(tmp_path.iterdir())  # no temp file left behind either


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "keep.gguf"
    _write_small(path)
    before = path.read_bytes()

    def boom():
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_gguf(path, {"general.architecture": "llama"}, [TensorSpec("x", Q.F32, (2,), boom)])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.gguf"]


def _corrupt(tmp_path, mutate):
    path = tmp_path / "m.gguf"
    _write_small(path)
    raw = bytearray(path.read_bytes())
    raw = mutate(raw)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    return bad


def _tensor_info_offset(raw: bytes, name: bytes) -> int:
    """Offset of the ggml type field of tensor `name` in the header."""
    i = raw.index(struct.pack("<Q", len(name)) + name)
    n_dims = struct.unpack_from("<I", raw, i + 8 + len(name))[0]
    return i + 8 + len(name) + 4 + 8 * n_dims


@pytest.mark.parametrize("mutate, message", [
    (lambda r: b"GGML" + r[4:], "wrong magic"),
    (lambda r: b"ggla" + r[4:], "old GGML/GGLA"),
    (lambda r: r[:10], "truncated GGUF header"),
    (lambda r: r[:300], "truncated"),
    (lambda r: r[:-200], "runs past the end"),
    (lambda r: r[:4] + struct.pack("<I", 9) + r[8:], "unsupported GGUF version 9"),
    (lambda r: r[:8] + struct.pack("<Q", 2**40) + r[16:], "cannot fit"),
    (lambda r: r[:16] + struct.pack("<Q", 2**61) + r[24:], "cannot fit"),
])
def test_malformed_files_give_one_clear_line(tmp_path, mutate, message):
    bad = _corrupt(tmp_path, mutate)
    with pytest.raises(ToolkitError) as e:
        open_gguf(bad)
    text = str(e.value)
    assert message in text and str(bad) in text and "\n" not in text


def test_unknown_tensor_type(tmp_path):
    def mutate(r):
        off = _tensor_info_offset(bytes(r), b"w")
        r[off:off + 4] = struct.pack("<I", 77)
        return r

    bad = _corrupt(tmp_path, mutate)
    with pytest.raises(ToolkitError, match="tensor 'w' has unknown type 77"):
        open_gguf(bad)


def test_missing_and_empty(tmp_path):
    with pytest.raises(ToolkitError, match="no such file"):
        open_gguf(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ToolkitError, match="wrong magic"):
        open_gguf(tmp_path / "empty.gguf")


def test_real_model_opens_fast_and_matches_gguf_py(smollm2_path):
    import time

    t0 = time.perf_counter()
    ours = open_gguf(smollm2_path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"opening the 135M GGUF took {elapsed:.2f}s"
    ref = GGUFReader(smollm2_path)
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    assert ours.metadata["tokenizer.ggml.merges"] == ref.fields["tokenizer.ggml.merges"].contents()
    t = next(t for t in ref.tensors if t.name == "blk.0.attn_q.weight")
    assert np.array_equal(ours.tensors[t.name].raw().numpy().reshape(-1), t.data.reshape(-1))


def test_cli_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a model at all, just text")
    code = ("import sys; from toolkit.cli import run_command; "
            "sys.exit(run_command('toolkit.gguf_io_cli_probe', sys.argv[1:]))")
    probe = tmp_path / "toolkit_probe"
    probe.mkdir()
    (probe / "toolkit_gguf_probe.py").write_text(
        "from toolkit.gguf_io import open_gguf\n\ndef main(argv):\n    open_gguf(argv[0])\n    return 0\n")
    code = code.replace("toolkit.gguf_io_cli_probe", "toolkit_gguf_probe")
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(probe), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"toolkit: error: {bad}: not a GGUF file: wrong magic b'not '"
    assert "Traceback" not in proc.stderr
