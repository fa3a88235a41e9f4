#!/usr/bin/env bash
# The GPU runs the open issues still need (as of 2026-12-03), in one device call of about 9.5 minutes; each part
# has its own timeout and writes its JSON under $OUT, so a slow part cannot take the others' results with it.
#   bash benchmarks/pending_gpu.sh           (carry .whl: the server, openai (+ httpx2, httpcore2), xgrammar wheels;
#                                             the list is in benchmarks/NOTES.md, "Structured output on the GPU")
# Parts: #19 structured output vs unconstrained (7B shape, batch 32); #11 serving greedy vs sampled after the
# packed prefill states (1.3B); #15 speculative decoding vs plain (7B, n-gram on a repeating workload, oracle
# drafts) and the server's speculative GPU tests; #16 the GPU suite with durations (bound: 3 minutes).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export PYTHONPATH=/tmp/site:src:.
OUT=${OUT:-/tmp/fastxlstm-pending}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
part() { echo "=== $1 ($(date -u +%H:%M:%S))"; }
part "structured (#19)"
timeout 200 python3 benchmarks/structured_gpu.py --repeats 1 --out "$OUT/structured_7b_h200.json" 2>&1 | tail -6
part "serving greedy vs sampled, 1.3B (#11)"
timeout 120 python3 benchmarks/serving_load.py --model random:xlstm-1.3b --requests 128 --concurrency 64 \
  --client-procs 4 --max-slots 64 --output-tokens 128 --max-prompt 512 --skip-audit --skip-prefix --peer-steps 50 \
  --sampled 0.8,0.95 --out "$OUT/serving_sampled_vs_greedy_1.3b_h200.json" 2>&1 | tail -8
part "speculative (#15)"
timeout 120 python3 benchmarks/speculative_gpu.py --out-dir "$OUT" 2>&1 | tail -12
part "GPU tests (#15, #16)"
timeout -s INT 170 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=15 -rfE -o addopts="" tests \
  > "$OUT/gpu_tests.log" 2>&1
grep -E "passed|failed|Error|^[0-9.]+s call" "$OUT/gpu_tests.log" | head -25
part done
