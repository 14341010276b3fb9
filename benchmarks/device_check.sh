#!/usr/bin/env bash
# The GPU device check: the GPU path (NCCL, bf16, ZeRO-3, tiled loss at a 65,536 batch, ViT-B/32 throughput and
# MFU), which the development machines test only on CPU twins, run for real on one GPU.
#
# Run from a fresh clone, after `make setup`, on a machine with one NVIDIA GPU (H100/H200 class: under 5 minutes;
# no network needed):
#     bash benchmarks/device_check.sh            [--only SECTION ...] [--steps N]
# Writes benchmarks/results/device_check.json (with the GPU's name); `towerlab plan` then uses its measured MFU.
# Exit: 0 all sections passed, 1 a section failed (named in the output and the JSON), 2 no GPU here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "device_check: $PY not found: run \`make setup\` first (or set PYTHON=/path/to/python)" >&2
    exit 2
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "device_check: no NVIDIA GPU on this machine (nvidia-smi is missing or sees none): run it on a GPU machine" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "device_check: nvidia-smi sees a GPU but torch $("$PY" -c 'import torch; print(torch.__version__)') cannot use it (a CPU-only build?): reinstall torch with CUDA into .venv" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# offline: nothing may be downloaded (the debug recipe's data is generated locally)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 330 "$PY" benchmarks/device_check.py --device cuda "$@"
