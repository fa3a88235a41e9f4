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
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_gpu import ROOT, environment, pick_backend, random_shards  # noqa: E402


def run(nproc: int, sets: list[str], out_dir: Path, log: Path, timeout: float) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "fastxlstm.train", "configs/xlstm-125m.yaml", "--set", f"out_dir={out_dir}",
           "--set", "log.progress=false"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0",
           "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = {"gpus": nproc, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}
    summary = out_dir / "summary.json"
    if summary.exists():
        result.update(json.loads(summary.read_text()))
    return result


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
        results["runs"].append(run(n, sets, work / f"run-{n}", log, args.timeout))
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
