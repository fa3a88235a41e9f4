"""The serving scheduler's ``SlotBackend`` interface (``prefill/load/read/release/decode``) over
:class:`~fastxlstm.engine.Engine`: fused kernels, chunked prefill and CUDA-graph decode for the
server without changing its scheduler (``fastxlstm.serving.slots.SlotBackend``)."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence

import torch
from torch import Tensor

from ..generation.sampling import SamplingParams
from ..model import XLSTMForCausalLM
from ..state import State
from .engine import Engine
from .prefill_graph import PrefillGraphs
from .transfer import to_device

log = logging.getLogger("fastxlstm.serving")

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

    @property
    def _graphs(self) -> PrefillGraphs | None:
        return self.engine.runner.prefill_graphs

    @property
    def prefill_max_batch(self) -> int | None:
        """Most prompts in one batched prefill: the largest prefill-graph batch (None without graphs)."""
        graphs = self._graphs
        return max(graphs.batches) if graphs is not None else None

    def prefill_cost(self, batch: int, length: int) -> int:
        """Token positions the device computes for ``batch`` prompts padded to ``length``: the whole
        (batch, length) bucket when a prefill graph holds it (its padding is computed too), else
        ``batch * length``."""
        graphs = self._graphs
        key = graphs.bucket(batch, length) if graphs is not None else None
        return key[0] * key[1] if key is not None else batch * length

    def prefill_buckets(self, budget: int) -> list[tuple[int, int]]:
        """The prefill-graph buckets a scheduler with a prefill budget of ``budget`` tokens per iteration
        can meet: one prompt (or piece of one) of at most ``budget`` tokens, and groups whose bucket costs
        at most ``budget`` (:meth:`prefill_cost`)."""
        graphs = self._graphs
        if graphs is None:
            return []
        single = graphs.bucket(1, min(budget, max(graphs.lengths)))
        keys = {(1, n) for n in graphs.lengths if single is not None and n <= single[1]}
        keys |= {(b, n) for b in graphs.batches for n in graphs.lengths if b > 1 and b * n <= budget}
        return sorted(keys)

    def capture_prefill_graphs(self, budget: int) -> list[tuple[int, int]]:
        """Capture now every prefill graph of :meth:`prefill_buckets` (else each is captured, Triton
        compiles included, inside the first request that needs it). Returns the buckets captured."""
        graphs = self._graphs
        keys = self.prefill_buckets(budget)
        try:
            for b, n in keys:
                graphs.capture(b, n)  # type: ignore[union-attr]
        except Exception:  # serve without prefill graphs (eager, host-bound prefill) rather than not at all
            log.warning("capturing the prefill graphs failed; prefilling eagerly:\n%s", traceback.format_exc())
            self.engine.runner.prefill_graphs = None
            return []
        if keys and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return keys

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
        from ..state import split_state, stack_states

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
        from ..generation.logprobs import chosen_logprobs

        if len(slots) != len(tokens) or not slots or steps < 1:
            raise ValueError("decode_greedy needs one token per slot, at least one slot and steps >= 1")
        eng = self.engine
        # The engine runs its slots in ascending order: the first step lists them (and feeds ``tokens``),
        # the later ones replay the same set with the tokens it sampled (``slots=None``: no host work per
        # slot); the rows go back to the caller's order once, at the end.
        order = sorted(range(len(slots)), key=lambda j: slots[j])
        ordered = [int(slots[j]) for j in order]
        same = order == list(range(len(order)))
        if isinstance(tokens, Tensor):
            feed = tokens if same else tokens.index_select(0, to_device(order, tokens.device))
        else:
            feed = [int(tokens[j]) for j in order]
        out, lps = [], []
        step = eng.decode_step(ordered, feed, return_logits=logprobs)
        for i in range(steps):
            if i:
                step = eng.decode_step(None, return_logits=logprobs)
            out.append(step.tokens)
            if logprobs:
                lps.append(chosen_logprobs(step.logits, step.tokens))
        toks = torch.stack(out, 1)
        lp = torch.stack(lps, 1) if logprobs else None
        if not same:
            back = [0] * len(order)
            for pos, j in enumerate(order):
                back[j] = pos
            idx = to_device(back, toks.device)
            toks = toks.index_select(0, idx)
            lp = lp.index_select(0, idx) if lp is not None else None
        return (toks, lp) if logprobs else toks
