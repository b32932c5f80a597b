"""The CPU decode kernels (toolkit.qkernels): the int4 repacking is lossless against libggml's own dequantizer,
and QuantLinear's kernel path stays within bf16 rounding of the exact float path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle_ggml
from toolkit import qkernels
from toolkit.qlinear import QuantLinear
from toolkit.quants import quantize

needs_ggml = pytest.mark.skipif(not oracle_ggml.available(), reason="libggml (llama-cpp-python) not installed")


def weights(rows: int, cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(rows, cols, generator=g)
    w[0] = 0.0  # an all-zero row (scale 0)
    w[1, :32] = 1e-30  # subnormal-ish block
    w[2] *= 1e4  # a large row
    w[3] = w[3].abs()  # all positive: Q4_1/Q4_K mins are used
    return w


@needs_ggml
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_groups_are_ggml_values(qtype):
    w = weights(16, 512)
    raw = quantize(w, qtype)
    levels, scale, zero = qkernels.int4_groups(raw, qkernels.Q[qtype], 512)
    assert levels.min() >= 0 and levels.max() <= 15
    got = (levels.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    ref = oracle_ggml.ggml_dequantize(raw.numpy(), qtype, w.numel()).reshape(w.shape)
    # Q4_0/Q4_1: exact; Q4_K: (q - 8) * d*sc + (8 * d*sc - dmin*m) vs d*sc*q - dmin*m, one f32 rounding apart
    tol = 0.0 if qtype != "Q4_K" else 4 * np.finfo(np.float32).eps * np.abs(ref).max()
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("qtype,kind", [("Q4_0", "int4"), ("Q4_1", "int4"), ("Q4_K", "int4"), ("Q8_0", "bf16"),
                                        ("Q6_K", "bf16"), ("Q5_1", "bf16")])
def test_kernel_path_is_float_path_within_bf16_rounding(qtype, kind):
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.randn(96, 512), qtype)
    x = torch.randn(2, 1, 512)  # 2 rows: a bf16 form multiplies them through its copy on any CPU
    exact = layer(x)
    layer.use_kernels = True
    assert layer.kernel_weight().kind == kind
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    # bf16 activations (8-bit mantissa) and bf16 scales: ~2^-9 relative per term, averaging out over 512 terms
    err = ((got - exact).abs().max() / exact.abs().max()).item()
    assert 0 < err < 1e-2, err


def test_kernel_path_only_for_few_rows_and_never_under_autograd():
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.randn(64, 256), "Q4_0")
    big = torch.randn(qkernels.max_rows() + 1, 256)
    exact = layer(big)
    layer.use_kernels = True
    assert torch.equal(layer(big), exact)  # prefill-sized input: the exact block path
    x = torch.randn(1, 256, requires_grad=True)
    layer.use_kernels = False
    ref = layer(x)
    layer.use_kernels = True
    assert torch.equal(layer(x), ref)  # training: exact, and gradients flow
    layer(x).sum().backward()
    assert x.grad is not None
    layer.to("cpu")
    assert "_kcache" not in layer.__dict__ and set(layer.state_dict()) == {"qweight"}


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_bf16_rows_use_a_bf16_copy_from_that_many_rows(qtype):
    """The "bf16" weights mode: few rows keep the int4 / bf16 kernel form, bf16_rows() or more (prefill included)
    go through a bf16 copy of the dequantized weight: within bf16 rounding of the exact float path (weights and
    activations rounded to 8 significant bits, ~2^-9 relative per term, averaging out over 512 terms)."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.randn(96, 512), qtype)
    few, many = torch.randn(2, 512), torch.randn(1, qkernels.bf16_rows(), 512)
    exact_many = layer(many)
    layer.use_kernels, layer.use_bf16_copy = True, True
    assert layer.kernel_form(few) == "kernel" and layer.kernel_form(many) == "bf16"
    assert layer.kernel_form(torch.randn(1000, 512)) == "bf16"  # past MAX_ROWS too: no block path
    got = layer(many)
    copy = layer.bf16_weight()
    assert copy.kind == "bf16" and copy.weight.dtype == torch.bfloat16
    assert torch.equal(qkernels.dense(copy), layer.weight_float().to(torch.bfloat16))  # the dequantized values
    err = ((got - exact_many).abs().max() / exact_many.abs().max()).item()
    assert 0 < err < 1e-2, err
    assert torch.equal(layer(few), qkernels.matmul(few, layer.kernel_weight()))  # few rows: the kernel form
    assert ("_bcache" in layer.__dict__) == (qtype == "Q4_1")  # Q8_0's kernel form is already that copy
    layer.to("cpu")
    assert "_bcache" not in layer.__dict__ and set(layer.state_dict()) == {"qweight"}
    layer.use_bf16_copy = False
    assert layer.kernel_form(many) == "kernel"  # off: the packed mode's forms again
    assert layer.kernel_form(torch.randn(1000, 512)) is None  # prefill-sized: the exact block path


