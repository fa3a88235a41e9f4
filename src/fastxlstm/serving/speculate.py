"""Speculative decoding in the server (``fastxlstm serve --speculative-config``, ``ServeConfig.speculative_config``).

:meth:`Speculator.run` replaces an iteration's decode window when the backend speculates: it reads every token
in flight first (the drafter needs them, and each choice's ``fed`` must be exact before the window), then runs a
window of speculative steps (:meth:`~fastxlstm.engine.backend.EngineSlotBackend.spec_window`: the engine's
``spec_step``, verification and commit on the device) over the running choices and hands out what each emitted
(1 to ``k + 1`` tokens per step) through the scheduler's own emit path. A speculating backend's slots also stop on
the device at EOS, stop ids and ``max_tokens`` (the host's conditions), so no step runs past them and the state
at a turn's end is exact (the prefix cache); stop strings end a choice on the HTTP side, as without speculation.

Every request speculates, greedy or sampled: each position is sampled from the target with the plain path's
sampler and RNG stream and a draft is accepted when it equals that token (the engine's rejection rule for a
point-mass proposal), so seeded output is the plain path's.

- n-gram: a per-choice :class:`~fastxlstm.engine.speculative.NgramIndex` over the prompt and the tokens read so
  far proposes up to ``k`` tokens; one step per window (the next drafts need its tokens). When no choice has a
  draft the iteration runs the plain multi-step decode window instead (1 step after a read that found drafts,
  doubling with each read that found none, at most ``min(decode_steps_per_read, k)``:
  :class:`~fastxlstm.engine.llm.PlainWindows`).
- draft model: the engine drafts on the device; up to ``decode_steps_per_read`` steps per window (at most
  ``history / (k + 1)``). A choice whose tokens came from plain windows meanwhile gets its draft state rebuilt
  from its tokens first.

A batch holding a choice under a grammar (structured output: each token's mask needs the previous token on the
host) decodes without speculation while that choice runs. The speculative windows are read at once (no overlap
with the next window). Counters (vLLM's names): ``vllm:spec_decode_num_drafts`` (a choice's speculative steps
with drafted tokens), ``vllm:spec_decode_num_draft_tokens``, ``vllm:spec_decode_num_accepted_tokens`` (drafts
that became output).
"""

from __future__ import annotations

import logging
import time
import traceback

from ..engine.llm import PlainWindows
from ..engine.speculative import NgramIndex, SpeculativeConfig
from .inflight import runnable
from .requests import Choice, GenerationRequest

log = logging.getLogger("fastxlstm.serving")


class Speculator:
    """The speculative windows of one scheduler over a backend that speculates (``backend.speculative``)."""

    def __init__(self, backend, steps_per_read: int):
        self.backend = backend
        self.config: SpeculativeConfig = backend.speculative
        self.k = k = self.config.num_speculative_tokens
        self.ngram = self.config.method == "ngram"
        self.steps_per_read = steps_per_read
        self.max_steps = max(1, min(steps_per_read, backend.spec_history // (k + 1)))
        self.idle = PlainWindows(min(steps_per_read, k))  # (n-gram) plain windows while nobody has a draft
        # slot -> (the choice it serves, its n-gram index | the number of its tokens the draft state is at)
        self._seen: dict[int, tuple[Choice, NgramIndex | int]] = {}

    def run(self, core) -> bool:
        """One speculative window over ``core``'s running choices; False: this iteration decodes without
        speculation (nothing to run, a grammar in the batch, or no n-gram draft for anyone)."""
        active, _ = runnable(core.running)
        if not active or any(c.matcher is not None for c in active):
            return False
        core._drain()  # every token read: the drafter sees them all and each choice's fed is exact
        active, owners = runnable(core.running)
        if not active:
            return False
        drafts = None
        if self.ngram:
            drafts = {c.slot: d for c, r in zip(active, owners) if (d := self._propose(c, r))}
            self.idle.drafted(bool(drafts))
            if not drafts:
                return False
            steps = 1
        else:
            for c, r in zip(active, owners):
                self._sync_draft(c, r)
            steps = max(1, min(self.max_steps, max(c.steps_left for c in active)))
        try:
            self._window(core, active, owners, steps, drafts)
            return True
        except Exception:
            log.warning("batched speculative step failed; retrying per sequence:\n%s", traceback.format_exc())
        for c, r in zip(active, owners):
            if c.done:
                continue
            try:
                self._window(core, [c], [r], 1, None if drafts is None else {c.slot: drafts.get(c.slot, [])})
            except Exception as e:
                core._fail(r, e)
        return True

    def plain_steps(self) -> int:
        """Decode steps per read of the iteration's plain window (n-gram: :class:`PlainWindows`)."""
        return self.idle.steps if self.ngram else self.steps_per_read

    # ------------------------------------------------------------------------------------ drafters
    def _propose(self, c: Choice, req: GenerationRequest) -> list[int]:
        """The n-gram drafts of ``c`` (its index follows the prompt and every token read)."""
        entry = self._seen.get(c.slot)
        if entry is None or entry[0] is not c:
            index = NgramIndex(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
            index.extend(req.prompt)
            self._seen[c.slot] = (c, index)
        else:
            index = entry[1]
        index.extend(c.generated[len(index.tokens) - len(req.prompt):])
        return index.propose(self.k)  # (the engine stops the slot at its max_tokens, inside a step too)

    def _sync_draft(self, c: Choice, req: GenerationRequest) -> None:
        """Make the draft model's state of ``c``'s slot the state after its tokens before the pending one
        (a new choice, or one whose tokens came from plain windows since its last speculative window)."""
        entry = self._seen.get(c.slot)
        if entry is None or entry[0] is not c or entry[1] != len(c.generated):
            self.backend.prefill_draft(c.slot, req.prompt + c.generated[:-1])

    # -------------------------------------------------------------------------------------- window
    def _window(self, core, active: list[Choice], owners: list[GenerationRequest], steps: int,
                drafts: dict[int, list[int]] | None) -> None:
        reads, counts = self.backend.spec_window([c.slot for c in active], steps, [len(c.generated) for c in active],
                                                 drafts)
        core.prof.lap("spec_wait")
        now = time.monotonic()
        m = core.metrics
        emitted = 0
        for c, req, rd, (n_steps, drafted, accepted) in zip(active, owners, reads, counts):
            c.fed += len(rd.new_tokens)  # what the slot's state now holds (each emitted token but the last)
            if drafted:
                m.spec_drafts.inc(n_steps)
                m.spec_draft_tokens.inc(drafted)
                m.spec_accepted_tokens.inc(accepted)
            want_lp = c.params.logprobs is not None
            for i, token in enumerate(rd.new_tokens):
                if c.done:
                    break
                core._emit(c, req, token, rd.logprobs[i] if want_lp else None,
                           rd.top_logprobs[i] if want_lp else None, now)
                emitted += 1
            if not self.ngram and not c.done:
                self._seen[c.slot] = (c, len(c.generated))
        core._count_steps(steps, len(active), now)
        m.generation_tokens.inc(emitted)
        core._retire(owners)
        core.prof.lap("spec_emit")
