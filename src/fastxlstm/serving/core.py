"""The synchronous scheduler step: :meth:`SchedulerCore.step` runs one iteration over the slots of a
:class:`SlotBackend` -- reap, admit, prefill, decode, emit -- with no thread and no lock (the
:class:`~fastxlstm.serving.scheduler.Scheduler` runs it in its thread; a benchmark or a test may call it
directly). What each phase does is in :mod:`fastxlstm.serving.scheduler`'s docstring; prefill planning is
:mod:`.prefill_plan`, the tokens in flight :mod:`.inflight`, the hand-over to asyncio :mod:`.delivery`.
"""

from __future__ import annotations

import heapq
import logging
import time
import traceback
from collections import deque

import torch
from torch import Tensor

from .delivery import Outbox
from .grammar import Matcher, upload_masks
from .inflight import InFlight, Window, runnable, window_steps
from .metrics import LoopProfile, Metrics
from .prefill_plan import PrefillPlanner
from .prefix_cache import PrefixCache
from .requests import (
    Choice,
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    PrefillDone,
    PromptLogprobs,
    TokenEvent,
    choice_params,
)
from .slots import SlotBackend
from .speculate import Speculator

log = logging.getLogger("fastxlstm.serving")


class SchedulerCore:
    """Owns the slots of a :class:`SlotBackend`; :meth:`step` runs one scheduler iteration."""

    def __init__(self, backend: SlotBackend, eos_token_id: int | None, cache: PrefixCache | None = None,
                 metrics: Metrics | None = None, prefill_chunk: int = 512, stream_interval: float = 0.0,
                 decode_steps_per_read: int = 1, overlap: bool = True, prefill_pad_ratio: float = 1.3,
                 early_launch: bool = False):
        self.backend = backend
        self.eos_token_id = eos_token_id
        self.cache = cache
        self.metrics = metrics or Metrics()
        self.outbox = Outbox(stream_interval)  # events waiting to be handed to the requests' event loops
        self.plan = PrefillPlanner(backend, prefill_chunk, prefill_pad_ratio)
        if decode_steps_per_read < 1:
            raise ValueError(f"decode_steps_per_read must be >= 1, got {decode_steps_per_read}")
        self.decode_steps_per_read = decode_steps_per_read
        self.overlap = overlap  # launch the next window before reading the previous one
        # speculative decoding where the backend speculates (.speculate; its windows are read at once)
        self.speculator = Speculator(backend, decode_steps_per_read) \
            if getattr(backend, "speculative", None) is not None else None
        # queue the iteration's window before its prefill (two windows ahead of the host while it prefills)
        self.early_launch = early_launch and self.speculator is None
        # blocks of tokens on their way to the host, in launch order: decode windows and first tokens picked
        # on the device from prefill logits (greedy); read in this order, so each sequence's tokens stay in order
        self.inflight = InFlight()
        self.free_slots: list[int] = list(range(backend.max_slots))  # a heap: lowest slot first
        self.waiting: deque[GenerationRequest] = deque()
        self.prefilling: list[GenerationRequest] = []
        self.running: list[GenerationRequest] = []
        self.steps = 0
        self._last_decode = 0.0
        self.prof = LoopProfile()
        self.metrics.slots_total.set(backend.max_slots)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.inflight)

    def step(self) -> None:
        """One iteration (the events it produces wait in :attr:`outbox`)."""
        self._reap()
        self._admit()
        self.prof.lap("admit")
        # (early_launch) the iteration's window, queued before its prefill, so that the device has this one and
        # the previous one to run while the host prefills; None: none was launched (then _decode runs as usual)
        early = self._launch_window() if self.early_launch else None
        self._prefill()
        if early is not None:  # the new sequences join the next window
            self._read_before(early)
            return
        if self.outbox and not self.inflight.has("prefill"):  # first tokens (and errors) go out before the
            self.outbox.flush()  # decode step (first tokens still on the device: behind the next window)
            self.prof.lap("flush")
        self._decode()

    # ------------------------------------------------------------------------------ helpers
    def _post(self, req: GenerationRequest, event) -> None:
        self.outbox.post(req, event)

    def _gauges(self) -> None:
        m = self.metrics
        m.slots_used.set(self.backend.max_slots - len(self.free_slots))
        m.waiting.set(len(self.waiting))
        m.running.set(len(self.running) + len(self.prefilling))
        if self.cache is not None:
            m.cache_bytes.set(self.cache.bytes)
            m.cache_entries.set(len(self.cache))

    def _free_slot(self, slot: int) -> None:
        try:
            self.backend.release(slot)
        finally:
            heapq.heappush(self.free_slots, slot)

    def _release(self, req: GenerationRequest, choice: Choice, reason: str, cache_state: bool = True) -> None:
        """Mark a choice done and free its slot (caching the state at the end of a chat turn)."""
        if choice.done:
            return
        choice.done = True
        if choice.slot is not None:
            if (cache_state and self.cache is not None and req.cache_generation_end and reason != "abort"
                    and not req.cancelled and 0 < choice.fed <= len(choice.generated)):
                # (fed > generated: a multi-step window ran the state past the stop; not a valid turn end)
                try:
                    self.cache.insert(req.prompt + choice.generated[: choice.fed], self.backend.read(choice.slot))
                except Exception:  # caching is an optimisation; never fail a request over it
                    log.warning("prefix cache insert failed:\n%s", traceback.format_exc())
            self._free_slot(choice.slot)
            choice.slot = None
        self.metrics.finished.labels(reason=reason).inc()
        if reason != "abort":
            self.metrics.e2e.observe(time.monotonic() - req.arrival)
        self._post(req, FinishEvent(choice.index, reason))

    def _drop(self, req: GenerationRequest, notify: bool = True) -> None:
        for lst in (self.prefilling, self.running):
            if req in lst:
                lst.remove(req)
        if not req.choices:  # still waiting: slots were never reserved
            return
        for choice in req.choices:
            if not choice.done:
                choice.done = True
                if choice.slot is not None:
                    self._free_slot(choice.slot)
                    choice.slot = None
                if notify:
                    self._post(req, FinishEvent(choice.index, "abort"))

    def _fail(self, req: GenerationRequest, exc: BaseException | ErrorEvent) -> None:
        if isinstance(exc, ErrorEvent):
            event = exc
        else:
            log.error("request %s failed: %s", req.id, "".join(traceback.format_exception(exc)))
            self.metrics.errors.inc()
            event = ErrorEvent(500, f"generation failed: {type(exc).__name__}: {exc}", "internal_error")
        self.metrics.finished.labels(reason="abort").inc(sum(not c.done for c in req.choices) if req.choices
                                                         else req.n)  # failed, timed out, shut down
        self._drop(req, notify=False)
        if req in self.waiting:
            self.waiting.remove(req)
        self._post(req, event)

    # ------------------------------------------------------------------------------- phases
    def _reap(self) -> None:
        now = time.monotonic()
        for req in list(self.waiting):
            if req.cancelled:
                self.waiting.remove(req)
                self.metrics.finished.labels(reason="abort").inc(req.n)  # the client left while it waited
                self._post(req, ErrorEvent(499, "cancelled", "cancelled"))
            elif req.deadline is not None and now > req.deadline:
                self._fail(req, ErrorEvent(408, "the request timed out while waiting for a slot", "timeout"))
        for req in list(self.prefilling) + list(self.running):
            if req.cancelled:
                self._drop(req)
            elif req.deadline is not None and now > req.deadline:
                self._fail(req, ErrorEvent(408, "the request timed out", "timeout"))
            else:
                for choice in req.choices:
                    if choice.cancelled and not choice.done:
                        self._release(req, choice, "stop")
                if req.finished and req in self.running:
                    self.running.remove(req)

    def _admit(self) -> None:
        while self.waiting and len(self.free_slots) >= self.waiting[0].n:
            req = self.waiting.popleft()
            req.choices = [Choice(i, choice_params(req.params, i), slot=heapq.heappop(self.free_slots))
                           for i in range(req.n)]
            if req.grammar is not None:
                for choice in req.choices:
                    choice.matcher = Matcher(req.grammar)
            self.metrics.prompt_tokens.inc(len(req.prompt))
            if self.cache is not None and req.prompt_logprobs is None:  # a scored prompt is prefilled whole
                try:
                    hit = self.cache.lookup(req.prompt)
                except Exception:
                    log.warning("prefix cache lookup failed:\n%s", traceback.format_exc())
                    hit = None
                if hit is None:
                    self.metrics.cache_misses.inc()
                else:
                    self.metrics.cache_hits.inc()
                    self.metrics.cache_hit_tokens.inc(hit.length)
                    req.state, req.pos, req.logits, req.cached_tokens = hit.state, hit.length, hit.logits, hit.length
            self.prefilling.append(req)


    def _prefill(self) -> None:
        """Prefill up to ``prefill_chunk`` prompt tokens, counted as the device computes them (the
        backend's ``prefill_cost``: a prefill graph computes its whole padded bucket), first come first
        served: a request whose whole remaining prompt fits goes into one forward with others of similar
        length (:meth:`PrefillPlanner.bucket`); one that would fit a fresh budget but not what is left of this one waits
        for the next iteration (whole); a longer one (or one with a cache point inside) is prefilled in
        pieces."""
        plan = self.plan
        budget = plan.chunk
        batched = hasattr(self.backend, "prefill_batch")
        started: list[GenerationRequest] = []
        done: set[int] = set()
        for req in list(self.prefilling):
            if budget <= 0:
                break
            if id(req) in done or req not in self.prefilling:
                continue
            done.add(id(req))
            whole, cost = plan.whole(req), plan.cost(1, len(req.prompt) - req.pos)
            if whole and cost <= budget:  # (a scored prompt is prefilled alone)
                group = plan.bucket(req, self.prefilling, budget, done) if batched and req.prompt_logprobs is None \
                    else [req]
                if len(group) > 1:
                    done.update(id(r) for r in group)
                    budget -= self._prefill_batch(group, started)
                    continue
            elif whole and cost <= plan.chunk:
                break  # the next iteration prefills it in one forward
            try:
                n_prompt = len(req.prompt)
                while req.pos < n_prompt and budget > 0:
                    end = plan.piece_end(req, budget)
                    if end is None:
                        break
                    if req.prompt_logprobs is None:
                        req.logits, req.state = self.backend.prefill(req.prompt[req.pos:end], req.state)
                    else:  # scored on the device as it is prefilled
                        req.logits, req.state, scores = self.backend.prefill_scored(
                            req.prompt[req.pos:end], req.state, req.prompt[end] if end < n_prompt else None,
                            req.prompt_logprobs)
                        if req.scores is None:
                            req.scores = scores
                        else:
                            req.scores.extend(scores)
                    self.metrics.prefill_tokens.inc(end - req.pos)
                    budget -= plan.cost(1, end - req.pos)
                    req.pos = end
                    if self.cache is not None and end in req.cache_points:
                        self.cache.insert(req.prompt[:end], req.state)
                if req.pos == n_prompt:
                    if self.cache is not None and req.cached_tokens < n_prompt:
                        self.cache.insert(req.prompt, req.state, req.logits)
                    started.append(req)
            except Exception as e:
                self._fail(req, e)
        self._start_decoding([r for r in started if r in self.prefilling])
        self.prof.lap("prefill_launch")


    def _prefill_batch(self, group: list[GenerationRequest], started: list[GenerationRequest]) -> int:
        """Prefill ``group`` in one backend call (padded to its longest prompt); on failure one by one.
        Returns the budget spent (:attr:`PrefillPlanner.cost`)."""
        length = max(len(r.prompt) - r.pos for r in group)
        try:
            logits, states = self.backend.prefill_batch([r.prompt[r.pos:] for r in group], [r.state for r in group])
        except Exception:
            log.warning("batched prefill failed; prefilling one by one:\n%s", traceback.format_exc())
            for req in group:
                try:
                    req.logits, req.state = self.backend.prefill(req.prompt[req.pos:], req.state)
                except Exception as e:
                    self._fail(req, e)
                    continue
                self._prefilled(req, started)
            return self.plan.cost(len(group), length)
        for j, req in enumerate(group):
            req.logits, req.state = logits[j], states[j]
            self._prefilled(req, started)
        return self.plan.cost(len(group), length)

    def _prefilled(self, req: GenerationRequest, started: list[GenerationRequest]) -> None:
        self.metrics.prefill_tokens.inc(len(req.prompt) - req.pos)
        req.pos = len(req.prompt)
        try:
            if self.cache is not None and req.cached_tokens < req.pos:
                self.cache.insert(req.prompt, req.state, req.logits)
        except Exception:
            log.warning("prefix cache insert failed:\n%s", traceback.format_exc())
        started.append(req)

    def _start_decoding(self, reqs: list[GenerationRequest]) -> None:
        """Load the prefilled states into the requests' slots (each choice configured with its sampling
        parameters) and sample every first token on the device in one go: they become the next window's
        inputs and reach the host behind it, with no wait here."""
        choices: list[Choice] = []
        owners: list[GenerationRequest] = []
        rows: list[Tensor] = []
        for req in reqs:
            if req.scores is not None:
                self._post(req, PromptLogprobs(req.scores))
                req.scores = None
            if req.params.max_new_tokens == 0:  # the prompt's scores were all it asked for
                self.prefilling.remove(req)
                self._post(req, PrefillDone(req.cached_tokens))
                req.state = req.logits = None
                for choice in req.choices:
                    self._release(req, choice, "length", cache_state=False)
                continue
            try:
                state, logits = req.state, req.logits
                assert state is not None and logits is not None
                for choice in req.choices:
                    self.backend.load(choice.slot, state, choice.params, req.prompt)
            except Exception as e:
                self._fail(req, e)
                continue
            self.prefilling.remove(req)
            self.running.append(req)
            self._post(req, PrefillDone(req.cached_tokens))
            req.state = req.logits = None
            choices.extend(req.choices)
            owners.extend([req] * len(req.choices))
            rows.extend([logits] * len(req.choices))
        if not choices:
            return
        want_lp = any(c.params.logprobs is not None for c in choices)
        try:
            upload_masks(self.backend, choices)  # the grammars' first masks (one upload)
            first = self.backend.first_tokens([c.slot for c in choices], torch.stack(rows), logprobs=want_lp)
        except Exception as e:
            for req in {id(r): r for r in owners}.values():
                self._fail(req, e)
            return
        self.inflight.push(choices, owners, first, "prefill")

    def _launch_window(self) -> Window | None:
        """Queue a decode window (:func:`~.inflight.window_steps` steps) over the running sequences that have
        budget left; None when there are none. If the batched launch fails, everything in flight is read and each
        sequence is retried alone for one step, so only the sequence(s) at fault fail."""
        # sequences whose budget the tokens not read yet use up are not relaunched
        active, owners = runnable(self.running)
        if not active:
            return None
        per_read = self.decode_steps_per_read if self.speculator is None else self.speculator.plain_steps()
        steps = window_steps(per_read, active, owners, self.cache is not None)
        if any(c.matcher is not None for c in active):
            # a grammar's next mask needs the token just sampled: read what is in flight (the matchers advance),
            # then one step under the new masks
            self._drain()
            active, owners = runnable(self.running)
            if not active:
                return None
            upload_masks(self.backend, active)
            steps = 1
        try:
            return self._launch(active, owners, steps)
        except Exception:
            log.warning("batched decode failed; retrying per sequence:\n%s", traceback.format_exc())
        self._drain()
        last = None
        for choice, req in zip(active, owners):
            if choice.done:
                continue
            try:
                last = self._launch([choice], [req], 1)
            except Exception as e:
                self._fail(req, e)
        return last

    def _read_before(self, window: Window) -> None:
        """Read and hand out what was launched before ``window`` (the previous window, first tokens), while
        ``window`` runs on the device."""
        self._drain(before=window)
        if not self.overlap:
            self._drain()

    def _decode(self) -> None:
        if self.speculator is not None and self.speculator.run(self):
            return
        window = self._launch_window()
        if window is not None:
            self._read_before(window)
            return
        self._drain()
        self._last_decode = 0.0

    def _launch(self, active: list[Choice], owners: list[GenerationRequest], steps: int) -> Window:
        """Queue a window of ``steps`` decode steps on the device and start copying its tokens to the host
        (no wait)."""
        want_lp = any(c.params.logprobs is not None for c in active)
        out = self.backend.decode_window([c.slot for c in active], steps, logprobs=want_lp)
        for choice in active:
            choice.fed += steps
        window = self.inflight.push(active, owners, out)
        self.prof.lap("decode_launch")
        return window

    def _drain(self, before: Window | None = None) -> None:
        """Read and hand out every block of tokens in flight (launched before ``before``), in launch order."""
        for w in self.inflight.pop_before(before):
            self._finish_window(w)

    def _finish_window(self, w: Window) -> None:
        try:
            block, lps, tops = w.read()
        except Exception as e:  # an asynchronous device error: fail that window's requests
            log.error("reading a decode window failed:\n%s", traceback.format_exc())
            for req in {id(r): r for r in w.owners}.values():
                self._fail(req, e)
            return
        self.prof.lap(f"{w.phase}_wait")
        self._emit_block(w.active, w.owners, block, lps, tops, decode=w.phase == "decode")
        self.prof.lap(f"{w.phase}_emit")

    def _emit_block(self, active: list[Choice], owners: list[GenerationRequest], block: list[list[int]],
                    lps: list[list[float]] | None, tops: tuple[list, list] | None, decode: bool = True) -> None:
        """Tokens of a multi-step window (or, not ``decode``, first tokens from prefill logits), row per
        sequence: each is emitted up to its first stop; what the device computed past it is dropped (the
        slot is freed). ``lps`` / ``tops`` (top ids, top values): per row and step, where asked for."""
        now = time.monotonic()
        if decode:
            self._count_steps(len(block[0]), len(active), now)
        emitted = 0
        for j, (choice, req, row) in enumerate(zip(active, owners, block)):
            k = choice.params.logprobs
            for i, token in enumerate(row):
                if choice.done:
                    break
                lp = top = None
                if k is not None:
                    lp = lps[j][i]
                    top = list(zip(tops[0][j][i][:k], tops[1][j][i][:k])) if k else []
                self._emit(choice, req, token, lp, top, now)
                emitted += 1
        self.metrics.generation_tokens.inc(emitted)
        self._retire(owners)

    def _count_steps(self, steps: int, batch: int, now: float) -> None:
        """The metrics of a window of ``steps`` decode steps over ``batch`` sequences read at ``now``."""
        self.steps += steps
        if self._last_decode:  # interval between two reads (the window's tokens arrive together)
            self.metrics.itl.observe(now - self._last_decode)
        self._last_decode = now
        for _ in range(steps):
            self.metrics.decode_batch.observe(batch)

    def _retire(self, owners: list[GenerationRequest]) -> None:
        """Take the finished requests among ``owners`` off the running list."""
        for req in {id(r): r for r in owners}.values():
            if req.finished and req in self.running:
                self.running.remove(req)

    def _emit(self, choice: Choice, req: GenerationRequest, token: int, lp: float | None,
              top: list[tuple[int, float]] | None, now: float) -> None:
        """Hand one sampled token over and finish the choice where a stop condition holds."""
        choice.generated.append(token)
        if choice.matcher is not None and not choice.matcher.accept(token) and token != self.eos_token_id:
            log.warning("request %s: token %d is outside its grammar", req.id, token)
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.ttft.observe(now - req.arrival)
        self._post(req, TokenEvent(choice.index, token, lp, top))
        p = req.params
        if (token == self.eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
            self._release(req, choice, "stop")
        elif len(choice.generated) >= p.max_new_tokens:
            self._release(req, choice, "length")