def test_without_bf16_dot_products_many_rows_leave_the_copy_for_the_blocks(monkeypatch):
    """Where the CPU has no bf16 dot products (AVX2) torch's bf16 GEMM is emulated: a bf16 kernel form (Q8_0's)
    multiplies up to EMULATED_BF16_MAX_ROWS rows through its copy and more rows from its blocks in float32, bit-equal
    to the exact block path. Compiled, both row counts run one graph (an opaque op decides). The "bf16" weights
    mode's copy stays a copy whatever the rows; with bf16 dot products no form has blocks."""
    torch.manual_seed(0)
    monkeypatch.setattr(qkernels, "_NATIVE_BF16", False)
    layer = QuantLinear.from_float(torch.randn(96, 512), "Q8_0")
    n = qkernels.EMULATED_BF16_MAX_ROWS
    few, many, more = torch.randn(n, 512), torch.randn(n + 1, 512), torch.randn(3 * n, 512)
    exact_few, exact_many, exact_more = layer(few), layer(many), layer(more)
    layer.use_kernels = True
    pw = layer.kernel_weight()
    assert pw.blocks is not None and pw.number and layer.kernel_form(many) == "kernel"
    assert torch.equal(layer(many), exact_many)
    err = ((layer(few) - exact_few).abs().max() / exact_few.abs().max()).item()
    assert 0 < err < 1e-2, err  # the bf16 copy: weights and activations rounded to 8 significant bits

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda x: qkernels.matmul(x, pw), dynamic=True, backend=backend)
    assert torch.equal(f(many), exact_many) and torch.equal(f(few), layer(few))
    assert torch.equal(f(more), exact_more)
    assert len(graphs) == 1
    assert any(node.target is torch.ops.toolkit.copy_or_blocks for node in graphs[0].graph.nodes)

    layer.use_bf16_copy = True
    copy = layer.bf16_weight()
    assert copy.blocks is None and copy.weight is pw.weight
    monkeypatch.setattr(qkernels, "_NATIVE_BF16", True)
    assert QuantLinear.from_float(torch.randn(8, 64), "Q8_0").kernel_weight().blocks is None


def _prepack_works() -> bool:
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(32, 64).bfloat16(), 16)
        torch.ops.mkldnn._linear_pointwise(torch.randn(2, 64).bfloat16(), w, None, "none", [], "")
        return True
    except (RuntimeError, AttributeError):
        return False


@pytest.mark.skipif(not _prepack_works(), reason="this torch's oneDNN has no bf16 linear")
@pytest.mark.parametrize("rows", [1, 8, 16, 40])
def test_a_prepacked_bf16_copy_multiplies_as_the_plain_copy(monkeypatch, rows):
    """On a CPU with bf16 dot products the bf16 copies are kept in oneDNN's blocked layout: the same values (unpacked
    bit-equal), and products within bf16 output rounding of the plain copy's (both sum float32 products of the same
    bf16 operands; only the order differs). set_prepacking(False) gives plain copies again."""
    torch.manual_seed(0)
    w = torch.randn(96, 512).bfloat16()
    monkeypatch.setitem(qkernels._prepack, "on", True)
    packed = qkernels.bf16_form(w)
    assert packed.weight.is_mkldnn and torch.equal(qkernels.dense(packed), w)
    assert qkernels.bf16_rows() == qkernels.PREPACKED_BF16_ROWS
    x = torch.randn(rows, 512)
    got, want = qkernels.matmul(x, packed), qkernels.matmul(x, qkernels.PackedWeight("bf16", w, None, 96))
    assert got.shape == want.shape == (rows, 96)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 2 ** -7, err  # one bf16 rounding of the output at most, seen ~2^-9
    qkernels.set_prepacking(False)
    plain = qkernels.bf16_form(w)
    assert not plain.weight.is_mkldnn and qkernels.bf16_rows() == qkernels.BF16_ROWS
