"""Everything finetune reads before any work, checked first so bad input fails in one line: which tensors train
at which rank (llama.cpp's --rank-* flags, --target, --lora-layers) and the data, read and tokenized."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

from .config import FinetuneConfig
from .data import RecordTokenizer, Samples, process_escapes, read_records, records_to_samples, split_holdout, tokenize_text

# llama.cpp's --rank-* flags -> the GGUF tensors they set (fused checkpoints map onto their parts)
RANK_FLAGS = {
    "rank_tok_embd": ("token_embd",), "rank_out": ("output",),
    "rank_wq": ("attn_q", "attn_qkv"), "rank_wk": ("attn_k",), "rank_wv": ("attn_v",), "rank_wo": ("attn_output",),
    "rank_w1": ("ffn_gate",), "rank_w2": ("ffn_down",), "rank_w3": ("ffn_up",),
}


def resolve_ranks(cfg: FinetuneConfig, shapes: dict[str, tuple[int, ...]], n_layer: int, tied: bool,
                   path: str) -> dict[str, int]:
    """GGUF weight name -> rank, from --lora-r, --rank-*, --target and --lora-layers; checked against shapes."""
    for flag in ("rank_att_norm", "rank_ffn_norm", "rank_out_norm"):
        if getattr(cfg, flag):
            raise ToolkitError(f"--{flag.replace('_', '-')}: llama.cpp's adapter loader ignores norm LoRA, so "
                               "toolkit does not train it (use 0)")
    per_kind: dict[str, int] = {}
    for flag, kinds in RANK_FLAGS.items():
        r = getattr(cfg, flag)
        for k in kinds:
            per_kind[k] = cfg.lora_r if r is None else int(r)
    targets = {t.removesuffix(".weight") for t in cfg.target}
    known = set(per_kind)
    bad = [t for t in targets if t not in known and not t.startswith("blk.")]
    if bad:
        raise ToolkitError(f"--target: unknown tensor kind(s) {', '.join(sorted(bad))} (use {', '.join(sorted(known))})")
    first = n_layer - cfg.lora_layers if cfg.lora_layers else 0
    ranks: dict[str, int] = {}
    for name in shapes:
        if not name.endswith(".weight"):
            continue
        stem = name[:-7]
        kind = stem.split(".")[-1]
        if kind not in per_kind or (kind == "output" and tied):
            continue
        if kind == "token_embd" and tied:
            # llama.cpp looks up the tied output's LoRA by the same tensor, so a token_embd LoRA would be
            # applied to the output matmul too, where its shapes abort the graph: never train it there
            if cfg.rank_tok_embd or "token_embd" in targets:
                raise ToolkitError("token_embd LoRA on a model with tied output embeddings cannot be used by "
                                   "llama.cpp (it would apply it to the output too): drop --rank-tok-embd/--target "
                                   "token_embd", path)
            continue
        if stem.startswith("blk."):
            if int(stem.split(".")[1]) < first:
                continue
        elif cfg.lora_layers and kind != "output":
            continue  # --lora-layers: blocks only (plus the head, as mlx-lm's last layers)
        if targets and kind not in targets and stem not in targets:
            continue
        r = per_kind[kind]
        if r <= 0:
            continue
        lim = min(shapes[name])
        if r > lim:
            raise ToolkitError(f"LoRA rank {r} is larger than tensor '{name}' allows ({list(shapes[name])}: at most "
                               f"{lim})", path)
        ranks[name] = r
    if not ranks:
        raise ToolkitError("no tensors to train (check --target / --rank-* / --lora-layers)")
    return ranks


@dataclass
class Data:
    train: Samples
    val: Samples | None
    test: Samples | None


def _max_token_bytes(tokens: list[str]) -> int:
    return max((len(t.encode("utf-8")) for t in tokens), default=1)


def _is_text_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() not in (".jsonl", ".json", ".parquet", ".csv", ".arrow")


def load_data(cfg: FinetuneConfig, tok: Any, token_texts: list[str]) -> Data:
    """All data read and tokenized up front, so bad input fails before the model is built."""
    rt = RecordTokenizer(tok, cfg.mask_prompt)
    sample_start = process_escapes(cfg.sample_start) if cfg.escape else cfg.sample_start
    max_tb = _max_token_bytes(token_texts)

    def text_samples(path: str) -> Samples:
        p = Path(path)
        if not p.exists():
            raise ToolkitError("no such file", path)
        data = p.read_bytes()
        return tokenize_text(data, lambda t: tok.encode(t, add_bos=False, special=False), cfg.ctx, sample_start,
                             cfg.include_sample_start, cfg.overlapping_samples, max_tb, path)

    def any_samples(path: str, split: str = "train") -> Samples:
        if _is_text_file(Path(path)):
            return text_samples(path)
        return records_to_samples(read_records(path, split), rt, cfg.ctx, path)

    if cfg.data:
        d = Path(cfg.data)
        if not (d / "train.jsonl").is_file():
            raise ToolkitError("no train.jsonl in the --data folder", str(d))
        train = records_to_samples(read_records(d / "train.jsonl"), rt, cfg.ctx, str(d / "train.jsonl"))
        val = records_to_samples(read_records(d / "valid.jsonl"), rt, cfg.ctx, str(d / "valid.jsonl")) \
            if (d / "valid.jsonl").is_file() else None
        test = records_to_samples(read_records(d / "test.jsonl"), rt, cfg.ctx, str(d / "test.jsonl")) \
            if (d / "test.jsonl").is_file() else None
    elif cfg.train_data:
        train = any_samples(cfg.train_data)
        val = test = None
        p = Path(cfg.train_data)
        if p.is_dir() and ((p / "dataset_dict.json").exists()):  # a DatasetDict: its own splits
            import datasets

            splits = datasets.load_from_disk(str(p))
            if "validation" in splits:
                val = records_to_samples([dict(r) for r in splits["validation"]], rt, cfg.ctx, str(p))
            if "test" in splits:
                test = records_to_samples([dict(r) for r in splits["test"]], rt, cfg.ctx, str(p))
    else:
        raise ToolkitError("no training data: give --train-data FILE or --data DIR")
    if cfg.val_data:
        val = any_samples(cfg.val_data)
    if cfg.test_data:
        test = any_samples(cfg.test_data)
    if val is None and cfg.val_split > 0:
        train, val = split_holdout(train, cfg.val_split)
    if cfg.test and test is None:
        raise ToolkitError("--test needs test data (--test-data FILE or test.jsonl in --data)")
    return Data(train, val, test)
