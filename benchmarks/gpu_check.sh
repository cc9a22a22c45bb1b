#!/usr/bin/env bash
# GPU check for a machine lent one NVIDIA GPU (written for an H200): GPT-3 Small throughput/MFU/memory with
# torch.compile, then the largest GPT-3 preset that fits with FSDP2 + activation checkpointing. One table.
# Runs from the source tree (no install, no `datasets`, random tokens). A hard 470 s limit sends SIGINT, on
# which the script still prints what it measured; its own phase budgets aim to finish by about 440 s.
#   benchmarks/gpu_check.sh              # on the GPU machine
#   benchmarks/gpu_check.sh --cpu-smoke  # rehearsal on the CPU, tiny shapes, < 1 minute
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
if [[ -x .venv/bin/python && -z "${GPTFORGE_SYSTEM_PYTHON:-}" && " $* " == *" --cpu-smoke "* ]]; then
    PYTHON=.venv/bin/python  # the rehearsal uses the project's venv when there is one
fi
exec timeout --signal=INT --kill-after=15 470 "$PYTHON" benchmarks/gpu_check.py "$@"
