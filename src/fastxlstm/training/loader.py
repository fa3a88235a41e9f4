"""Fixed-length training windows drawn from token shards, deterministic per (seed, step, rank).

A step's global batch is ``world_size * grad_accum * micro_batch_size`` windows, all drawn from a
generator seeded by ``(seed, step)``; micro-step ``a`` of rank ``r`` takes the slice starting at
``(a * world_size + r) * micro_batch_size``. The sample therefore depends only on the step
number (no loader state to checkpoint: resume is exact), and one process with ``N * grad_accum``
accumulation steps sees the same windows, grouped the same way, as ``N`` processes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from .data import TokenSplit


def _window(shard: np.memmap, offset: int, length: int) -> np.ndarray:
    return np.asarray(shard[offset : offset + length], dtype=np.int64)


class WindowSampler:
    """Random windows of ``seq_len + 1`` tokens (inputs and shifted labels)."""

    def __init__(self, split: TokenSplit, seq_len: int, micro_batch_size: int, grad_accum: int = 1,
                 world_size: int = 1, rank: int = 0, seed: int = 0):
        if seq_len <= 0 or micro_batch_size <= 0 or grad_accum <= 0:
            raise ValueError("seq_len, micro_batch_size and grad_accum must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.shards = [s for s in split.shards if s.shape[0] > seq_len]
        if not self.shards:
            raise ValueError(f"no shard holds more than seq_len={seq_len} tokens ({split.num_tokens} tokens in all)")
        self.seq_len, self.micro, self.accum = seq_len, micro_batch_size, grad_accum
        self.world, self.rank, self.seed = world_size, rank, seed
        spans = np.array([s.shape[0] - seq_len for s in self.shards], dtype=np.float64)
        self._probs = spans / spans.sum()
        self._spans = spans.astype(np.int64)

    @property
    def global_batch_size(self) -> int:
        return self.world * self.accum * self.micro

    def positions(self, step: int) -> list[tuple[int, int]]:
        """(shard, offset) of every window of the step's global batch."""
        rng = np.random.default_rng([self.seed, step, 0x5EED])
        n = self.global_batch_size
        shard_idx = rng.choice(len(self.shards), size=n, p=self._probs) if len(self.shards) > 1 else np.zeros(n, int)
        offsets = (rng.random(n) * self._spans[shard_idx]).astype(np.int64)
        return list(zip(shard_idx.tolist(), offsets.tolist()))

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` int64 ``[micro_batch_size, seq_len]`` for this rank's micro-step."""
        if not 0 <= micro_step < self.accum:
            raise ValueError(f"micro_step {micro_step} outside [0, {self.accum})")
        start = (micro_step * self.world + self.rank) * self.micro
        pos = self.positions(step)[start : start + self.micro]
        rows = np.stack([_window(self.shards[s], o, self.seq_len + 1) for s, o in pos])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def eval_batches(split: TokenSplit, seq_len: int, batch_size: int, max_tokens: int, world_size: int = 1,
                 rank: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping held-out windows from the start of the split, up to ``max_tokens``.

    The window count is rounded down to a multiple of ``world_size * batch_size`` so every rank
    evaluates the same number of equal batches (a mean over ranks is then the global mean).
    """
    limit = max(1, max_tokens // seq_len)
    all_windows = ((shard, off) for shard in split.shards for off in range(0, shard.shape[0] - seq_len, seq_len))
    windows: list[tuple[np.memmap, int]] = list(itertools.islice(all_windows, limit))
    per = world_size * batch_size
    if len(windows) < per:
        raise ValueError(
            f"held-out split too small: {len(windows)} windows of {seq_len} tokens < world_size*batch_size={per}"
        )
    windows = windows[: len(windows) // per * per]
    mine = windows[rank::world_size]
    for i in range(0, len(mine), batch_size):
        rows = np.stack([_window(s, o, seq_len + 1) for s, o in mine[i : i + batch_size]])
        t = torch.from_numpy(rows)
        yield t[:, :-1].contiguous(), t[:, 1:].contiguous()
