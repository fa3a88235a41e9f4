"""The serving scheduler's ``SlotBackend`` interface (``prefill/load/read/release/decode``) over
:class:`~fastxlstm.engine.Engine`: fused kernels, chunked prefill and CUDA-graph decode for the
server without changing its scheduler (``fastxlstm.serving.slots.SlotBackend``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..model import XLSTMForCausalLM
from ..ops import State
from .engine import Engine


class EngineSlotBackend:
    """Every slot of an :class:`Engine`, addressed directly by the caller's slot numbers."""

    def __init__(self, model: XLSTMForCausalLM, max_slots: int, **engine_kwargs):
        self.engine = Engine(model, max_slots=max_slots, **engine_kwargs)
        self.max_slots = max_slots
        self.vocab_size = model.config.vocab_size
        self.device = self.engine.device
        for _ in range(max_slots):
            self.engine.allocate_slot()

    @torch.no_grad()
    def prefill(self, tokens: Sequence[int], state: list[State] | None) -> tuple[Tensor, list[State]]:
        """Last logits ``[V]`` and the new state of ``tokens`` run from ``state`` (batch 1, chunked)."""
        eng = self.engine
        ids = eng._ids(list(tokens))[None]
        hidden, new_state = eng.runner.forward_tokens(ids, None if state is None else eng._as_state(state))
        return eng.runner.logits(hidden)[0], new_state

    def load(self, slot: int, state: list[State]) -> None:
        self.engine.set_slot_state(slot, state)

    def read(self, slot: int) -> list[State]:
        return self.engine.get_slot_state(slot)

    def release(self, slot: int) -> None:
        self.engine.active[slot] = False

    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> Tensor:
        """One step for ``slots`` fed ``tokens``; float32 logits ``[n, V]`` (other slots untouched)."""
        if len(slots) != len(tokens) or not slots:
            raise ValueError("decode needs one token per slot and at least one slot")
        out = self.engine.decode_step(list(slots), list(tokens), return_logits=True)
        return out.logits
