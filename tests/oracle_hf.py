"""transformers' own GGUF loading as an oracle: the same file through AutoModelForCausalLM(gguf_file=...), fp32.

    hf_model(path) -> the transformers model (cached per path)
    hf_logits(path, tokens) -> np.ndarray [T, vocab]
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


@lru_cache(maxsize=4)
def hf_model(path: str):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, torch_dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_logits(path, tokens: Sequence[int]) -> np.ndarray:
    model = hf_model(str(path))
    out = model(torch.tensor([list(tokens)]), use_cache=False)
    return out.logits[0].float().numpy()
