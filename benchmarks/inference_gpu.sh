#!/usr/bin/env bash
# Inference benchmarks on the GPU machine: bash benchmarks/inference_gpu.sh check|ours|full|profile
# (check: GPU engine tests + a tiny smoke run of every system + our 7B numbers; full: side by side;
# profile: GPU engine/step tests, then kernel sweeps and per-kernel tables -> $OUT/decode_profile.json).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
OUT=${OUT:-/tmp/fastxlstm-bench}
mode=${1:-check}
shift || true
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
case $mode in
  check)
    python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_gpu.py 2>&1 | tail -15
    python3 benchmarks/inference.py --small --batch-sizes 1,4 --prompt-lengths 512,2048 --generate-lengths 64 \
      --decode-steps 8 --deadline 100 --out-dir "$OUT/small" --tag small
    python3 benchmarks/inference.py --systems fastxlstm --prompt-lengths 2048,8192,32768,65536,131072 \
      --deadline 240 --out-dir "$OUT" --tag ours "$@" ;;
  ours)
    python3 benchmarks/inference.py --systems fastxlstm --prompt-lengths 2048,8192,32768,65536,131072 \
      --deadline 300 --out-dir "$OUT" --tag ours "$@" ;;
  profile)
    python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_gpu.py tests/test_triton_ops.py -m gpu -k "engine or step" 2>&1 | tail -6
    python3 -m fastxlstm.bench.decode_profile "$OUT/decode_profile.json" "$@" ;;
  full)
    python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_gpu.py 2>&1 | tail -4
    python3 benchmarks/inference.py --out-dir "$OUT" --tag inference \
      --deadlines fastxlstm=120,official=115,hf-xlstm=55,llama=210 "$@" ;;
esac
