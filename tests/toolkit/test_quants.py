"""toolkit.quants: bit-exact against gguf-py (numpy) and llama.cpp's libggml; the quantized layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import gguf
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from toolkit.quants import DEQUANT_TYPES, QuantEmbedding, QuantLinear, dequantize

CUDA = torch.cuda.is_available()


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random packed blocks [rows, row_bytes] (every bit pattern, NaN/inf scales included)."""
    rng = np.random.default_rng(seed)
    bv, bb = GGML_QUANT_SIZES[qtype]
    if qtype == Q.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    return rng.integers(0, 256, size=(rows, cols // bv * bb), dtype=np.uint8)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equal floats, except that any NaN equals any NaN."""
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


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


# byte offsets of the fp16 scales (d, dmin) inside each block
SCALE_OFFSETS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
    Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
}


def finite_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random blocks whose fp16 scales are small finite numbers (a plausible weight)."""
    raw = random_blocks(qtype, rows, cols, seed)
    if qtype in (Q.F32, Q.F16):
        return raw
    bv, bb = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, bb)
    rng = np.random.default_rng(seed + 1)
    for off in SCALE_OFFSETS[qtype]:
        d = (rng.random(len(blocks)) * 1e-2).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw


LAYER_TYPES = [Q.Q4_0, Q.Q5_1, Q.Q8_0, Q.Q3_K, Q.Q4_K, Q.Q6_K, Q.IQ4_XS, Q.F16, Q.F32]


@pytest.mark.parametrize("chunk", [None, 1000])
@pytest.mark.parametrize("qtype", LAYER_TYPES, ids=lambda q: q.name)
def test_quant_linear_matches_dense(qtype, chunk, monkeypatch):
    """forward and grad-x equal a dense nn.Linear on the dequantized weight (fp32: rtol 1e-5 plus 1e-6 of
    the largest output; only the matmul's summation order may differ)."""
    import toolkit.quants as tq

    if chunk:
        monkeypatch.setattr(tq, "CHUNK_ELEMENTS", chunk)  # forces several row chunks
    out_f, in_f = 40, 512
    raw = torch.from_numpy(finite_blocks(qtype, out_f, in_f, seed=3))
    layer = QuantLinear(raw, qtype, in_f, out_f)
    assert layer.qtype == qtype and (layer.in_features, layer.out_features) == (in_f, out_f)
    assert layer.qweight.dtype == torch.uint8 and dict(layer.named_buffers())["qweight"] is layer.qweight
    assert list(layer.parameters()) == []
    w = layer.weight_float()
    assert w.shape == (out_f, in_f) and torch.isfinite(w).all()
    dense = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        dense.weight.copy_(w)
    x = torch.randn(3, 5, in_f, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = layer(x), dense(x2)
    tol = 1e-6 * max(1.0, float(y2.detach().abs().max()))  # fp32, only the summation order may differ
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=tol)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6 * max(1.0, float(x2.grad.abs().max())))
    with torch.no_grad():  # inference path, and bf16 activations
        torch.testing.assert_close(layer(x.detach()), y2.detach(), rtol=1e-5, atol=tol)
        yb = layer(x.detach().bfloat16())
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.float(), y2.detach(), rtol=0, atol=2e-2 * float(y2.abs().max()))  # bf16


def test_quant_linear_from_float_and_state_dict():
    w = torch.randn(64, 256) * 0.1
    layer = QuantLinear.from_float(w, "Q8_0")
    assert layer.qtype == Q.Q8_0
    assert (layer.weight_float() - w).abs().max() < 0.1 * 0.02 * 5
    sd = layer.state_dict()
    assert set(sd) == {"qweight"}
    again = QuantLinear(sd["qweight"], Q.Q8_0, 256, 64)
    assert torch.equal(again.weight_float(), layer.weight_float())
    assert layer.weight_float(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.Q6_K, Q.F32], ids=lambda q: q.name)
def test_quant_embedding_gathers_rows(qtype):
    n, dim = 50, 256
    raw = torch.from_numpy(finite_blocks(qtype, n, dim, seed=5))
    emb = QuantEmbedding(raw, qtype, n, dim)
    full = emb.weight_float()
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    out = emb(ids)
    assert out.shape == (2, 3, dim)
    assert torch.equal(out, full[ids])
    assert torch.equal(full, dequantize(raw, qtype, (n, dim)))


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda q: q.name)
def test_dequantize_cuda_matches_cpu(qtype):
    raw = torch.from_numpy(random_blocks(qtype, 16, 512))
    cpu = dequantize(raw, qtype, (16, 512)).numpy()
    gpu = dequantize(raw.cuda(), qtype, (16, 512)).cpu().numpy()
    assert same_bits(cpu, gpu)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_quant_linear_cuda():
    raw = torch.from_numpy(finite_blocks(Q.Q4_K, 64, 512))
    layer = QuantLinear(raw, Q.Q4_K, 512, 64).cuda()
    x = torch.randn(4, 512, device="cuda", requires_grad=True)
    y = layer(x)
    ref = x.detach() @ layer.weight_float().t()
    torch.testing.assert_close(y.detach(), ref, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.weight_float().sum(0).expand(4, -1), rtol=1e-4, atol=1e-4)
