"""Sequence slots on top of the model: each slot holds one sequence's recurrent state.

The scheduler talks to this narrow interface only (``prefill``, ``load``, ``read``, ``decode``),
so it can sit on another slot engine later. Slot states are rows of batched state tensors.
A decode step over the active slots either gathers their rows (few active) or runs the whole
slot batch (most active, and every live slot is in the step; the free rows compute on stale
states nobody owns and are overwritten when a sequence takes the slot). A prefill runs with
one prompt (or several: of exactly one length with :meth:`ModelSlots.prefill_batch`; right-padded
to the longest with the engine's backend, whose ``prefill_padded`` pads with neutral gates that leave
each row's state as its last real token left it) and never touches a slot until :meth:`load`
writes its final state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from ..generation.logprobs import chosen_logprobs
from ..state import ModelState, split_state, stack_states, state_nbytes


class SlotBackend(Protocol):
    """What the scheduler needs from an engine."""

    max_slots: int
    vocab_size: int
    device: torch.device

    def prefill(self, tokens: Sequence[int], state: ModelState | None) -> tuple[Tensor, ModelState]:
        """Run ``tokens`` (batch 1) from ``state`` (None: the zero state); return last logits ``[V]`` and state."""

    def load(self, slot: int, state: ModelState) -> None:
        """Make ``state`` the state of ``slot``."""

    def read(self, slot: int) -> ModelState:
        """A copy of the state of ``slot`` (batch 1)."""

    def release(self, slot: int) -> None:
        """``slot`` no longer holds a sequence."""

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> Tensor:
        """Feed one token to each slot; return logits ``[len(slots), V]`` and advance their states."""


class BatchedSlotBackend(SlotBackend, Protocol):
    """Optional extras a backend may offer; the scheduler uses them when present (``hasattr``)."""

    def prefill_batch(self, tokens: Sequence[Sequence[int]], states: Sequence[ModelState | None]
                      ) -> tuple[Tensor, list[ModelState]]:
        """Prefill prompts of one length together (states all None or all given); logits ``[n, V]``, states."""

    def decode_greedy(self, slots: Sequence[int], tokens: Sequence[int] | Tensor, steps: int, logprobs: bool = False
                      ) -> Tensor | tuple[Tensor, Tensor]:
        """``steps`` greedy decode steps, each argmax fed back on the device; tokens ``[n, steps]`` (no host
        read) and, with ``logprobs``, their float32 log-probabilities ``[n, steps]``. The input ``tokens`` may
        be a device tensor (the scheduler launches a window behind one whose tokens it has not read)."""


def warm_prefill(backend: SlotBackend, max_len: int, force: bool = False, budget: int | None = None) -> int:
    """Before the first request: capture the backend's prefill CUDA graphs for every bucket a scheduler
    with a prefill budget of ``budget`` (default ``max_len``) tokens can use (``capture_prefill_graphs``,
    where the backend has it), then run the prefill once per shape class the server meets that no graph
    holds (lengths around 16..2048, with and without a start state, one and two prompts), so that neither
    a graph capture nor a Triton compile (seconds each) stalls a request. GPU backends only unless
    ``force``. Returns the graphs captured plus the prefills run."""
    if not force and getattr(backend, "device", torch.device("cpu")).type != "cuda":
        return 0
    runs, graphed = 0, 0
    capture = getattr(backend, "capture_prefill_graphs", None)
    if capture is not None:
        keys = capture(budget or max_len)
        runs += len(keys)
        graphed = max((n for b, n in keys if b == 1), default=0)  # these lengths replay graphs: nothing to compile
    lengths = sorted({n for b in (16, 64, 256, 1024, 2048, 4096) for n in (b - 1, b) if graphed < n <= max_len}
                     | ({1, 2} if not graphed else set()))
    for n in lengths:
        ids = [(7 * t + 3) % backend.vocab_size for t in range(n)]
        _, state = backend.prefill(ids, None)
        backend.prefill(ids[: max(1, n // 2)], state)  # continuing a state (prefix-cache hits, split prompts)
        runs += 2
        if hasattr(backend, "prefill_batch") and n <= 256:
            backend.prefill_batch([ids, ids], [None, None])
            runs += 1
        if getattr(backend, "prefill_padded", False) and n > 1:  # different lengths: the padding-mask variants
            backend.prefill_batch([ids, ids[: max(1, n * 4 // 5)]], [None, None])
            runs += 1
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
    return runs


class ModelSlots:
    """:class:`SlotBackend` over an :class:`~fastxlstm.model.XLSTMForCausalLM` (batched model calls)."""

    def __init__(self, model, max_slots: int, full_batch_fraction: float = 0.5):
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.model = model
        self.max_slots = max_slots
        self.vocab_size = model.config.vocab_size
        self.device = model.device
        self.full_batch_fraction = full_batch_fraction
        with torch.inference_mode():
            _, probe = model(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        self.state: ModelState = [
            tuple(torch.zeros((max_slots, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in layer)
            for layer in probe
        ]
        self.live: set[int] = set()  # slots holding a sequence
        self.state_bytes_per_slot = state_nbytes(self.state) // max_slots

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int], state: ModelState | None) -> tuple[Tensor, ModelState]:
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        logits, new_state = self.model(ids, state, last_logits_only=True)
        return logits[0, -1], new_state

    @torch.inference_mode()
    def prefill_batch(self, tokens: Sequence[Sequence[int]], states: Sequence[ModelState | None]
                      ) -> tuple[Tensor, list[ModelState]]:
        if not tokens or len({len(t) for t in tokens}) != 1 or len(states) != len(tokens):
            raise ValueError("prefill_batch needs prompts of one length and one state (or None) each")
        ids = torch.tensor([list(t) for t in tokens], dtype=torch.long, device=self.device)
        logits, new_state = self.model(ids, stack_states(states, self.device), last_logits_only=True)
        return logits[:, -1], split_state(new_state, len(tokens))

    @torch.inference_mode()
    def load(self, slot: int, state: ModelState) -> None:
        for dst_layer, src_layer in zip(self.state, state):
            for dst, src in zip(dst_layer, src_layer):
                dst[slot].copy_(src[0])
        self.live.add(slot)

    def release(self, slot: int) -> None:
        self.live.discard(slot)

    @torch.inference_mode()
    def read(self, slot: int) -> ModelState:
        return [tuple(t[slot: slot + 1].clone() for t in layer) for layer in self.state]

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> Tensor:
        if len(slots) != len(tokens) or not slots:
            raise ValueError("decode needs one token per slot and at least one slot")
        return self._decode(slots, torch.tensor(list(tokens), dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def decode_greedy(self, slots: Sequence[int], tokens: Sequence[int], steps: int, logprobs: bool = False
                      ) -> Tensor | tuple[Tensor, Tensor]:
        if len(slots) != len(tokens) or not slots or steps < 1:
            raise ValueError("decode_greedy needs one token per slot, at least one slot and steps >= 1")
        tok = torch.as_tensor(tokens if isinstance(tokens, Tensor) else list(tokens), dtype=torch.long,
                              device=self.device)
        out, lps = [], []
        for _ in range(steps):
            logits = self._decode(slots, tok)
            tok = logits.argmax(dim=-1)
            out.append(tok)
            if logprobs:
                lps.append(chosen_logprobs(logits, tok))
        return (torch.stack(out, 1), torch.stack(lps, 1)) if logprobs else torch.stack(out, 1)

    def _decode(self, slots: Sequence[int], tok: Tensor) -> Tensor:
        idx = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        if len(slots) >= self.full_batch_fraction * self.max_slots and self.live.issubset(slots):
            # whole slot batch: free rows get token 0 and compute on states nobody owns
            full = torch.zeros(self.max_slots, dtype=torch.long, device=self.device).index_copy_(0, idx, tok)
            logits, new_state = self.model(full[:, None], self.state)
            self.state = new_state  # committed only after the step succeeded
            return logits[:, -1].index_select(0, idx)
        sub = [tuple(t.index_select(0, idx) for t in layer) for layer in self.state]
        logits, new_sub = self.model(tok[:, None], sub)
        for layer, new_layer in zip(self.state, new_sub):
            for t, new in zip(layer, new_layer):
                t.index_copy_(0, idx, new)
        return logits[:, -1]
