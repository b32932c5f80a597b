"""transformers' own GGUF loading as an oracle: the same file through AutoModelForCausalLM(gguf_file=...), fp32.

    hf_model(path) -> the transformers model (cached per path)
    hf_logits(path, tokens) -> np.ndarray [T, vocab]

transformers parses the whole vocabulary of a GGUF with gguf-py even for a model-only load (~25 s for a
49k-token vocabulary); the model does not need it, so we hand it a copy without the tokenizer.* keys (same
tensors, same hyper-parameters, `{arch}.vocab_size` set from token_embd).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def model_only_copy(path: str | Path) -> Path:
    from toolkit.gguf_io import TensorSpec, copy_metadata, open_gguf, write_gguf

    p = Path(path)
    st = p.stat()
    key = hashlib.sha1(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / "toolkit-hf-oracle" / key / p.name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        g = open_gguf(p)
        meta = {k: v for k, v in copy_metadata(g).items() if not k.startswith("tokenizer.")}
        meta[f"{g.arch}.vocab_size"] = int(g.tensors["token_embd.weight"].shape[0])
        write_gguf(out, meta, [TensorSpec(n, t.qtype, t.shape, t.raw() if t.qtype.name not in ("F32", "F16")
                                          else t.data) for n, t in g.tensors.items()])
    return out


@lru_cache(maxsize=4)
def hf_model(path: str):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    p = model_only_copy(path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, torch_dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_logits(path, tokens: Sequence[int]) -> np.ndarray:
    model = hf_model(str(path))
    out = model(torch.tensor([list(tokens)]), use_cache=False)
    return out.logits[0].float().numpy()
