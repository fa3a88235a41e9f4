"""Assemble models/xlstm-shakespeare-10m from the GPU run's weights and measure its held-out perplexity.

    PYTHONPATH=src python benchmarks/training_embedded.py PARTS_DIR RUN_DIR TOKENIZER_DIR
PARTS_DIR holds embedded-part*.safetensors (bf16) written by ``training_gpu.py embedded``; RUN_DIR the
unpacked embedded-run.tar.gz (metrics.csv, eval.csv, best/config.json, best/best_step.json).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastxlstm.checkpoint import load, save_pretrained
from fastxlstm.config import XLSTMConfig
from fastxlstm.model import XLSTMForCausalLM
from fastxlstm.tokenizer import Tokenizer
from fastxlstm.training.evaluate import perplexity, token_stream

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "xlstm-shakespeare-10m"
HELDOUT = ROOT / "data" / "shakespeare-heldout"
SAMPLE_TOKENS = 4096  # what tests/test_training_embedded.py evaluates (fast on CPU)


def heldout_texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(HELDOUT.glob("*.txt"))]


def main() -> None:
    parts, run, tok_dir = (Path(a) for a in sys.argv[1:4])
    state: dict[str, torch.Tensor] = {}
    for p in sorted(parts.glob("embedded-part*.safetensors")):
        state.update(load_file(str(p)))
    cfg = XLSTMConfig.from_json(run / "best" / "config.json")
    with torch.device("meta"):
        model = XLSTMForCausalLM(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    save_pretrained(model, MODEL_DIR, tokenizer_dir=tok_dir, dtype=torch.bfloat16)
    shipped = load(MODEL_DIR)  # exactly what users get: bf16 weights read as float32
    tok = Tokenizer.from_dir(MODEL_DIR)
    ids = token_stream(tok, heldout_texts())
    t0 = time.perf_counter()
    full = perplexity(shipped, ids, seq_len=512)
    sample = perplexity(shipped, ids, seq_len=512, max_tokens=SAMPLE_TOKENS)
    best = json.loads((run / "best" / "best_step.json").read_text())
    results = {
        "heldout": {"documents": [p.name for p in sorted(HELDOUT.glob("*.txt"))], **full},
        "sample_for_test": sample,
        "training": {"best_step": best["step"], "tokens_seen": best["tokens"],
                     "gpu_val_loss_bf16_autocast": best["val_loss"]},
        "protocol": "fastxlstm.training.evaluate.perplexity: documents encoded whole + eos, concatenated, "
                    "non-overlapping 512-token windows; float32 on CPU from the bf16 safetensors",
        "cpu_eval_s": round(time.perf_counter() - t0, 1),
    }
    (MODEL_DIR / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    shutil.copy2(run / "eval.csv", MODEL_DIR / "training_eval.csv")
    shutil.copy2(run / "metrics.csv", MODEL_DIR / "training_metrics.csv")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
