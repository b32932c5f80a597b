"""toolkit.quants: bit-exact against gguf-py (numpy) and llama.cpp's libggml."""
from __future__ import annotations

import gguf
import numpy as np
import oracle_ggml
import pytest
import torch
from blocks import distributions, random_blocks, same_bits
from gguf import GGMLQuantizationType as Q

from toolkit import ggml_codec
from toolkit.errors import ToolkitError
from toolkit.quants import DEQUANT_TYPES, QUANT_TYPES, dequantize, quantize

CUDA = torch.cuda.is_available()
needs_ggml = [pytest.mark.llamacpp,
              pytest.mark.skipif(not oracle_ggml.available(), reason="llama-cpp-python's libggml not available")]
GGUF_PY_QUANTIZES = [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]


@pytest.fixture(autouse=True)
def _torch_codec():
    """These tests check the torch codec: libggml is their oracle, so it must not also be the code under test."""
    prev = ggml_codec.set_codec("torch")
    yield
    ggml_codec.set_codec(prev)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
@needs_ggml[0]
@needs_ggml[1]
def test_quantize_matches_libggml(qtype):
    """Every byte equals ggml_quantize_chunk's (no imatrix), on every input distribution; and our
    dequantize of those bytes equals ggml's to_float, bit for bit."""
    rows, n = 6, 1024
    for name, x in distributions(rows, n, seed=int(qtype)).items():
        ref = np.frombuffer(oracle_ggml.ggml_quantize(x, qtype), np.uint8).reshape(rows, -1)
        ours = quantize(torch.from_numpy(x), qtype)
        assert ours.dtype == torch.uint8 and tuple(ours.shape) == ref.shape
        bad = np.nonzero((ours.numpy() != ref).any(1))[0]
        assert bad.size == 0, f"{qtype.name} {name}: rows {bad.tolist()} differ from libggml"
        ref_f = oracle_ggml.ggml_dequantize(ref, qtype, rows * n).reshape(rows, n)
        assert same_bits(ref_f, dequantize(ours, qtype, (rows, n)).numpy()), f"{qtype.name} {name}: to_float"


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q3_K], ids=lambda q: q.name)
@needs_ggml[0]
@needs_ggml[1]
def test_quantize_many_blocks_matches_libggml(qtype):
    """More blocks of plain normal data (the common case), across several row chunks; Q6_K's tries also in
    groups that do not divide its 16 elements."""
    import toolkit.quants as tq

    x = np.random.default_rng(7).standard_normal((96, 2048)).astype(np.float32)
    old = tq.QUANT_CHUNK, tq._QX_GROUP
    tq.QUANT_CHUNK, tq._QX_GROUP = 2048 * 40, 3  # three uneven chunks; groups of 3, 3, 3, 3, 3, 1
    try:
        ours = quantize(torch.from_numpy(x), qtype).numpy().tobytes()
    finally:
        tq.QUANT_CHUNK, tq._QX_GROUP = old
    assert ours == oracle_ggml.ggml_quantize(x, qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q3_K, Q.Q6_K], ids=lambda q: q.name)
@needs_ggml[0]
@needs_ggml[1]
def test_quantize_non_finite_matches_libggml(qtype):
    """inf / NaN inputs take the quantizers' slow (non-finite) paths. (Q4_1, Q5_1, Q2_K, Q4_K and Q5_K still
    differ from libggml on NaN inputs: their min/max ignore NaN in C.)"""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    m = rng.random(x.shape) < 0.01
    x[m] = rng.choice(np.array([np.inf, -np.inf, np.nan], np.float32), int(m.sum()))
    x[3] = np.nan
    x[5, :300] = np.inf
    assert quantize(torch.from_numpy(x), qtype).numpy().tobytes() == oracle_ggml.ggml_quantize(x, qtype)


@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda q: q.name)
@needs_ggml[0]
@needs_ggml[1]
def test_dequantize_matches_libggml(qtype):
    """Random bytes (any scale bit pattern, NaN and inf included) through ggml's to_float and ours."""
    raw = random_blocks(qtype, 8, 1024, seed=11)
    ref = oracle_ggml.ggml_dequantize(raw, qtype, 8 * 1024).reshape(8, 1024)
    assert same_bits(ref, dequantize(torch.from_numpy(raw), qtype, (8, 1024)).numpy())


@pytest.mark.parametrize("qtype", [q for q in DEQUANT_TYPES if q not in (Q.F32, Q.F16, Q.BF16)],
                         ids=lambda q: q.name)
@needs_ggml[0]
@needs_ggml[1]
def test_dequantize_in_pieces_matches_libggml(qtype, monkeypatch):
    """A tensor larger than one piece of the CPU path (pieces made small here): each piece writes its rows of
    the result, the K-quants with scales made once for all blocks."""
    import toolkit.quants as quants

    monkeypatch.setattr(quants, "DEQUANT_CHUNK", 1 << 12)
    raw = random_blocks(qtype, 8, 3 * 1024, seed=5)  # 6 pieces
    ref = oracle_ggml.ggml_dequantize(raw, qtype, 8 * 3 * 1024).reshape(8, 3 * 1024)
    assert same_bits(ref, dequantize(torch.from_numpy(raw), qtype, (8, 3 * 1024)).numpy())


