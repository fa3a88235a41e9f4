"""The engine's slot backend as the scheduler uses it: :class:`fastxlstm.engine.EngineSlotBackend` whose
multi-step window also takes its first inputs as a device tensor, so the scheduler can queue a window
behind one whose tokens it has not read yet (no host round trip between the two)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine.backend import EngineSlotBackend
from .slots import chosen_logprobs


class EngineSlots(EngineSlotBackend):
    @torch.no_grad()
    def decode_greedy(self, slots: Sequence[int], tokens: Sequence[int] | Tensor, steps: int, logprobs: bool = False
                      ) -> Tensor | tuple[Tensor, Tensor]:
        """``steps`` greedy steps, each sampled token fed back on the device; tokens ``[n, steps]`` (device,
        no host read) and, with ``logprobs``, their log-probabilities. ``tokens`` (the first inputs) may be
        a device tensor."""
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
