"""CUDA graphs of the prefill, one per (batch, length) bucket.

A prefill of a few hundred tokens is a few milliseconds of GPU work behind hundreds of kernel
launches; launched one by one from Python it is bound by the host (tens of milliseconds for a 1.3B
model), and the server, which prefills between decode steps, inherits that. Here a prompt batch is
right-padded to the next bucket (rows to the next batch bucket, positions to the next length bucket)
and the whole forward is one graph replay. Padding is exact: padded positions get neutral gates (input
gate ``-inf``, forget gate ``+inf``), so each row's state and last hidden state are those of its own
tokens (see :meth:`Runner.forward_tokens`).

Each graph reads static buffers (token ids, lengths, the start state) and writes static buffers (the
last normed hidden state per row, the end state of every block in one flat row per sequence). The
graphs share one memory pool: only one replays at a time. A bucket is captured the first time it is
used (or ahead of time by :meth:`PrefillGraphs.capture`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import Tensor

from ..state import FlatState, PackedState, State, state_tensors
from . import kernels as K
from .cuda_graph import capture_graph
from .transfer import to_device

#: Prompt lengths of the graphs: ratios of at most 1.5 between neighbours (at most a third padded).
LENGTH_BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
#: Batch sizes of the graphs.
BATCH_BUCKETS = (1, 2, 4, 8)


def padding_mask(lengths: Tensor, s: int) -> Tensor:
    """``[b*s]`` bool: position ``p < lengths[row]`` of each row's ``s`` positions (right padding)."""
    pos = torch.arange(s, device=lengths.device)
    return (pos[None, :] < lengths[:, None]).view(-1)


class _Graph:
    """The static inputs and the CUDA graph of one (batch, length) bucket; ``start`` and ``end`` (the
    state buffers) are shared by the graphs of one batch size. Without ``capture`` (CPU) a replay runs
    the same forward eagerly on the same buffers."""

    def __init__(self, runner, batch: int, length: int, start: FlatState, end: FlatState, pool, capture: bool):
        dev = runner.device
        self.batch, self.length = batch, length
        self.ids = torch.zeros(batch, length, device=dev, dtype=torch.long)
        self.lengths = torch.full((batch,), length, device=dev, dtype=torch.long)
        self.start, self.end = start, end
        self.start_views = start.views(start.buffer)
        self.end_views = end.views(end.buffer)
        self.hidden = torch.zeros(batch, runner.config.embedding_dim, device=dev, dtype=runner.embedding.dtype)
        self.graph = None
        if capture:
            self.graph, _ = capture_graph(lambda: self._forward(runner), warmup=2, pool=pool)
        else:
            self._runner = runner

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._forward(self._runner)

    def _forward(self, runner) -> None:
        b, s = self.batch, self.length
        state: list = list(self.start_views)
        x, delta = runner.blocks(self.ids, state, padding_mask(self.lengths, s))
        torch._foreach_copy_(state_tensors(self.end_views), state_tensors(state))
        last = torch.arange(b, device=x.device) * s + self.lengths - 1
        x_last = x.index_select(0, last)
        x_last += delta.index_select(0, last)
        self.hidden.copy_(K.add_rmsnorm(x_last, None, runner.out_norm, runner.config.norm_eps))


class PrefillGraphs:
    """Bucketed CUDA graphs of :meth:`Runner.forward_tokens` for prompts of at most one prefill chunk.
    ``capture=False`` runs each bucket's forward eagerly on its static buffers (the CPU tests' way of
    checking the padding and buffer logic that the graphs replay)."""

    def __init__(self, runner, lengths: Sequence[int] = LENGTH_BUCKETS, batches: Sequence[int] = BATCH_BUCKETS,
                 capture: bool = True):
        self.runner = runner
        self.lengths = sorted(s for s in lengths if s <= runner.chunk_size)
        self.batches = sorted(batches)
        self.capture_graphs = capture
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._states: dict[int, tuple[FlatState, FlatState]] = {}
        self._pool = None

    def bucket(self, batch: int, length: int) -> tuple[int, int] | None:
        """The (batch, length) bucket of a prompt batch, or None when no graph fits it."""
        i = bisect.bisect_left(self.batches, batch)
        j = bisect.bisect_left(self.lengths, length)
        if i == len(self.batches) or j == len(self.lengths):
            return None
        return self.batches[i], self.lengths[j]

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    @torch.no_grad()
    def capture(self, batch: int, length: int) -> None:
        """Capture the graph of the bucket of ``(batch, length)`` now (else it is captured on first use)."""
        key = self.bucket(batch, length)
        if key is None:
            raise ValueError(f"no prefill graph bucket holds batch {batch}, length {length}")
        self._get(key)

    def _get(self, key: tuple[int, int]) -> _Graph:
        g = self._graphs.get(key)
        if g is None:
            r = self.runner
            if key[0] not in self._states:
                self._states[key[0]] = tuple(  # type: ignore[assignment]
                    FlatState(key[0], r.config.num_blocks, r.nh, r.dqk, r.dv, r.device) for _ in range(2))
            g = self._graphs[key] = _Graph(r, *key, *self._states[key[0]], self._pool, self.capture_graphs)
            if self._pool is None and g.graph is not None:
                self._pool = g.graph.pool()
        return g

    def run(self, ids: Tensor, state: list[State] | None, lengths: Sequence[int] | None
            ) -> tuple[Tensor, list[State]]:
        """:meth:`Runner.forward_tokens` of ``ids [b, S]`` by one graph replay (the caller checked
        :meth:`bucket`). Returns fresh tensors: the hidden state ``[b, D]`` and the new state (a
        :class:`~fastxlstm.state.PackedState`: one fresh ``[b, numel]`` buffer)."""
        b, s = ids.shape
        g = self._get(self.bucket(b, s))  # type: ignore[arg-type]
        g.ids[:b, :s].copy_(ids)
        lens = [s] * b if lengths is None else [int(n) for n in lengths]
        lens += [1] * (g.batch - b)  # unused rows: one token each
        g.lengths.copy_(to_device(lens, g.lengths.device))
        if state is None:
            g.start.buffer[:b].zero_()
        elif (isinstance(state, PackedState) and state.flat.shape == g.start.buffer[:b].shape
              and state.layout.shapes == g.start.shapes):
            g.start.buffer[:b].copy_(state.flat)  # the same layout: one copy
        else:
            torch._foreach_copy_([t[:b] for t in state_tensors(g.start_views)], state_tensors(state))
        g.replay()
        return g.hidden[:b].clone(), g.end.packed(g.end.buffer[:b].clone())
