"""toolkit.qlinear: the packed layers against dense float layers on the same dequantized weights."""
from __future__ import annotations

import pytest
import torch
from blocks import finite_blocks
from gguf import GGMLQuantizationType as Q

from toolkit.qlinear import QuantEmbedding, QuantLinear
from toolkit.quants import dequantize

CUDA = torch.cuda.is_available()

LAYER_TYPES = [Q.Q4_0, Q.Q5_1, Q.Q8_0, Q.Q3_K, Q.Q4_K, Q.Q6_K, Q.IQ4_XS, Q.F16, Q.F32]


@pytest.mark.parametrize("chunk", [None, 1000])
@pytest.mark.parametrize("qtype", LAYER_TYPES, ids=lambda q: q.name)
def test_quant_linear_matches_dense(qtype, chunk, monkeypatch):
    """forward and grad-x equal a dense nn.Linear on the dequantized weight (fp32: rtol 1e-5 plus 1e-6 of
    the largest output; only the matmul's summation order may differ)."""
    import toolkit.qlinear as tq

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


@pytest.mark.parametrize("codec", ["auto", "torch"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q6_K, Q.IQ4_XS], ids=lambda q: q.name)
def test_sliced_matmul_matches_dense(qtype, codec, monkeypatch):
    """matmul_sliced (a few rows; blocks dequantized a slice at a time into one buffer, libggml's to_float or the
    torch codec) equals a dense nn.Linear on the dequantized weight within fp32 summation order, over several
    slices and a short last one."""
    import toolkit.qlinear as tq
    from toolkit import ggml_codec

    out_f, in_f = 70, 512
    monkeypatch.setattr(tq, "SLICE_ELEMENTS", 16 * in_f)  # 5 slices: 16 rows each, 6 in the last
    prev = ggml_codec.set_codec(codec)
    try:
        layer = QuantLinear(torch.from_numpy(finite_blocks(qtype, out_f, in_f, seed=4)), qtype, in_f, out_f)
        x = torch.randn(5, in_f)
        y, want = layer.matmul_sliced(x), x @ layer.weight_float().t()
    finally:
        ggml_codec.set_codec(prev)
    assert y.shape == (5, out_f)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6 * max(1.0, float(want.abs().max())))


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


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q6_K"])
def test_cached_weights_mode_matches_packed_mode(qtype):
    # inference keeps a dequantized copy (cache_weights); it must compute what the packed path computes
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.randn(96, 256), qtype)
    x = torch.randn(3, 5, 256)
    packed = layer(x)
    layer.cache_weights = True
    cached = layer(x)
    assert torch.allclose(cached, packed, rtol=1e-5, atol=1e-6 * packed.abs().max().item())
    assert torch.equal(layer.cached_weight(torch.float32), dequantize(layer.qweight, qtype, (96, 256)))
    assert set(layer.state_dict()) == {"qweight"}  # the copy is never saved
    layer.to(torch.device("cpu"))
    assert "_wcache" not in layer.__dict__  # moving rebuilds it lazily