@pytest.mark.parametrize("qtype", GGUF_PY_QUANTIZES, ids=lambda q: q.name)
def test_quantize_matches_gguf_py(qtype):
    """gguf-py's numpy quantizers agree with llama.cpp except on blocks whose extreme is a -0.0 (numpy picks
    the zero's sign differently; libggml, checked above, is the authority), so -0.0 becomes +0.0 here."""
    rows, n = 4, 512
    for name, x in distributions(rows, n, seed=3).items():
        x = x + np.float32(0.0)  # -0.0 -> +0.0
        with np.errstate(all="ignore"):
            ref = gguf.quants.quantize(x, qtype)
        ours = quantize(torch.from_numpy(x), qtype).numpy()
        assert ours.tobytes() == ref.tobytes(), f"{qtype.name} {name}"


def test_quantize_api():
    x = torch.randn(3, 512)
    a = quantize(x, "q4_k")
    assert a.shape == (3, 2 * 144) and a.dtype == torch.uint8
    assert torch.equal(quantize(x[1], Q.Q4_K), a[1:2])  # 1-D = one row
    assert torch.equal(quantize(x.double(), Q.Q4_K), a)  # any float dtype is read as float32
    xt = torch.randn(512, 3).t()  # non-contiguous
    assert torch.equal(quantize(xt, Q.Q8_0), quantize(xt.contiguous(), Q.Q8_0))
    assert quantize(torch.empty(0, 256), Q.Q6_K).shape == (0, 210)
    with pytest.raises(ToolkitError, match="multiple"):
        quantize(torch.randn(2, 100), Q.Q4_K)
    with pytest.raises(ToolkitError, match="IQ2_XXS"):  # libggml's alone, and only with an importance matrix
        quantize(x, Q.IQ2_XXS)
    with pytest.raises(ToolkitError, match="unknown"):
        quantize(x, "Q9_K")
    with pytest.raises(ToolkitError):
        dequantize(a, Q.Q4_K, (3, 500))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_roundtrip_error_is_small(qtype):
    """Sanity on the numbers, not only the bytes: relative RMS error of quantize -> dequantize."""
    x = torch.randn(16, 1024)
    y = dequantize(quantize(x, qtype), qtype, x.shape)
    rel = float((y - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt())
    limit = {"Q2_K": 0.45, "Q3_K": 0.25, "Q4_0": 0.15, "Q4_1": 0.15, "Q4_K": 0.1, "Q5_0": 0.07,
             "Q5_1": 0.07, "Q5_K": 0.05, "Q6_K": 0.03, "Q8_0": 0.01, "F16": 1e-3, "BF16": 1e-2, "F32": 0}
    assert rel <= limit[qtype.name], rel


@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf_py(qtype):
    raw = random_blocks(qtype, 16, 512)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(torch.from_numpy(raw), qtype, (16, 512))
    assert ours.dtype == torch.float32 and ours.shape == (16, 512)
    assert same_bits(ref, ours.numpy())
    flat = dequantize(torch.from_numpy(raw.reshape(-1)), qtype.name, 16 * 512)  # flat bytes, name as qtype
    assert same_bits(ref.reshape(-1), flat.numpy())


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda q: q.name)
def test_dequantize_cuda_matches_cpu(qtype):
    raw = torch.from_numpy(random_blocks(qtype, 16, 512))
    cpu = dequantize(raw, qtype, (16, 512)).numpy()
    gpu = dequantize(raw.cuda(), qtype, (16, 512)).cpu().numpy()
    assert same_bits(cpu, gpu)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_quantize_cuda_matches_cpu(qtype):
    for name, x in distributions(4, 1024, seed=5).items():
        cpu = quantize(torch.from_numpy(x), qtype)
        gpu = quantize(torch.from_numpy(x).cuda(), qtype)
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu), f"{qtype.name} {name}"


def test_tensor_float_and_encode_round_trip_through_a_file(tmp_path):
    """encode -> write_gguf -> open_gguf -> tensor_float gives gguf-py's dequantized values bit for bit, for float
    and quantized types; float types come back as zero-copy views of the file unless copy=True."""
    from toolkit.gguf_io import TensorSpec, open_gguf, write_gguf
    from toolkit.quants import encode, tensor_float

    x = torch.from_numpy(distributions(4, 256, seed=7)["normal"])
    types = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_K]
    specs = [TensorSpec(f"t.{q.name}", q, (4, 256), encode(x, q)) for q in types]
    write_gguf(tmp_path / "t.gguf", {"general.architecture": "llama"}, specs)
    g = open_gguf(tmp_path / "t.gguf")
    for q in types:
        t = g.tensors[f"t.{q.name}"]
        assert t.qtype == q
        with np.errstate(all="ignore"):
            ref = gguf.quants.dequantize(t.raw().numpy(), q).reshape(4, 256)
        ours = tensor_float(t)
        assert ours.dtype == torch.float32 and ours.shape == (4, 256) and same_bits(ref, ours.numpy())
        native = tensor_float(t, None)
        if q in (Q.F32, Q.F16, Q.BF16):
            assert native.data_ptr() == t.raw().data_ptr()  # a view of the mapping
            assert tensor_float(t, None, copy=True).data_ptr() != native.data_ptr()
    with pytest.raises(ToolkitError, match="BF16 data must be"):
        write_gguf(tmp_path / "bad.gguf", {"general.architecture": "llama"}, [TensorSpec("b", Q.BF16, (4, 256), x)])
