"""The real llama.cpp tools (llama-server, llama-bench, llama-batched-bench, llama-export-lora, llama-perplexity)
as benchmark peers.

They are built once from the llama.cpp source that the llama-cpp-python sdist vendors (bench/build_llama_tools.sh)
and looked up in $TOOLKIT_LLAMA_BIN, then ~/.cache/toolkit/llama.cpp/bin, then PATH. A benchmark whose peer is
missing prints one line saying so and skips that row; tests never need these tools.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DEFAULT_BIN = Path.home() / ".cache" / "toolkit" / "llama.cpp" / "bin"


def llama_tool(name: str) -> str | None:
    """Path of a llama.cpp tool, or None after printing one line to stderr about how to get it."""
    for d in (os.environ.get("TOOLKIT_LLAMA_BIN"), str(DEFAULT_BIN)):
        if d and (Path(d) / name).is_file() and os.access(Path(d) / name, os.X_OK):
            return str(Path(d) / name)
    found = shutil.which(name)
    if found:
        return found
    print(f"skipping the {name} peer: not found in $TOOLKIT_LLAMA_BIN, {DEFAULT_BIN} or PATH "
          "(build it once with `bash bench/build_llama_tools.sh`)", file=sys.stderr)
    return None
