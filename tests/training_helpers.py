"""Helpers for the training tests: synthetic token shards and configs written to a temp dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from fastxlstm.training.data import write_token_splits


def write_shards(directory: Path, train: np.ndarray, val: np.ndarray, vocab: int) -> Path:
    """A prepared-data directory (meta.json + one shard per split) from token arrays."""
    return write_token_splits(directory, {"train": train, "val": val}, vocab, split_mode="test")


def learnable_tokens(n: int, vocab: int, seed: int) -> np.ndarray:
    """A stream a small model can learn: t[i+1] = (5 t[i] + 7) mod (vocab-3) + 3, restarted at
    random points every 20-60 tokens."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    i = 0
    while i < n:
        length = int(rng.integers(20, 60))
        t = int(rng.integers(0, vocab - 3))
        for j in range(min(length, n - i)):
            out[i + j] = t + 3
            t = (5 * t + 7) % (vocab - 3)
        i += length
    return out


def synthetic_data(directory: Path, vocab: int = 64, n_train: int = 60_000, n_val: int = 4_000) -> Path:
    return write_shards(directory, learnable_tokens(n_train, vocab, 0), learnable_tokens(n_val, vocab, 1), vocab)


def tiny_config(path: Path, data: Path, out_dir: Path, **sections) -> Path:
    """A YAML config for a very small xLSTM on CPU; ``sections`` update the defaults."""
    cfg = {
        "out_dir": str(out_dir),
        "model": {"preset": None, "backend": "reference",
                  "overrides": {"embedding_dim": 32, "num_blocks": 2, "num_heads": 2, "chunk_size": 16}},
        "data": {"path": str(data), "seq_len": 32},
        "optim": {"lr": 1e-2, "warmup_steps": 3, "schedule": "cosine"},
        "train": {"steps": 12, "micro_batch_size": 4, "grad_accum": 1, "device": "cpu", "seed": 0},
        "eval": {"every": 0, "tokens": 1024, "batch_size": 4},
        "log": {"every": 1, "progress": False},
        "checkpoint": {"every": 0, "keep": 2},
        "export": {"enabled": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    import csv

    with (run_dir / "metrics.csv").open() as fh:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]
