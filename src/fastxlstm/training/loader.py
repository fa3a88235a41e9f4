"""Training batches, deterministic per (seed, step, rank): fixed-length windows drawn from token
shards (pretraining), or whole chat/instruction documents with their loss masks (fine-tuning).

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


class _StepBatches:
    """What both samplers share: the sizes, the step's global batch of ``world * grad_accum *
    micro_batch_size`` rows, and the slice of it one rank's micro-step takes (the module docstring's layout)."""

    def __init__(self, seq_len: int, micro_batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int):
        if seq_len <= 0 or micro_batch_size <= 0 or grad_accum <= 0:
            raise ValueError("seq_len, micro_batch_size and grad_accum must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.seq_len, self.micro, self.accum = seq_len, micro_batch_size, grad_accum
        self.world, self.rank, self.seed = world_size, rank, seed

    @property
    def global_batch_size(self) -> int:
        return self.world * self.accum * self.micro

    def _micro_slice(self, rows: list, micro_step: int) -> list:
        """This rank's rows of micro-step ``micro_step``, out of the step's global batch ``rows``."""
        if not 0 <= micro_step < self.accum:
            raise ValueError(f"micro_step {micro_step} outside [0, {self.accum})")
        start = (micro_step * self.world + self.rank) * self.micro
        return rows[start : start + self.micro]


class WindowSampler(_StepBatches):
    """Random windows of ``seq_len + 1`` tokens (inputs and shifted labels)."""

    def __init__(self, split: TokenSplit, seq_len: int, micro_batch_size: int, grad_accum: int = 1,
                 world_size: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(seq_len, micro_batch_size, grad_accum, world_size, rank, seed)
        self.shards = [s for s in split.shards if s.shape[0] > seq_len]
        if not self.shards:
            raise ValueError(f"no shard holds more than seq_len={seq_len} tokens ({split.num_tokens} tokens in all)")
        spans = np.array([s.shape[0] - seq_len for s in self.shards], dtype=np.float64)
        self._probs = spans / spans.sum()
        self._spans = spans.astype(np.int64)

    def targets(self, step: int) -> int:
        """Labels in the step's global batch (all are trained)."""
        return self.global_batch_size * self.seq_len

    tokens = targets

    def positions(self, step: int) -> list[tuple[int, int]]:
        """(shard, offset) of every window of the step's global batch."""
        rng = np.random.default_rng([self.seed, step, 0x5EED])
        n = self.global_batch_size
        shard_idx = rng.choice(len(self.shards), size=n, p=self._probs) if len(self.shards) > 1 else np.zeros(n, int)
        offsets = (rng.random(n) * self._spans[shard_idx]).astype(np.int64)
        return list(zip(shard_idx.tolist(), offsets.tolist()))

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` int64 ``[micro_batch_size, seq_len]`` for this rank's micro-step."""
        pos = self._micro_slice(self.positions(step), micro_step)
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


# ------------------------------------------------------------------ chat / instruction documents
IGNORE_INDEX = -100  # labels that are not trained (F.cross_entropy's ignore_index)


def document_rows(doc, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of one document, at most ``seq_len`` positions (longer ones are cut at the
    end); labels not to train on are ``IGNORE_INDEX``."""
    ids, mask = doc
    ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    labels = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    return ids[:-1], labels


def pad_documents(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence per document, right-padded to the longest (padding is never a label). The model
    starts every row from the zero state, so no state flows from one document into another, and
    right padding is exact: a causal model's outputs at a position do not depend on later tokens."""
    width = max(x.size for x, _ in rows)
    x = np.full((len(rows), width), pad_id, dtype=np.int64)
    y = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    for r, (xi, yi) in enumerate(rows):
        x[r, : xi.size], y[r, : yi.size] = xi, yi
    return torch.from_numpy(x), torch.from_numpy(y)


class DocumentSampler(_StepBatches):
    """Micro-batches of whole chat/instruct documents, deterministic per (seed, step, rank).

    Every epoch the documents are shuffled (a generator seeded by ``(seed, epoch)``) and packed in
    that order into rows of ``seq_len`` positions: a document goes into the current row if it fits,
    else it starts the next one; no document crosses a row. Step ``s`` takes rows
    ``[s * G, (s + 1) * G)`` of the epochs laid end to end, ``G = world * grad_accum *
    micro_batch_size``, split over micro-steps and ranks as :class:`WindowSampler` does. For the
    forward pass a row is split at its document boundaries (:func:`pad_documents`), so each document
    starts from the zero state. Documents longer than ``seq_len + 1`` tokens are cut at the end.
    """

    def __init__(self, docs, seq_len: int, micro_batch_size: int, grad_accum: int = 1, world_size: int = 1,
                 rank: int = 0, seed: int = 0, pad_id: int = 0):
        super().__init__(seq_len, micro_batch_size, grad_accum, world_size, rank, seed)
        self.docs, self.pad_id = docs, pad_id
        lengths = np.minimum(docs.index[:, 2], seq_len + 1)
        targets = np.asarray([docs.document(i)[1][1 : lengths[i]].sum() for i in range(len(docs))], np.int64)
        self._keep = np.flatnonzero(targets > 0)  # documents with nothing to train on are skipped
        if self._keep.size == 0:
            raise ValueError("no document has a trained token within seq_len")
        self._positions, self._targets = lengths[self._keep] - 1, targets[self._keep]
        self.truncated = int((docs.index[self._keep, 2] > seq_len + 1).sum())
        self._epochs: list[list[list[int]]] = []  # per epoch: rows, each a list of document ids

    def _epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            rng = np.random.default_rng([self.seed, len(self._epochs), 0xD0C5])
            rows: list[list[int]] = []
            used = self.seq_len
            for j in rng.permutation(self._keep.size).tolist():
                if used + self._positions[j] > self.seq_len:
                    rows.append([])
                    used = 0
                rows[-1].append(j)
                used += int(self._positions[j])
            self._epochs.append(rows)
        return self._epochs[e]

    def rows(self, step: int) -> list[list[int]]:
        """The document ids (indices into the kept documents) of every row of the step's global batch."""
        g = self.global_batch_size
        start, out, e = step * g, [], 0
        while len(out) < g:
            rows = self._epoch(e)
            if start < len(rows):
                out.extend(rows[start : start + g - len(out)])
                start = 0
            else:
                start -= len(rows)
            e += 1
        return out

    def targets(self, step: int) -> int:
        """Trained labels in the step's whole global batch (the loss is their mean)."""
        return int(sum(self._targets[j] for row in self.rows(step) for j in row))

    def tokens(self, step: int) -> int:
        """Input positions (documents' tokens, no padding) in the step's global batch."""
        return int(sum(self._positions[j] for row in self.rows(step) for j in row))

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` int64 ``[documents, longest]`` for this rank's micro-step."""
        mine = self._micro_slice(self.rows(step), micro_step)
        docs = [document_rows(self.docs.document(int(self._keep[j])), self.seq_len) for row in mine for j in row]
        return pad_documents(docs, self.pad_id)


def eval_documents(docs, seq_len: int, batch_size: int, max_tokens: int, world_size: int = 1, rank: int = 0,
                   pad_id: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out documents in order, ``batch_size`` per batch, until ``max_tokens`` positions; rank
    ``r`` takes documents ``r, r + world_size, ...`` (the caller sums losses and label counts). The
    document count is rounded down to a multiple of ``world_size``."""
    rows, used = [], 0
    for i in range(len(docs)):
        if used >= max_tokens:
            break
        rows.append(document_rows(docs.document(i), seq_len))
        used += rows[-1][0].size
    if len(rows) < world_size:
        raise ValueError(f"held-out split too small: {len(rows)} documents < world_size={world_size}")
    mine = rows[: len(rows) // world_size * world_size][rank::world_size]  # equal batch counts on every rank
    for i in range(0, len(mine), batch_size):
        yield pad_documents(mine[i : i + batch_size], pad_id)
