"""FSDP2 scaling: the same xLSTM-125M training step on 1 GPU and on N GPUs of one host (torchrun).

    PYTHONPATH=src python benchmarks/training_fsdp.py --gpus 2 --out $OUT

Weak scaling: each GPU keeps the per-GPU micro batch, so the global batch grows with N.
Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU). Random tokens (speed does
not depend on the values). Writes ``training_fsdp.json`` under --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_gpu import environment, pick_backend, random_shards, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--work", default="/tmp/fastxlstm-fsdp")
    ap.add_argument("--timeout", type=float, default=200)
    ap.add_argument("--backend", default="check", choices=["check", "auto", "reference"],
                    help="mLSTM backend; 'check' uses Triton only if it matches the reference first")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "fsdp.log"
    backend = pick_backend(log)[0] if args.backend == "check" else args.backend
    data = random_shards(work / "random-50304", 50304, 8_000_000)
    sets = [f"data.path={data}", f"train.steps={args.steps}", "log.every=5", "eval.every=0", "checkpoint.every=0",
            "export.enabled=false", "data.seq_len=2048", "train.micro_batch_size=16", f"model.backend={backend}"]
    results = {"env": environment(), "backend": backend, "command": " ".join(sys.argv), "runs": []}
    for n in sorted({1, args.gpus}):
        results["runs"].append(train("configs/xlstm-125m.yaml", work / f"run-{n}", sets, args.timeout, log, nproc=n))
        (out / "training_fsdp.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    base = next((r.get("tokens_per_s") for r in results["runs"] if r["gpus"] == 1), None)
    print(f"backend={backend}")
    print(f"{'gpus':>4} {'rc':>8} {'tokens/s':>10} {'mfu':>6} {'efficiency':>10}")
    for r in results["runs"]:
        tps = r.get("tokens_per_s")
        eff = tps / (r["gpus"] * base) if tps and base else None
        r["scaling_efficiency"] = eff
        print(f"{r['gpus']:>4} {r['rc']!s:>8} {tps or 0:>10.0f} {r.get('mfu') or 0:>6.3f} "
              f"{'-' if eff is None else f'{eff:.2f}':>10}")
    (out / "training_fsdp.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
