"""toolkit.ggml_codec: libggml's C codec behind toolkit.quants on the CPU, and the setting that picks it.

The torch codec is checked bit for bit against libggml in test_quants.py; here both codecs go through the same
public functions (quantize / dequantize) and must agree byte for byte, with the row ranges cut small so that
every call runs in several threads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from blocks import distributions, random_blocks, same_bits
from gguf import GGMLQuantizationType as Q

from toolkit import ggml_codec
from toolkit.errors import ToolkitError
from toolkit.quants import DEQUANT_TYPES, QUANT_TYPES, dequantize, quantize

needs_ggml = pytest.mark.skipif(not ggml_codec.available(), reason="llama-cpp-python's libggml not available")
BLOCK_TYPES = [q for q in DEQUANT_TYPES if q not in (Q.F32, Q.F16, Q.BF16)]
# the torch quantizers' min/max skip NaN where C's comparisons keep it (test_quants.py): NaN inputs differ there
NAN_DIFFERS = (Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q4_K, Q.Q5_K)


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of 512 values and 3 threads: even a test-sized tensor is cut into uneven row ranges."""
    monkeypatch.setattr(ggml_codec, "MIN_PART", 512)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)


def with_codec(name: str, fn):
    prev = ggml_codec.set_codec(name)
    try:
        return fn()
    finally:
        ggml_codec.set_codec(prev)


@needs_ggml
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_dequantize_same_bits_both_codecs(qtype, small_parts):
    """Random blocks (NaN / inf / subnormal scales included), 7 rows in 3 threads."""
    raw = torch.from_numpy(random_blocks(qtype, 7, 1024, seed=int(qtype)))
    ours = with_codec("torch", lambda: dequantize(raw, qtype, (7, 1024)))
    theirs = with_codec("ggml", lambda: dequantize(raw, qtype, (7, 1024)))
    assert same_bits(ours.numpy(), theirs.numpy())


@needs_ggml
@pytest.mark.parametrize("qtype", [q for q in QUANT_TYPES if q not in (Q.F32, Q.F16, Q.BF16)], ids=lambda q: q.name)
def test_quantize_same_bytes_both_codecs(qtype, small_parts):
    """Every input distribution of test_quants (huge, subnormal, signed zeros, ties, ...), 5 rows in 3 threads;
    a float64 input is converted like the torch path converts it."""
    for name, x in distributions(5, 1024, seed=3).items():
        t = torch.from_numpy(x)
        ours = with_codec("torch", lambda: quantize(t, qtype))
        theirs = with_codec("ggml", lambda: quantize(t, qtype))
        assert ours.shape == theirs.shape and torch.equal(ours, theirs), f"{qtype.name} {name}"
    x64 = torch.from_numpy(distributions(3, 512, seed=4)["normal"]).double()
    assert torch.equal(with_codec("torch", lambda: quantize(x64, qtype)), with_codec("ggml", lambda: quantize(x64, qtype)))


@needs_ggml
@pytest.mark.parametrize("qtype", NAN_DIFFERS, ids=lambda q: q.name)
def test_ggml_codec_is_llama_cpp_on_nan(qtype):
    """Where the torch quantizers still differ from C (NaN inputs), the default codec gives llama.cpp's bytes."""
    import oracle_ggml

    x = np.random.default_rng(2).standard_normal((4, 512)).astype(np.float32)
    x[1, 3] = np.nan
    assert quantize(torch.from_numpy(x), qtype).numpy().tobytes() == oracle_ggml.ggml_quantize(x, qtype)


@needs_ggml
def test_auto_uses_libggml_on_cpu_only_for_block_types(monkeypatch):
    calls = []
    real = ggml_codec.dequantize
    monkeypatch.setattr(ggml_codec, "dequantize",
                        lambda b, q, out=None, spread=True: calls.append(q) or real(b, q, out, spread))
    raw = torch.from_numpy(random_blocks(Q.Q4_K, 2, 256))
    with_codec("auto", lambda: dequantize(raw, Q.Q4_K, (2, 256)))
    assert calls == [Q.Q4_K]
    with_codec("torch", lambda: dequantize(raw, Q.Q4_K, (2, 256)))
    f16 = torch.from_numpy(random_blocks(Q.F16, 2, 256))
    with_codec("auto", lambda: dequantize(f16, Q.F16, (2, 256)))
    assert calls == [Q.Q4_K]
    assert not ggml_codec.handles(Q.Q4_K, "dequantize", torch.device("meta"))


def test_setting_errors(monkeypatch, request):
    with pytest.raises(ToolkitError, match="TOOLKIT_CODEC='fast'"):
        ggml_codec.set_codec("fast")

    calls = []

    def missing():
        calls.append(1)
        raise OSError("llama-cpp-python is not installed (pip install llama-cpp-python)")

    monkeypatch.setattr(ggml_codec, "_lib_dir", missing)
    ggml_codec._load.cache_clear()
    request.addfinalizer(ggml_codec._load.cache_clear)  # the real library again for the tests after this one
    prev = ggml_codec.codec()
    with pytest.raises(ToolkitError, match="codec ggml: llama-cpp-python is not installed"):
        ggml_codec.set_codec("ggml")
    assert ggml_codec.codec() == prev  # unchanged after the refusal
    # auto without the library: the torch codec, same values
    raw = torch.from_numpy(random_blocks(Q.Q8_0, 2, 64, seed=1))
    got = with_codec("auto", lambda: dequantize(raw, Q.Q8_0, (2, 64)))
    d = raw.view(torch.uint8).reshape(4, 34)
    scale = d[:, :2].contiguous().view(torch.float16).float()
    ref = (d[:, 2:].contiguous().view(torch.int8).float() * scale).reshape(2, 64)
    assert same_bits(ref.numpy(), got.numpy())
    with_codec("auto", lambda: [dequantize(raw, Q.Q8_0, (2, 64)) for _ in range(3)])
    assert len(calls) == 1  # looked for once per process, not on every call


def test_env_setting_in_a_fresh_process(tmp_path, tiny_llama):
    """TOOLKIT_CODEC is read at import; a bad value is one clear line from the CLI, not a traceback."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TOOLKIT_CODEC="torch")
    out = subprocess.run([sys.executable, "-c", "from toolkit import ggml_codec; print(ggml_codec.codec())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["TOOLKIT_CODEC"] = "fast"
    bad = subprocess.run([sys.executable, "-m", "toolkit.cli", "quantize", str(tiny_llama), str(tmp_path / "q.gguf"),
                          "Q8_0", "--no-progress"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1, bad.stderr
    assert bad.stderr.strip().splitlines() == ["toolkit: error: TOOLKIT_CODEC='fast': expected one of auto, torch, ggml"]
    assert not (tmp_path / "q.gguf").exists()


def test_dequantizer_says_which_codec_runs():
    """finetune's start line names the codec (quants.dequantizer): for the torch codec's types libggml only on the
    CPU, with the library, under auto/ggml."""
    from toolkit.quants import dequantizer

    cpu = torch.device("cpu")
    assert with_codec("torch", lambda: dequantizer(Q.Q8_0, cpu)) == "torch"
    assert dequantizer(Q.Q8_0, torch.device("meta")) == "torch"
    assert with_codec("auto", lambda: dequantizer(Q.Q8_0, cpu)) == ("libggml" if ggml_codec.available() else "torch")
