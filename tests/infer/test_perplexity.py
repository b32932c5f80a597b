"""`toolkit perplexity` against llama.cpp: the same strided scheme (llama-perplexity: chunks of n_ctx, BOS rule,
second half scored) computed from llama.cpp's own logits, on the real SmolLM2 GGUF and a tiny F32 model."""
from __future__ import annotations

import math

import pytest
import torch

from oracle_llama import llama_logits, strided_nll
from toolkit.cli import main as cli_main
from toolkit.infer.perplexity import chunk_nll, perplexity
from toolkit.model import load

TEXT = """The lighthouse stood at the end of a narrow spit of rock, and for a hundred years its keepers had
climbed the spiral stairs every evening to light the lamp. The last keeper, an old man named Tobias, still kept a
logbook in which he wrote the weather, the ships that passed and the birds that rested on the gallery rail.
When the lamp was automated, the council offered him a cottage in the village, but he refused to leave.
He said the sea had its own calendar and that somebody ought to keep it.

In the spring the fishing boats came back from the south, and the harbour filled with the smell of tar and
salt. Children ran along the quay to count the boats, and the women mended nets on the slipway while the men
argued about prices. Tobias watched all of it from his window. He noted the first swallow on the ninth of April,
a week later than the year before, and a storm that tore the roof from the chapel in the third week of May.

Scientists later borrowed his logbooks. They found that his careful notes, written by hand over forty years,
matched the instruments of the weather station almost exactly, and in some places were better, because he had
written down what the instruments could not measure: the colour of the sky before a gale, the way the gulls
flew inland, the silence of the water on the mornings when fog rolled in from the open ocean."""


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ppl") / "text.txt"
    p.write_text(TEXT)
    return p


def test_chunk_nll_scores_second_half_only():
    logits = torch.zeros(8, 5)
    targets = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    nll, n = chunk_nll(logits, targets, first=4)
    assert n == 3 and math.isclose(nll, 3 * math.log(5), rel_tol=1e-9)


@pytest.mark.parametrize("which,weights", [("smollm2", "float"), ("smollm2", "bf16"), ("tiny", "float")])
def test_perplexity_matches_llama_cpp(which, weights, smollm2_path, tiny_llama):
    """weights="bf16" multiplies every 128-token chunk through bf16 copies (8 significant bits in weights and
    activations, as coarse as llama.cpp's 8-bit activations): held to the same 1% as the quantized float path."""
    path = smollm2_path if which == "smollm2" else tiny_llama
    n_ctx, n_chunks = 128, 4
    model, tok = load(path, device="cpu", weights=weights)
    ids = tok.encode(TEXT * 2)
    assert len(ids) >= n_chunks * n_ctx
    bos = tok.bos_id if tok.add_bos else None
    ours = perplexity(model, ids, n_ctx, bos, max_chunks=n_chunks, progress=False)
    ids = ids[: n_chunks * n_ctx]
    nll, count = strided_nll(lambda ch: llama_logits(path, ch, n_ctx=n_ctx), ids, n_ctx, bos)
    ref = math.exp(nll / count)
    assert count == n_chunks * (n_ctx - n_ctx // 2 - 1)
    tol = 0.01 if which == "smollm2" else 1e-3  # quantized: llama.cpp quantizes activations; F32: float noise
    assert abs(ours - ref) / ref < tol, (ours, ref)


def test_windows_scored_together_give_the_same_figure(tiny_llama):
    """Several windows in one forward pass (the default for short windows) against one window a pass."""
    model, tok = load(tiny_llama, device="cpu", weights="float")
    ids = tok.encode(TEXT * 2)
    one = perplexity(model, ids, 64, None, max_chunks=5, batch_size=1, progress=False)
    together = perplexity(model, ids, 64, None, max_chunks=5, progress=False)  # 16 a pass: all 5 at once
    three = perplexity(model, ids, 64, None, max_chunks=5, batch_size=3, progress=False)  # 3 + 2
    # float32 weights: batched matmuls only sum in another order
    assert abs(together - one) / one < 1e-6 and abs(three - one) / one < 1e-6


def test_cli_prints_ppl_last(text_file, tiny_llama, capsys):
    rc = cli_main(["perplexity", "-m", str(tiny_llama), "-f", str(text_file), "-c", "64", "--chunks", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and out[-1].startswith("PPL = ")
    model, tok = load(tiny_llama, device="cpu", weights="float")
    expected = perplexity(model, tok.encode(TEXT), 64, None, max_chunks=2, progress=False)
    assert abs(float(out[-1].split("=")[1]) - expected) < 1e-3


def test_too_short_text_is_a_clear_error(tmp_path, tiny_llama, capsys):
    p = tmp_path / "short.txt"
    p.write_text("just a few words")
    rc = cli_main(["perplexity", "-m", str(tiny_llama), "-f", str(p), "-c", "64"])
    err = capsys.readouterr().err
    assert rc == 1 and "need at least 128 tokens" in err and "Traceback" not in err
    rc = cli_main(["perplexity", "-m", str(tiny_llama), "-f", str(tmp_path / "missing.txt")])
    assert rc == 1 and "missing.txt: text file not found" in capsys.readouterr().err
