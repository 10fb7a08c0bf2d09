#!/usr/bin/env bash
# The GPU check in one run that fits 10 minutes on one H100 (lab/gpu_check.py: cache build, FT against
# CrispEdit, coalesced against single-edit jobs, peak memory, on random Llama 1B and 8B shapes). It needs only
# this repository and the machine's own PyTorch and transformers. Results: $OUT/gpu_check.json (else runs/).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs}/gpu_check"
"${PYTHON:-python3}" -m lab.gpu_check --shapes 1b,8b --out "$out" "$@"
