"""The serving scheduler's ``SlotBackend`` interface (``prefill/load/read/release/decode``) over
:class:`~fastxlstm.engine.Engine`: fused kernels, chunked prefill and CUDA-graph decode for the
server without changing its scheduler (``fastxlstm.serving.slots.SlotBackend``)."""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import XLSTMForCausalLM
from ..sampling import MAX_STOP_TOKEN_IDS, SamplingParams
from ..state import State
from .engine import Engine
from .prefill_graph import PrefillGraphs
from .transfer import to_device

log = logging.getLogger("fastxlstm.serving")

# the server checks every stop condition on the host: the engine's own stops are disabled
_NO_STOPS = dict(max_new_tokens=1 << 40, ignore_eos=True, stop_token_ids=[], stop=[])


@dataclass
class Sampled:
    """Tokens sampled on the device for ``n`` sequences over ``steps`` steps: ``tokens [n, steps]``, and
    where asked for ``logprobs [n, steps]`` with the top alternatives ``top_logprobs`` / ``top_ids``
    ``[n, steps, MAX_LOGPROBS]`` (the model's log-softmax)."""

    tokens: Tensor
    logprobs: Tensor | None = None
    top_logprobs: Tensor | None = None
    top_ids: Tensor | None = None

    def rows(self, idx: Tensor) -> Sampled:
        pick = lambda t: None if t is None else t.index_select(0, idx)
        return Sampled(pick(self.tokens), pick(self.logprobs), pick(self.top_logprobs), pick(self.top_ids))

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.tokens, self.logprobs, self.top_logprobs, self.top_ids) if t is not None]


