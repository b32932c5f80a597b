"""libggml's mul_mat over our packed weights (toolkit.ggml_matmul, the "ggml" weights mode): the product is
llama.cpp's, i.e. the exact product of the dequantized weight with activations rounded to 8 bits per block of 32
(Q8_0, by libggml's reference quantizer), and it runs for any row count, eager or compiled, without copying the
weight."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle_ggml
from toolkit import ggml_matmul, qkernels
from toolkit.errors import ToolkitError
from toolkit.qlinear import QuantLinear

pytestmark = pytest.mark.skipif(not ggml_matmul.available(), reason="libggml (llama-cpp-python) not installed")


def layer(qtype: str, out_f: int = 96, in_f: int = 512) -> QuantLinear:
    g = torch.Generator().manual_seed(3)
    lin = QuantLinear.from_float(torch.randn(out_f, in_f, generator=g), qtype)
    lin.use_kernels = lin.use_ggml = True
    return lin


def q8_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded as libggml rounds activations for a Q8_0 / Q8_1 dot product (its reference Q8_0 quantizer)."""
    raw = oracle_ggml.ggml_quantize(x.numpy(), "Q8_0")
    return torch.from_numpy(oracle_ggml.ggml_dequantize(np.frombuffer(raw, np.uint8), "Q8_0", x.numel())
                            ).reshape(x.shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"])
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_product_is_the_dequantized_weight_times_8_bit_activations(qtype, rows):
    """Types whose dot products take Q8_0 activations (Q4_0, Q5_0, Q8_0) agree with the model of llama.cpp's
    arithmetic to float32 summation order over 512 terms (measured 2-5e-7). Those taking Q8_1 (Q4_1, Q5_1) also
    use each activation block's sum rounded to fp16 (2^-11 of it, times the weight block's min): measured
    2.5-7e-4. Against the float product the 8-bit activations cost ~6e-3 (asserted 1e-3 to 2e-2: not exact)."""
    lin = layer(qtype)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    w = lin.weight_float()
    got = lin(x)
    assert lin.kernel_form(x) == "kernel" and lin.kernel_weight().kind == "ggml"
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    model = q8_rows(x) @ w.t()
    assert rel(got, model) < (1.5e-3 if qtype in ("Q4_1", "Q5_1") else 2e-6)
    assert 1e-3 < rel(got, x @ w.t()) < 2e-2


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "IQ4_XS", "Q3_K"])
def test_k_and_i_quants_multiply_within_8_bit_activations(qtype):
    """Their dot products take Q8_K activations (8 bits per block of 256): ~2^-8 of each block's largest value,
    averaging out over 512 terms; asserted < 2e-2 of the float product, as for the Q8_0 types above."""
    lin = layer(qtype, 64, 512)
    x = torch.randn(7, 512, generator=torch.Generator().manual_seed(0))
    assert rel(lin(x), x @ lin.weight_float().t()) < 2e-2


@pytest.mark.parametrize("qtype,tiled", [("Q4_1", False), ("Q4_0", True), ("Q8_0", True)])
def test_prefill_sized_inputs_go_where_they_are_faster(qtype, tiled):
    """Past GGML_MAX_ROWS rows libggml keeps the types its tiled GEMM takes; others dequantize blocks (exact)."""
    lin = layer(qtype)
    x = torch.randn(qkernels.GGML_MAX_ROWS + 1, 512, generator=torch.Generator().manual_seed(2))
    exact = x @ lin.weight_float().t()
    assert lin.kernel_form(x[:qkernels.GGML_MAX_ROWS]) == "kernel"
    assert (lin.kernel_form(x) == "kernel") == tiled
    err = rel(lin(x), exact)
    assert (1e-3 < err < 2e-2) if tiled else err < 1e-6


def test_the_weight_is_not_copied_and_rows_of_a_batch_equal_rows_alone():
    lin = layer("Q4_1")
    pw = lin.kernel_weight()
    assert pw.weight.data_ptr() == lin.qweight.data_ptr()
    x = torch.randn(6, 512, generator=torch.Generator().manual_seed(1))
    together = lin(x)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(6)])
    # each row's activations are quantized on their own and each output is one dot product over them
    assert rel(together, alone) < 1e-6


def test_threads_multiplying_at_once_get_their_own_products():
    """One libggml threadpool runs one graph at a time: callers' threads take turns, and none sees another's."""
    import threading

    lins = [layer("Q4_0"), layer("Q8_0", 64)]
    xs = [torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)) for rows in (3, 8)]
    want = [lin(x) for lin, x in zip(lins, xs)]
    wrong = []

    def work(i):
        for _ in range(200):
            if not torch.equal(lins[i % 2](xs[i % 2]), want[i % 2]):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_compiled_call_is_one_graph_for_every_row_count():
    lin = layer("Q8_0")
    pw = lin.kernel_weight()
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    f = torch.compile(lambda x: qkernels.matmul(x, pw) * 2, dynamic=True, fullgraph=True)
    for rows in (2, 5, 17):  # (dynamo specializes a size of 1 anyway)
        x = torch.randn(rows, 512)
        torch.testing.assert_close(f(x), lin(x) * 2, rtol=0, atol=0)
    assert counts["stats"]["unique_graphs"] == 1


def test_ggml_mode_without_the_library_is_a_clear_error(monkeypatch, tiny_llama):
    from toolkit.model import load

    monkeypatch.setattr(ggml_matmul, "unavailable_reason", lambda: "no libggml here")
    with pytest.raises(ToolkitError, match="--weights ggml: no libggml here"):
        load(tiny_llama, device="cpu", weights="ggml")


def test_torch_codec_setting_keeps_libggml_out(monkeypatch):
    from toolkit import ggml_codec

    monkeypatch.setattr(ggml_codec, "_setting", "torch")
    assert not ggml_matmul.available() and "TOOLKIT_CODEC=torch" in ggml_matmul.unavailable_reason()
