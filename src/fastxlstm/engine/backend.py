"""The serving scheduler's ``SlotBackend`` interface (``prefill/load/read/release/decode``) over
:class:`~fastxlstm.engine.Engine`: fused kernels, chunked prefill and CUDA-graph decode for the
server without changing its scheduler (``fastxlstm.serving.slots.SlotBackend``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..generation.sampling import SamplingParams
from ..model import XLSTMForCausalLM
from ..ops import State
from .engine import Engine

# the server checks every stop condition on the host: the engine's own stops are disabled
_GREEDY = SamplingParams(max_new_tokens=1 << 40, ignore_eos=True)


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

    # prompts of different lengths may share one forward (right padding with neutral gates)
    prefill_padded = True

    @torch.no_grad()
    def prefill_batch(self, tokens: Sequence[Sequence[int]], states: Sequence[list[State] | None]
                      ) -> tuple[Tensor, list[list[State]]]:
        """Prompts in one forward, right-padded to the longest (the pads get neutral gates and leave the
        state untouched, so each row computes what it would alone); start states all None or all given.
        Returns the logits after each prompt's last token ``[n, V]`` and batch-1 states (views of one
        batched state: copy before keeping them past the next prefill, as the prefix cache does)."""
        from ..serving.slots import split_state, stack_states

        if not tokens or len(states) != len(tokens) or not all(len(t) for t in tokens):
            raise ValueError("prefill_batch needs non-empty prompts and one state (or None) each")
        eng = self.engine
        lengths = [len(t) for t in tokens]
        width = max(lengths)
        flat = [t for row in tokens for t in (*row, *(0,) * (width - len(row)))]  # right-padded with id 0
        ids = eng._ids(flat).view(len(tokens), width)  # the engine's id check and non-blocking copy
        start = stack_states([None if s is None else eng._as_state(s) for s in states], eng.device)
        hidden, new_state = eng.runner.forward_tokens(ids, start, lengths if min(lengths) < width else None)
        return eng.runner.logits(hidden), split_state(new_state, len(tokens), copy=False)

    def load(self, slot: int, state: list[State]) -> None:
        self.engine.set_slot_state(slot, state)
        self.engine.configure_slot(slot, _GREEDY)

    def read(self, slot: int) -> list[State]:
        return self.engine.get_slot_state(slot)

    def release(self, slot: int) -> None:
        self.engine.active[slot:slot + 1].zero_()  # a 0-dim write would wait for the GPU

    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> Tensor:
        """One step for ``slots`` fed ``tokens``; float32 logits ``[n, V]`` (other slots untouched)."""
        if len(slots) != len(tokens) or not slots:
            raise ValueError("decode needs one token per slot and at least one slot")
        out = self.engine.decode_step(list(slots), list(tokens), return_logits=True)
        return out.logits

    @torch.no_grad()
    def decode_greedy(self, slots: Sequence[int], tokens: Sequence[int] | Tensor, steps: int, logprobs: bool = False
                      ) -> Tensor | tuple[Tensor, Tensor]:
        """``steps`` greedy steps, the engine feeding each sampled token back on the device; tokens
        ``[n, steps]`` as a device tensor (the caller's one host read) and, with ``logprobs``, their
        log-probabilities ``[n, steps]``. Needs the slots configured greedy, which :meth:`load` does.
        ``tokens`` (the first inputs) may be a device tensor, e.g. the last column of a window whose
        tokens the caller has not read yet: the next window queues behind it with no host round trip."""
        from ..serving.slots import chosen_logprobs

        if len(slots) != len(tokens) or not slots or steps < 1:
            raise ValueError("decode_greedy needs one token per slot, at least one slot and steps >= 1")
        slots = list(slots)
        feed = tokens if isinstance(tokens, Tensor) else list(tokens)
        out, lps = [], []
        for _ in range(steps):  # explicit slots keep every row running (the stops are the host's)
            step = self.engine.decode_step(slots, feed, return_logits=logprobs)
            feed = None  # later steps feed the token sampled on the device
            out.append(step.tokens)
            if logprobs:
                lps.append(chosen_logprobs(step.logits, step.tokens))
        return (torch.stack(out, 1), torch.stack(lps, 1)) if logprobs else torch.stack(out, 1)
