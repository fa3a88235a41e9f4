"""GPU training runs for BENCHMARKS.md (## Training) and the embedded default model.

Each run is one ``python -m fastxlstm.train`` process (a fresh CUDA context, like a user's run).

    PYTHONPATH=src python benchmarks/training_gpu.py embedded   --out $OUT
    PYTHONPATH=src python benchmarks/training_gpu.py throughput --out $OUT
    PYTHONPATH=src python benchmarks/training_gpu.py ablation   --out $OUT --steps 1200

``embedded`` trains configs/xlstm-shakespeare.yaml and returns the lowest-held-out-loss weights
in bf16, split into files under 16 MiB; ``throughput`` times a few optimizer steps of the
125M and 1.3B configs (and the matched Llama) on random tokens; ``ablation`` trains xLSTM-125M
and the matched Llama on the same tokens with the same recipe.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def random_shards(directory: Path, vocab: int, tokens: int, seed: int = 0) -> Path:
    """A prepared-data directory of uniformly random tokens (throughput runs only)."""
    from fastxlstm.training.data import write_token_splits

    rng = np.random.default_rng(seed)
    splits = {"train": rng.integers(3, vocab, size=tokens),
              "val": rng.integers(3, vocab, size=max(tokens // 50, 65536))}
    return write_token_splits(directory, splits, vocab, split_mode="random")


def train(config: str, out_dir: Path, sets: list[str], timeout: float, log: Path, nproc: int = 1) -> dict:
    """One training process (``nproc > 1``: torchrun with FSDP2 on ``nproc`` GPUs); its summary."""
    shutil.rmtree(out_dir, ignore_errors=True)  # a stale run there would be resumed, not repeated
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "fastxlstm.train", config, "--set", f"out_dir={out_dir}", "--set",
           "log.progress=false"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1",
           # NVLink multicast stays off on shared multi-GPU hosts
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = {"config": config, "sets": sets, "gpus": nproc, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}
    summary = out_dir / "summary.json"
    if summary.exists():
        result.update(json.loads(summary.read_text()))
    print(json.dumps({k: result.get(k) for k in ("config", "arch", "parameters", "rc", "tokens_per_s", "mfu",
                                                 "final_val_loss", "best_val_loss", "wall_s")}), flush=True)
    return result


CHECK = r"""
import torch
from fastxlstm.ops import mlstm_chunkwise
torch.manual_seed(0)
B, NH, S, DQK, DV = 2, 4, 256, 64, 128
def inputs():
    q, k = (torch.randn(B, NH, S, DQK, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, NH, S, DV, device="cuda", dtype=torch.bfloat16)
    i = torch.randn(B, NH, S, device="cuda") * 3
    f = torch.randn(B, NH, S, device="cuda") * 2 + 3
    return [t.requires_grad_() for t in (q, k, v, i, f)]
xs = inputs()
outs = {}
for backend in ("reference", "triton"):
    ys = [x.detach().clone().requires_grad_() for x in xs]
    h, _ = mlstm_chunkwise(*ys, backend=backend)
    h.float().pow(2).mean().backward()
    outs[backend] = [h.float()] + [y.grad.float() for y in ys]
errs = [float((a - b).norm() / b.norm()) for a, b in zip(outs["triton"], outs["reference"])]
print("ERRS", errs)
assert max(errs) < 3e-2, errs
"""


def pick_backend(log: Path) -> tuple[str, str]:
    """Triton if its chunkwise forward and backward run and match the reference, else reference."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    try:
        p = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=180)
        note = (p.stdout + p.stderr)[-1500:]
        ok = p.returncode == 0
    except subprocess.TimeoutExpired:
        ok, note = False, "timeout"
    with log.open("a") as fh:
        fh.write(f"backend check: ok={ok}\n{note}\n")
    return ("auto" if ok else "reference"), note


def environment() -> dict:
    import torch

    from fastxlstm.ops import triton_available

    return {"date": dt.date.today().isoformat(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "triton_kernels": triton_available(), "mlstm_backend": "triton" if triton_available() else "reference"}


def cmd_embedded(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    run = Path(args.work) / "embedded"
    res = train("configs/xlstm-shakespeare.yaml", run, [*args.set, *args.embedded_set], args.timeout,
                Path(args.out) / "train.log")
    best = run / "best" / "model.safetensors"
    if best.exists():
        state = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(best)).items()}
        parts, cur, size = [], {}, 0
        for k in sorted(state):
            n = state[k].numel() * 2
            if cur and size + n > 15 * 2**20:
                parts.append(cur)
                cur, size = {}, 0
            cur[k] = state[k]
            size += n
        parts.append(cur)
        for i, part in enumerate(parts):
            save_file(part, str(Path(args.out) / f"embedded-part{i}.safetensors"))
    with tarfile.open(Path(args.out) / "embedded-run.tar.gz", "w:gz") as tf:
        for name in ("metrics.csv", "eval.csv", "summary.json", "config.json", "best/config.json",
                     "best/best_step.json"):
            if (run / name).exists():
                tf.add(run / name, arcname=name)
    return res


