"""Training data: llama.cpp's sample splitting, batches, shuffling (std::mt19937 via g++ as oracle),
llama.cpp's tokenizer as oracle for the samples' tokens, and mlx-lm style records with loss masks."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import ToolkitError
from toolkit.train.data import (SampleOrder, Samples, ShuffleState, RecordTokenizer, make_batch,
                                mt19937_seed_state, process_escapes, read_records, records_to_samples,
                                shuffle_samples, split_holdout, tokenize_text)


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_escapes():
    assert process_escapes(r"a\nb\tc\\d\'\"\x41\q") == "a\nb\tc\\d'\"A\\q"


def test_sample_start_split_excludes_and_includes_the_pattern():
    s = tokenize_text(b"#ab#cde#", chars, ctx=4, sample_start="#")
    assert s.sizes.tolist() == [2, 3, 0] and s.begins.tolist() == [0, 2, 5]
    assert "".join(map(chr, s.tokens)) == "abcde"
    assert any("empty" in n for n in s.notes) and any("shorter" in n for n in s.notes)
    s = tokenize_text(b"#ab#cde#", chars, ctx=4, sample_start="#", include_sample_start=True)
    assert [("".join(map(chr, s.tokens[b:b + n]))) for b, n in zip(s.begins, s.sizes)] == ["#ab", "#cde", "#"]


def test_overlapping_samples_run_on_for_ctx_tokens_of_bytes():
    s = tokenize_text(b"#ab#cdefg", chars, ctx=3, sample_start="#", overlapping_samples=True, max_token_bytes=1)
    # each sample: 3 bytes after its start (max_token_bytes * ctx), across the next sample start
    assert [("".join(map(chr, s.tokens[b:b + n]))) for b, n in zip(s.begins, s.sizes)] == ["ab#", "cde"]


def test_overlapping_sample_end_is_moved_out_of_a_utf8_character():
    s = tokenize_text("#aé".encode(), lambda t: [len(t.encode())], ctx=2, sample_start="#",
                      overlapping_samples=True)
    assert s.tokens.tolist() == [3]  # 'a' + the whole 2-byte 'é', never half of it


def test_no_sample_start_gives_a_sample_at_every_position():
    s = tokenize_text(b"abcdefgh", chars, ctx=3)
    assert s.begins.tolist() == [0, 1, 2, 3, 4] and s.sizes.tolist() == [3] * 5


def test_bad_data_is_one_clear_error():
    with pytest.raises(ToolkitError, match="never occurs"):
        tokenize_text(b"abc", chars, ctx=4, sample_start="\n", source="d.txt")
    with pytest.raises(ToolkitError, match="empty"):
        tokenize_text(b"", chars, ctx=4, source="d.txt")


def samples(*seqs: list[int], pad_loss: bool = True, mask=None) -> Samples:
    toks = np.asarray([t for s in seqs for t in s], np.int64)
    sizes = np.asarray([len(s) for s in seqs], np.int64)
    begins = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    m = np.ones(len(toks), bool) if mask is None else np.asarray(mask, bool)
    return Samples(toks, m, begins, sizes, pad_loss)


def test_batch_pads_with_eos_after_bos_shifted_inputs():
    s = samples([1, 2, 3], [4, 5])
    b = make_batch(s, np.arange(2), np.zeros(2, np.int64), 0, 1, 6, bos=0, eos=9, n_vocab=100)
    assert b.inputs.tolist() == [[0, 1, 2, 3, 9, 9]] and b.targets.tolist() == [[1, 2, 3, 9, 9, 9]]
    assert b.used_samples == 1 and bool(b.weights.all())  # llama.cpp trains on the padding too


def test_fill_with_next_samples_and_separators():
    s = samples([1, 2, 3], [4, 5])
    args = (np.arange(2), np.zeros(2, np.int64), 0, 1, 6)
    # llama.cpp's defaults: separate with BOS only
    b = make_batch(s, *args, bos=0, eos=9, n_vocab=100, fill_with_next_samples=True)
    assert b.targets.tolist() == [[1, 2, 3, 0, 4, 5]] and b.inputs.tolist() == [[0, 1, 2, 3, 0, 4]]
    assert b.used_samples == 2
    b = make_batch(s, *args, bos=0, eos=9, n_vocab=100, fill_with_next_samples=True, separate_with_eos=True)
    assert b.targets.tolist() == [[1, 2, 3, 9, 0, 4]]
    b = make_batch(s, *args, bos=0, eos=9, n_vocab=100, fill_with_next_samples=True, separate_with_bos=False)
    assert b.targets.tolist() == [[1, 2, 3, 4, 5, 1]] and b.used_samples == 3  # wraps around to sample 0


def test_random_offsets_apply_to_the_first_sample_of_a_row():
    s = samples([1, 2, 3, 4], [5, 6])
    b = make_batch(s, np.arange(2), np.asarray([2, 1]), 0, 2, 3, bos=0, eos=9, n_vocab=100,
                   sample_random_offsets=True)
    assert b.targets.tolist() == [[3, 4, 9], [6, 9, 9]]


def test_records_mode_masks_padding_and_prompt():
    s = samples([1, 2, 3], [4], pad_loss=False, mask=[0, 1, 1, 1])
    b = make_batch(s, np.arange(2), np.zeros(2, np.int64), 0, 2, 5, bos=0, eos=9, n_vocab=100)
    assert b.weights.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert b.trimmed().targets.shape == (2, 3)


CPP = r"""
#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <random>
#include <vector>
int main(int argc, char ** argv) {
    std::mt19937 rng((unsigned) std::strtoul(argv[1], 0, 10));
    std::cout << rng << "\n";
    size_t n = argc - 2;
    std::vector<unsigned> rnd(n); std::vector<size_t> idx(n), sizes(n);
    for (size_t i = 0; i < n; ++i) { idx[i] = i; rnd[i] = rng(); sizes[i] = std::strtoul(argv[2 + i], 0, 10); }
    std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return rnd[a] == rnd[b] ? a < b : rnd[a] < rnd[b]; });
    for (size_t i = 0; i < n; ++i) std::cout << idx[i] << " ";
    std::cout << "\n";
    for (size_t i = 0; i < n; ++i) std::cout << (size_t) ((sizes[idx[i]] - 1) * ((double) rng() / (double) (rng.max() - 1))) << " ";
    std::cout << "\n" << rng << "\n";
}
"""


@pytest.fixture(scope="module")
def mt_oracle(tmp_path_factory):
    if not shutil.which("g++"):
        pytest.skip("no g++ for the std::mt19937 oracle")
    d = tmp_path_factory.mktemp("mt")
    (d / "mt.cpp").write_text(CPP)
    subprocess.run(["g++", "-O1", "-o", str(d / "mt"), str(d / "mt.cpp")], check=True)
    return d / "mt"


def test_shuffle_matches_std_mt19937(mt_oracle):
    sizes = np.asarray([5, 17, 1, 300, 42, 8, 9, 64, 2, 33], np.int64)
    out = subprocess.run([str(mt_oracle), "1234", *map(str, sizes)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    seeded = mt19937_seed_state(1234)
    assert seeded == out[0].strip()  # the checkpoint's text form is libstdc++'s
    order, offs, nxt = shuffle_samples(seeded, sizes)
    assert order.tolist() == [int(x) for x in out[1].split()]
    assert offs.tolist() == [int(x) for x in out[2].split()]
    assert nxt == out[3].strip()


def test_sample_order_reshuffles_each_epoch_and_resumes_exactly():
    s = samples(*[[i + 1] * (i + 1) for i in range(7)])
    kw = dict(n_batch=2, ctx=4, bos=0, eos=99, n_vocab=100)
    a = SampleOrder(s, seed=3)
    seen = [a.batch(**kw).targets.tolist() for _ in range(10)]
    assert a.state.epochs == 2  # 7 samples, 2 per batch: epochs end after batches 4 and 7 (and 11)
    first_epoch = {row[0] for b in seen[:4] for row in b}
    assert first_epoch == set(range(1, 8))
    assert [r[0] for b in seen[:4] for r in b][:7] != [r[0] for b in seen[4:8] for r in b][1:8]
    # stop after 6 batches, restore from the saved state, continue: same batches
    b = SampleOrder(s, seed=3)
    for _ in range(6):
        b.batch(**kw)
    saved = ShuffleState(**vars(b.state))
    c = SampleOrder(s, seed=999, state=saved)  # the seed no longer matters
    assert [c.batch(**kw).targets.tolist() for _ in range(4)] == seen[6:]
    d = SampleOrder(s, seed=999, state=saved, force_reshuffle=True)
    assert d.state.next_sample == 0 and d.batch(**kw).targets.tolist() != seen[6]


def test_holdout_split():
    s = samples(*[[i] for i in range(10)])
    tr, va = split_holdout(s, 0.2)
    assert len(tr) == 8 and va.begins.tolist() == [8, 9]


@pytest.fixture(scope="module")
def smol_tok(smollm2_path):
    from toolkit.gguf_io import open_gguf
    from toolkit.tokenizer import Tokenizer

    return Tokenizer.from_gguf(open_gguf(smollm2_path))


@pytest.mark.llamacpp
def test_sample_tokens_equal_llama_cpp_tokenizer(smollm2_path, smol_tok):
    oracle = pytest.importorskip("oracle_llama")
    text = "Q: 2+2?\nA: four\nQ: the capital of France?\nA: Paris — of course.\n\nQ: ünïcödé?\n"
    s = tokenize_text(text.encode(), lambda t: smol_tok.encode(t, add_bos=False, special=False), ctx=8,
                      sample_start="\n")
    pieces = text.split("\n")[1:]
    assert len(s) == len(pieces)
    for b, n, piece in zip(s.begins, s.sizes, pieces):
        ref = oracle.llama_tokenize(smollm2_path, piece, add_bos=False, special=False) if piece else []
        assert s.tokens[b:b + n].tolist() == list(ref)


def test_prompt_completion_and_chat_masks(smol_tok):
    rt = RecordTokenizer(smol_tok)
    ids, mask = rt({"prompt": "Capital of France?", "completion": " Paris"})
    trained = [t for t, m in zip(ids, mask) if m]
    assert smol_tok.decode(trained[:-1]) == " Paris" and trained[-1] == smol_tok.eos_id
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, mask = rt({"messages": msgs})
    full = smol_tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert smol_tok.decode(ids) == full.removeprefix(smol_tok.decode([smol_tok.bos_id])) or smol_tok.decode(ids) == full
    trained = smol_tok.decode([t for t, m in zip(ids, mask) if m])
    assert "Hello there" in trained and "4" in trained and "Hi" not in trained and "2+2" not in trained
    s = records_to_samples([{"text": "a b"}, {"messages": msgs}], rt, ctx=64)
    assert len(s) == 2 and not s.pad_loss


def test_read_records_jsonl_csv_and_errors(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}) + "\n")
    assert read_records(tmp_path / "t.jsonl") == [{"text": "x"}, {"text": "y"}]
    (tmp_path / "t.csv").write_text("prompt,completion\nhi,there\n")
    assert read_records(tmp_path / "t.csv") == [{"prompt": "hi", "completion": "there"}]
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(ToolkitError, match="line 1"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(ToolkitError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")


def test_save_to_disk_dataset_dict_gives_train_validation_test(tmp_path, smol_tok, smollm2_path):
    import datasets

    from toolkit.train.finetune import FinetuneConfig
    from toolkit.train.inputs import load_data

    rows = lambda n, k: datasets.Dataset.from_list([{"text": f"{k} number {i}"} for i in range(n)])  # noqa: E731
    datasets.DatasetDict({"train": rows(5, "train"), "validation": rows(2, "val"), "test": rows(3, "test")}) \
        .save_to_disk(str(tmp_path / "ds"))
    cfg = FinetuneConfig(model_base=str(smollm2_path), train_data=str(tmp_path / "ds"), ctx=16)
    d = load_data(cfg, smol_tok, [])
    assert (len(d.train), len(d.val), len(d.test)) == (5, 2, 3)
    first = d.train.tokens[d.train.begins[0]:d.train.begins[0] + d.train.sizes[0]].tolist()
    assert smol_tok.decode(first[:-1]) == "train number 0" and first[-1] == smol_tok.eos_id
    (tmp_path / "p.parquet").write_bytes(b"")
    rows(4, "pq").to_parquet(str(tmp_path / "p.parquet"))
    cfg = FinetuneConfig(model_base=str(smollm2_path), train_data=str(tmp_path / "p.parquet"), ctx=16, val_split=0.25)
    d = load_data(cfg, smol_tok, [])
    assert (len(d.train), len(d.val)) == (3, 1) and d.test is None
