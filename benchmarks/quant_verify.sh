#!/usr/bin/env bash
# One device call for the quantized paths: the quant GPU tests (+ the batch-1 GEMV engine test), then
# benchmarks/quant_gpu.py (GEMV / weight-only tile sweeps, every way to run each projection per batch,
# prefill-size W8A8, engine decode bf16 / fp8 / int8). Run from the repository root; JSON and logs under $OUT.
#   bash benchmarks/quant_verify.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
OUT=${OUT:-/tmp/fastxlstm-quant}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_quant_gpu.py \
  tests/test_engine_gpu.py::test_batch1_gemv_path_matches_unfused_kernels 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
python3 benchmarks/quant_gpu.py "$OUT/quant_sweep.json" 2>&1 | tee "$OUT/quant_sweep.log" | tail -40