THROUGHPUT = [
    # (name, config, sets, torch.compile)
    ("xlstm-125m", "configs/xlstm-125m.yaml", ["train.micro_batch_size=16"], False),
    ("llama-125m", "configs/llama-125m.yaml", ["train.micro_batch_size=16"], False),
    ("xlstm-1.3b", "configs/xlstm-1.3b.yaml", ["train.micro_batch_size=2", "train.grad_accum=2"], False),
    ("xlstm-125m", "configs/xlstm-125m.yaml", ["train.micro_batch_size=16"], True),
    ("llama-125m", "configs/llama-125m.yaml", ["train.micro_batch_size=16"], True),
]


def cmd_throughput(args: argparse.Namespace) -> list[dict]:
    data = random_shards(Path(args.work) / "random-50304", 50304, 8_000_000)
    out = []
    allowed = {"false": [False], "true": [True], "both": [False, True]}[args.compile]
    for name, config, sets, compile_ in THROUGHPUT:
        if name not in args.only.split(",") or compile_ not in allowed:
            continue
        common = [f"data.path={data}", f"train.steps={args.steps}", "log.every=5", "eval.every=0",
                  "checkpoint.every=0", "export.enabled=false", "data.seq_len=2048", *args.set]
        tag = f"{name}-{'compiled' if compile_ else 'eager'}"
        r = train(config, Path(args.work) / f"tp-{tag}", [*common, *sets, f"train.compile={str(compile_).lower()}"],
                  args.timeout, Path(args.out) / "train.log")
        r["name"], r["compile"] = name, compile_
        out.append(r)
        args.results["throughput"] = out  # written after every run: a timeout keeps what finished
        (Path(args.out) / "results.json").write_text(json.dumps(args.results, indent=2, default=str) + "\n")
    return out


def cmd_ablation(args: argparse.Namespace) -> list[dict]:
    out = []
    for arch, config in (("xlstm", "configs/xlstm-125m.yaml"), ("llama", "configs/llama-125m.yaml")):
        run = Path(args.work) / f"ablation-{arch}"
        sets = ["data.path=.cache/train_data/mixed", f"train.steps={args.steps}", "data.seq_len=1024",
                "train.micro_batch_size=32", f"eval.every={max(1, args.steps // 8)}", "eval.tokens=131072",
                "eval.batch_size=16", "checkpoint.every=0", "export.enabled=false", "optim.warmup_steps=50",
                "optim.lr=1.5e-3", *args.set]
        r = train(config, run, sets, args.timeout, Path(args.out) / "train.log")
        r["name"] = arch
        out.append(r)
        with tarfile.open(Path(args.out) / f"ablation-{arch}.tar.gz", "w:gz") as tf:
            for name in ("metrics.csv", "eval.csv", "summary.json", "config.json"):
                if (run / name).exists():
                    tf.add(run / name, arcname=name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="+", choices=["embedded", "throughput", "ablation"])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--work", default="/tmp/fastxlstm-train")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--only", default="xlstm-125m,llama-125m,xlstm-1.3b")
    ap.add_argument("--compile", default="both", choices=["false", "true", "both"])
    ap.add_argument("--set", action="append", default=[], help="override for every run")
    ap.add_argument("--embedded-set", action="append", default=[], help="override for the embedded run only")
    ap.add_argument("--backend", default="check", choices=["check", "auto", "reference"],
                    help="mLSTM backend; 'check' picks triton only if it matches the reference")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "command": " ".join(sys.argv)}
    if args.backend == "check":
        backend, note = pick_backend(Path(args.out) / "train.log")
    else:
        backend, note = args.backend, f"backend forced to {args.backend}"
    results["environment"].update(mlstm_backend="triton" if backend == "auto" else "reference",
                                  backend_check=[ln for ln in note.splitlines() if ln.startswith(("ERRS", "Assert"))])
    args.set = [f"model.backend={backend}", *args.set]
    args.results = results
    print("backend:", backend, note.strip().splitlines()[-1:] if note else "", flush=True)
    for what in args.what:
        results[what] = {"embedded": cmd_embedded, "throughput": cmd_throughput, "ablation": cmd_ablation}[what](args)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(results["environment"]))


if __name__ == "__main__":
    main()
