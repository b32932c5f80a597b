#!/usr/bin/env bash
# Build llama.cpp's own tools once, as the peers of bench/: the llama-cpp-python sdist on PyPI vendors llama.cpp's
# full source. ~10-15 minutes on 2 cores; the binaries land in $TOOLKIT_LLAMA_BIN (default
# ~/.cache/toolkit/llama.cpp/bin), outside the repository. Benchmarks skip a missing peer with one line.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DEST=${TOOLKIT_LLAMA_BIN:-$HOME/.cache/toolkit/llama.cpp/bin}
WORK=${TOOLKIT_LLAMA_SRC:-$HOME/.cache/toolkit/llama.cpp/src}
mkdir -p "$DEST" "$WORK"
cd "$WORK"
[ -f "llama_cpp_python-$VERSION.tar.gz" ] || \
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
[ -d "llama_cpp_python-$VERSION" ] || tar xzf "llama_cpp_python-$VERSION.tar.gz"
cd "llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -B build -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build build -j"$(nproc)" --target llama-server llama-bench llama-export-lora llama-perplexity \
    llama-batched-bench
cp build/bin/llama-server build/bin/llama-bench build/bin/llama-export-lora build/bin/llama-perplexity \
    build/bin/llama-batched-bench "$DEST/"
echo "llama.cpp tools in $DEST"