@dataclass
class PromptScores:
    """Scores of prompt tokens (host lists): ``logprobs[t]`` and ``ranks[t]`` of the token after position ``t``,
    ``top`` (where asked for): ``[(token_id, logprob), ...]`` per position, most likely first."""

    logprobs: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]] | None = None

    def extend(self, other: PromptScores) -> None:
        self.logprobs += other.logprobs
        self.ranks += other.ranks
        if other.top is not None:
            self.top = (self.top or []) + other.top


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

    def load(self, slot: int, state: list[State], params: SamplingParams | None = None,
             history: Sequence[int] = ()) -> None:
        """Make ``state`` the state of ``slot`` and configure its sampling (``params``, default greedy;
        ``history``: the prompt, for the repetition penalty). The engine's own stops are off: the
        caller checks EOS, stop ids and lengths on the host. Where the backend speculates they are on as well (the
        same conditions: :meth:`enable_speculation`'s EOS), so that no speculative step runs past a stop."""
        self.engine.set_slot_state(slot, state)
        base = params if params is not None else SamplingParams()
        if self.engine.spec is None:
            stops = _NO_STOPS
        else:  # (stop strings stay the caller's; too many stop ids for the device: those too)
            stops = dict(stop=[]) if len(base.stop_token_ids) < MAX_STOP_TOKEN_IDS else dict(stop=[], stop_token_ids=[])
        self.engine.configure_slot(slot, dataclasses.replace(base, **stops), history)

    def read(self, slot: int) -> list[State]:
        return self.engine.get_slot_state(slot)

    @torch.no_grad()
    def prefill_scored(self, tokens: Sequence[int], state: list[State] | None, next_token: int | None,
                       top_k: int = 0) -> tuple[Tensor | None, list[State], PromptScores]:
        """:meth:`prefill` that also scores the prompt on the device (the model's log-softmax, as
        :meth:`Runner.token_logprobs` computes it): position ``t`` scores ``tokens[t + 1]``, the last one
        ``next_token`` (the next piece's first token; None: the end of the prompt, nothing to score there).
        Returns the last logits (None when ``next_token`` is given), the new state and the scores (host lists,
        ``top_k`` alternatives each)."""
        eng = self.engine
        ids = eng._ids(list(tokens))[None]
        targets = eng._ids([*tokens[1:], 0 if next_token is None else next_token])[None]
        out = eng.runner.token_logprobs(ids, targets, None if state is None else eng._as_state(state),
                                        top_k=top_k, last_logits=next_token is None)
        n = len(tokens) - (next_token is None)
        tops = None
        if top_k:
            tops = [list(zip(i, v)) for i, v in zip(out.top_ids[0, :n].tolist(), out.top_logprobs[0, :n].tolist())]
        scores = PromptScores(out.logprobs[0, :n].tolist(), out.ranks[0, :n].tolist(), tops)
        return (None if out.last_logits is None else out.last_logits[0]), out.state, scores

    def set_masks(self, slots: Sequence[int], words: Tensor) -> None:
        """Grammar bitmasks of ``slots`` for their next sampled token (:meth:`SlotSampler.set_masks`)."""
        self.engine.sampler.set_masks(slots, words)

    def release(self, slot: int) -> None:
        self.engine.active[slot:slot + 1].zero_()  # a 0-dim write would wait for the GPU

    @torch.no_grad()
    def first_tokens(self, slots: Sequence[int], logits: Tensor, logprobs: bool = False) -> Sampled:
        """Sample each slot's first token from its prefill ``logits [n, V]`` on the device (the slots'
        own parameters, as :meth:`load` set them); the tokens become the slots' next decode inputs.
        Device tensors, no host read."""
        eng = self.engine
        tokens = eng.sample(list(slots), logits)
        if not logprobs:
            return Sampled(tokens[:, None])
        lp, top_v, top_i = eng.sampler.last_logprobs(to_device(list(slots), eng.device))
        return Sampled(tokens[:, None], lp[:, None], top_v[:, None], top_i[:, None])

    # ------------------------------------------------------------------ speculative decoding
    def enable_speculation(self, config, draft_model: XLSTMForCausalLM | None = None,
                           eos_token_id: int | None = None) -> None:
        """Speculative decoding (:meth:`Engine.enable_speculation`): :meth:`spec_window` from now on; the slots
        loaded from now on also stop on the device (at ``eos_token_id``, the caller's, stop ids and lengths)."""
        self.engine.enable_speculation(config, draft_model)
        self.engine.eos_token_id = self.engine.sampler.eos_token_id = eos_token_id

    @property
    def speculative(self):
        """The engine's :class:`~fastxlstm.engine.speculative.SpeculativeConfig` (None: no speculation)."""
        return None if self.engine.spec is None else self.engine.spec.config

    @property
    def spec_history(self) -> int:
        """The most tokens one slot may sample between two reads of :meth:`spec_window`."""
        return self.engine.history

    @torch.no_grad()
    def prefill_draft(self, slot: int, prefix: Sequence[int]) -> None:
        """The draft model's state of ``slot`` after ``prefix`` (the tokens before its pending one)."""
        self.engine.prefill_draft(slot, prefix)

    @torch.no_grad()
    def spec_window(self, slots: Sequence[int], steps: int, start: Sequence[int],
                    drafts: dict[int, Sequence[int]] | None = None) -> tuple[list, list[tuple[int, int, int]]]:
        """``steps`` speculative steps (:meth:`Engine.spec_step`) of exactly ``slots`` (``drafts``: slot -> host
        drafts for the first step, the n-gram drafter's; None with a draft model), then one read: per slot the
        tokens it sampled from position ``start`` on (the tokens the caller has: :class:`SlotRead`, logprobs
        where its parameters ask for them) and the window's ``(steps, drafted, accepted)`` counts."""
        if not slots or steps < 1:
            raise ValueError("spec_window needs at least one slot and steps >= 1")
        eng, spec = self.engine, self.engine.spec
        if spec is None:
            raise RuntimeError("speculative decoding is not enabled on this backend")
        ridx = to_device(list(slots), eng.device)
        before = torch.stack([spec.steps[ridx], spec.drafted[ridx], spec.accepted[ridx]], 1)
        eng.spec_step(drafts, slots=slots)
        for _ in range(steps - 1):
            eng.spec_step()
        counts = torch.stack([spec.steps[ridx], spec.drafted[ridx], spec.accepted[ridx]], 1) - before
        reads = eng.read_tokens(slots, start)
        return reads, [tuple(c) for c in counts.tolist()]

    @torch.no_grad()
    def decode_window(self, slots: Sequence[int], steps: int, logprobs: bool = False) -> Sampled:
        """``steps`` decode steps for ``slots``, each slot fed its last sampled token on the device and
        sampled with its own parameters (one CUDA-graph replay per step); tokens ``[n, steps]`` and, with
        ``logprobs``, their log-probabilities and top alternatives, as device tensors (the caller's one
        host read; :meth:`Engine.decode_steps`: one graph replay per step, the tokens gathered once at the end). A
        window may follow one whose tokens the caller has not read yet."""
        if not slots or steps < 1:
            raise ValueError("decode_window needs at least one slot and steps >= 1")
        eng = self.engine
        parts = [eng.decode_steps(slots, min(eng.history, steps - i), logprobs=logprobs)
                 for i in range(0, steps, eng.history)]  # (windows longer than the sampler's ring: in pieces)
        if len(parts) == 1:
            return Sampled(*parts[0])
        return Sampled(*(None if p[0] is None else torch.cat(p, 1) for p in zip(*parts)))
