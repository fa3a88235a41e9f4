#!/usr/bin/env bash
# One device call that checks the tree on the GPU: every `gpu`-marked test, then the kernels' accuracy
# check and a quick kernel timing against the official kernels (JSON under $OUT).
#   bash benchmarks/verify_gpu.sh          (carry .whl with the official wheels for the peer columns)
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
OUT=${OUT:-/tmp/fastxlstm-verify}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -15
python3 benchmarks/kernel_bench.py --check --out "$OUT" --tag verify 2>&1 | tail -15
python3 benchmarks/kernel_bench.py --bench --quick --out "$OUT" --tag verify 2>&1 | tail -20
