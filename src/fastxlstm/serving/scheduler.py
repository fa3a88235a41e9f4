"""Continuous batching: a background thread owns the slots and runs engine steps.

Each loop iteration (1) drops cancelled and timed-out requests and frees their slots, (2) admits
waiting requests while slots are free (looking up the prefix cache), (3) prefills at most
``prefill_chunk`` prompt tokens, counted as the device computes them (the backend's ``prefill_cost``:
a prefill CUDA graph computes its whole padded (batch, length) bucket), first come first served; a
request whose whole remaining prompt fits goes through the backend's ``prefill_batch`` with the waiting
prompts of lengths nearest its own (at most ``prefill_max_batch`` of them, right-padded, the group's cost
at most ``prefill_pad_ratio`` x their costs one by one, where the backend is ``prefill_padded``; exactly
one length otherwise); one that would fit a fresh budget waits for the next iteration rather than being
split; a longer one is prefilled in pieces. (4) It runs the decode step(s) over every running sequence --
``decode_steps_per_read`` steps with one host read when every running sequence is plain greedy without top
logprobs (the backend feeds its argmax back on the device; tokens past a stop are dropped, and a state that
ran past a stop is never cached), else one step. Greedy first tokens are picked on the device too: they
become the next window's inputs and are read behind it. With ``overlap`` (default) the next window is
queued from the device-resident last tokens *before* the blocks of tokens in flight (copied to pinned host
memory behind their work) are read and handed out, so that host work runs while the device decodes;
sequences whose budget the tokens in flight use up are not relaunched; with ``early_launch`` the window is
queued before the iteration's prefill, so the device has two windows to run while the host prefills (new
requests join the next window). (5) It hands the new tokens to the requests' asyncio queues (with
``stream_interval`` > 0, a request's tokens are handed over at most once per interval -- fewer, larger chunks
and event-loop wake-ups for a bounded extra latency; its first token, its end and errors go at once).
Requests with ``n > 1`` prefill once and fork the state. An exception inside one request fails that request
only: a failing batched step is retried per sequence, and slot states are only committed after a step
succeeded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import secrets
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..engine.backend import Sampled
from ..sampling import SamplingParams
from ..state import ModelState
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .slots import SlotBackend

log = logging.getLogger("fastxlstm.serving")


# ------------------------------------------------------------------------------------------------ events
@dataclass
class PrefillDone:
    cached_tokens: int


@dataclass
class TokenEvent:
    choice: int
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    choice: int
    reason: str  # "stop" | "length" | "abort"


@dataclass
class ErrorEvent:
    status: int
    message: str
    code: str | None = None


class QueueFull(Exception):
    pass


class LoopProfile:
    """Wall time of the scheduler loop by phase: each :meth:`lap` charges the time since the previous
    lap to ``phase`` (``*_wait``: blocked on the device's results; ``idle``: nothing to do)."""

    __slots__ = ("seconds", "_mark", "_cpu0", "_pushed", "_pushed_cpu", "_last_push")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()
        self._cpu0 = time.thread_time()
        self._pushed: dict[str, float] = {}
        self._pushed_cpu = 0.0
        self._last_push = 0.0

    def restart(self) -> None:
        """Start timing in the calling thread (thread CPU time is per thread)."""
        self._mark, self._cpu0 = time.perf_counter(), time.thread_time()

    def lap(self, phase: str) -> None:
        t = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + (t - self._mark)
        self._mark = t

    def push(self, metrics: Metrics, force: bool = False) -> None:
        """Add what accrued since the last push to the Prometheus counters (at most every 0.25 s)."""
        if not force and self._mark - self._last_push < 0.25:
            return
        self._last_push = self._mark
        for phase, total in self.seconds.items():
            delta = total - self._pushed.get(phase, 0.0)
            if delta > 0:
                metrics.loop_seconds.labels(phase=phase).inc(delta)
                self._pushed[phase] = total
        cpu = time.thread_time() - self._cpu0
        if cpu > self._pushed_cpu:
            metrics.loop_cpu.inc(cpu - self._pushed_cpu)
            self._pushed_cpu = cpu


class ShuttingDown(Exception):
    pass


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class _Choice:
    index: int
    params: SamplingParams  # the request's, with this choice's seed (the engine samples with them)
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # generated tokens already folded into the slot state
    done: bool = False
    cancelled: bool = False

    @property
    def steps_left(self) -> int:
        """Decode steps this choice may still launch: each step feeds one generated token, and the last of
        its ``max_new_tokens`` is never fed, so ``max_new_tokens - 1`` less those already fed."""
        return self.params.max_new_tokens - self.fed - 1


@dataclass
class _Window:
    """A block of tokens sampled on the device whose values are not read yet: a multi-step decode
    window, or (``phase == "prefill"``) the first tokens sampled from prefill logits."""

    active: list[_Choice]
    owners: list[GenerationRequest]
    sampled: Sampled  # tokens [n, steps] (+ logprobs): host copies in flight (CUDA) or the tensors
    event: torch.cuda.Event | None  # recorded after the copies (CUDA only)
    phase: str = "decode"


_ids = itertools.count()


class GenerationRequest:
    """One prompt with ``n`` choices, as handed to the scheduler."""

    def __init__(self, prompt: list[int], params: SamplingParams, n: int = 1, cache_points: tuple[int, ...] = (),
                 cache_generation_end: bool = False, timeout: float | None = None):
        if not prompt:
            raise ValueError("empty prompt")
        self.id = next(_ids)
        self.prompt = list(prompt)
        self.params = params
        self.n = n
        self.cache_points = tuple(sorted(set(p for p in cache_points if 0 < p < len(prompt))))
        self.cache_generation_end = cache_generation_end and n == 1
        self.arrival = time.monotonic()
        self.deadline = self.arrival + timeout if timeout else None
        self.queue: asyncio.Queue | None = None  # receives (request, [events]) tuples
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cancelled = False
        # set by a scheduler in another process (SchedulerProxy): cancel() goes there instead
        self.on_cancel: Callable[[int | None], None] | None = None
        # scheduler-private
        self.choices: list[_Choice] = []
        self.pos = 0
        self.state: ModelState | None = None
        self.logits: Tensor | None = None
        self.cached_tokens = 0
        self.first_token_time: float | None = None
        self.last_delivery = 0.0  # when the scheduler last handed this request's events over

    def cancel(self, choice: int | None = None) -> None:
        """Stop generating (all choices, or one); the scheduler frees the slots on its next iteration."""
        if self.on_cancel is not None:
            self.on_cancel(choice)
            return
        if choice is None:
            self.cancelled = True
        elif self.choices and 0 <= choice < len(self.choices):
            self.choices[choice].cancelled = True
        else:
            self.cancelled = True

    @property
    def finished(self) -> bool:
        return bool(self.choices) and all(c.done for c in self.choices)


# --------------------------------------------------------------------------------------------- scheduler
class Scheduler:
    """Owns the slots of a :class:`SlotBackend`; run it with :meth:`start`."""

    def __init__(self, backend: SlotBackend, eos_token_id: int | None, cache: PrefixCache | None = None,
                 metrics: Metrics | None = None, max_waiting: int = 256, prefill_chunk: int = 512,
                 stream_interval: float = 0.0, decode_steps_per_read: int = 1, overlap: bool = True,
                 prefill_pad_ratio: float = 1.3, early_launch: bool = False):
        self.backend = backend
        self.eos_token_id = eos_token_id
        self.cache = cache
        self.metrics = metrics or Metrics()
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        if stream_interval < 0:
            raise ValueError(f"stream_interval must be >= 0, got {stream_interval}")
        self.stream_interval = stream_interval  # seconds between two hand-overs of one request's tokens
        if decode_steps_per_read < 1:
            raise ValueError(f"decode_steps_per_read must be >= 1, got {decode_steps_per_read}")
        self.decode_steps_per_read = decode_steps_per_read
        self.overlap = overlap  # launch the next window before reading the previous one
        # queue the iteration's window before its prefill (two windows ahead of the host while it prefills)
        self.early_launch = early_launch
        if prefill_pad_ratio < 1.0:
            raise ValueError(f"prefill_pad_ratio must be >= 1, got {prefill_pad_ratio}")
        self.prefill_pad_ratio = prefill_pad_ratio  # padded / real tokens allowed in one batched prefill
        # blocks of tokens on their way to the host, in launch order: decode windows and first tokens picked
        # on the device from prefill logits (greedy); read in this order, so each sequence's tokens stay in order
        self._unread: deque[_Window] = deque()
        # what a prefill of (batch, padded length) costs the device: the backend's graph bucket, else b * n
        self._cost = getattr(backend, "prefill_cost", None) or (lambda b, n: b * n)
        self._max_batch: int | None = getattr(backend, "prefill_max_batch", None)
        self.free_slots: list[int] = list(range(backend.max_slots))  # a heap: lowest slot first
        self.waiting: deque[GenerationRequest] = deque()
        self.prefilling: list[GenerationRequest] = []
        self.running: list[GenerationRequest] = []
        self._inbox: list[GenerationRequest] = []
        self._cv = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pending: dict[int, tuple[GenerationRequest, list]] = {}
        self.steps = 0
        self._last_decode = 0.0
        self.prof = LoopProfile()
        self.metrics.slots_total.set(backend.max_slots)

    # ------------------------------------------------------------------ public (any thread)
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fastxlstm-scheduler", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(self, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop,
               queue: asyncio.Queue) -> None:
        """Queue requests (all or none); their events arrive on ``queue`` as ``(request, [events])``.
        Raises :class:`QueueFull` or :class:`ShuttingDown`."""
        for req in requests:
            if req.n > self.backend.max_slots:
                raise ValueError(f"n={req.n} exceeds the server's {self.backend.max_slots} sequence slots")
        with self._cv:
            if not self._accepting or not self.alive:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) + len(self._inbox) + len(requests) > self.max_waiting:
                raise QueueFull(f"too many requests waiting ({self.max_waiting}); retry later")
            for req in requests:
                req.loop, req.queue = loop, queue
            self._inbox.extend(requests)
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def stats(self) -> dict:
        with self._cv:
            return {"slots_total": self.backend.max_slots, "slots_free": len(self.free_slots),
                    "waiting": len(self.waiting) + len(self._inbox), "prefilling": len(self.prefilling),
                    "running": len(self.running), "steps": self.steps}

    def idle(self) -> bool:
        s = self.stats()
        return s["waiting"] == 0 and s["prefilling"] == 0 and s["running"] == 0

    def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting; let running requests finish for up to ``drain_timeout`` s; cancel the rest."""
        with self._cv:
            self._accepting = False
            self._cv.notify()
        deadline = time.monotonic() + drain_timeout
        while self.alive and not self.idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ----------------------------------------------------------------------- scheduler thread
    def _has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self._unread)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        prof = self.prof
        prof.restart()
        while True:
            with self._cv:
                if not self._stop and not self._inbox and not self._has_work():
                    # held-back tokens (stream_interval) still go out on time when nothing else runs
                    self._cv.wait(timeout=self.stream_interval if self._pending else 0.5)
                self.waiting.extend(self._inbox)
                self._inbox.clear()
                stop = self._stop
                if not self._accepting:  # draining: queued requests are answered now, not after the drain
                    for req in list(self.waiting):
                        self._fail(req, ErrorEvent(503, "the server is shutting down", "shutting_down"))
            prof.lap("idle")
            if stop:
                self._abort_all(ErrorEvent(503, "the server shut down before this request finished", "shutdown"))
                self._flush(force=True)
                prof.lap("flush")
                prof.push(self.metrics, force=True)
                return
            try:
                self._iteration()
            except Exception as e:  # a bug outside any one request: fail what is in flight, keep serving
                log.error("scheduler iteration failed:\n%s", traceback.format_exc())
                for req in list(self.prefilling) + list(self.running):
                    self._fail(req, e)
            self._flush(force=not self._has_work())
            self._gauges()
            prof.lap("flush")
            prof.push(self.metrics, force=not self._has_work())

    def _iteration(self) -> None:
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
        if self._pending and not any(w.phase == "prefill" for w in self._unread):  # first tokens (and errors) go
            self._flush()  # out before the decode step (first tokens still on the device: behind the next window)
            self.prof.lap("flush")
        self._decode()

    # ------------------------------------------------------------------------------ helpers
    def _post(self, req: GenerationRequest, event) -> None:
        self._pending.setdefault(req.id, (req, []))[1].append(event)

    def _flush(self, force: bool = False) -> None:
        """Hand the events due to the event loop(s): one thread-safe wake-up per loop. With a stream
        interval, a request's tokens wait until the interval since its last hand-over has passed, unless
        ``force`` or anything but tokens is among its events."""
        pending, self._pending = self._pending, {}
        now = time.monotonic()
        interval = 0.0 if force else self.stream_interval
        due: list[tuple[GenerationRequest, list]] = []
        for key, (req, events) in pending.items():
            if req.loop is None or req.queue is None:
                continue
            if (interval and now - req.last_delivery < interval and req.first_token_time is not None
                    and all(type(ev) is TokenEvent for ev in events)):
                self._pending[key] = (req, events)  # not due yet
                continue
            req.last_delivery = now
            due.append((req, events))
        post_events(due)

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

    def _release(self, req: GenerationRequest, choice: _Choice, reason: str, cache_state: bool = True) -> None:
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

    def _abort_all(self, event: ErrorEvent) -> None:
        for req in list(self.waiting) + list(self._inbox) + list(self.prefilling) + list(self.running):
            self._fail(req, event)
        self.waiting.clear()
        self._inbox.clear()

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
            req.choices = [_Choice(i, choice_params(req.params, i), slot=heapq.heappop(self.free_slots))
                           for i in range(req.n)]
            self.metrics.prompt_tokens.inc(len(req.prompt))
            if self.cache is not None:
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
        length (:meth:`_bucket`); one that would fit a fresh budget but not what is left of this one waits
        for the next iteration (whole); a longer one (or one with a cache point inside) is prefilled in
        pieces."""
        budget = self.prefill_chunk
        batched = hasattr(self.backend, "prefill_batch")
        started: list[GenerationRequest] = []
        done: set[int] = set()
        for req in list(self.prefilling):
            if budget <= 0:
                break
            if id(req) in done or req not in self.prefilling:
                continue
            done.add(id(req))
            whole, cost = self._whole(req), self._cost(1, len(req.prompt) - req.pos)
            if whole and cost <= budget:
                group = self._bucket(req, budget, done) if batched else [req]
                if len(group) > 1:
                    done.update(id(r) for r in group)
                    budget -= self._prefill_batch(group, started)
                    continue
            elif whole and cost <= self.prefill_chunk:
                break  # the next iteration prefills it in one forward
            try:
                n_prompt = len(req.prompt)
                while req.pos < n_prompt and budget > 0:
                    end = self._piece_end(req, budget)
                    if end is None:
                        break
                    req.logits, req.state = self.backend.prefill(req.prompt[req.pos:end], req.state)
                    self.metrics.prefill_tokens.inc(end - req.pos)
                    budget -= self._cost(1, end - req.pos)
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

    def _piece_end(self, req: GenerationRequest, budget: int) -> int | None:
        """Where the next prefill piece of ``req`` ends: at its end or next cache point, cut to the longest
        piece whose cost fits ``budget`` (None: none fits; a fresh budget always makes progress)."""
        limit = min([len(req.prompt), *(p for p in req.cache_points if p > req.pos)]) - req.pos
        n = min(limit, budget)
        if self._cost(1, n) > budget:  # e.g. rounded up to a graph bucket: the longest piece that fits
            lo, hi = 0, n
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self._cost(1, mid) <= budget else (lo, mid - 1)
            n = lo
        if n == 0:
            return None if budget < self.prefill_chunk else req.pos + min(limit, budget)
        return req.pos + n

    @staticmethod
    def _whole(req: GenerationRequest) -> bool:
        """Whether the remaining prompt can go in one forward (no cache point inside it)."""
        n = len(req.prompt)
        return req.pos < n and not any(req.pos < p < n for p in req.cache_points)

    def _bucket(self, req: GenerationRequest, budget: int, done: set[int]) -> list[GenerationRequest]:
        """``req`` and the waiting prompts of lengths nearest to its own that share its forward: same
        start-state kind, whole remaining prompts, at most the backend's ``prefill_max_batch`` of them, and
        a cost (:meth:`_cost` of the group padded to its longest) at most ``budget`` and at most
        ``prefill_pad_ratio`` x what the prompts cost one by one (1: no extra device work; a backend without
        ``prefill_padded`` gets equal lengths only). The largest such run of neighbours in length order,
        the cheapest of those."""
        padded = getattr(self.backend, "prefill_padded", False)
        ratio = self.prefill_pad_ratio if padded else 1.0
        kind = req.state is None
        pool = sorted((r for r in self.prefilling if r is req or (
            id(r) not in done and (r.state is None) == kind and self._whole(r))),
            key=lambda r: len(r.prompt) - r.pos)
        lens = [len(r.prompt) - r.pos for r in pool]
        alone = [0]  # prefix sums of the one-by-one costs
        for n in lens:
            alone.append(alone[-1] + self._cost(1, n))
        i = pool.index(req)
        for k in range(min(len(pool), self._max_batch or len(pool)), 1, -1):
            if self._cost(k, lens[i]) > budget:  # every run holding req is at least this long
                continue
            runs = []  # (cost, length spread, start) of each run of k holding req that may share a forward
            for lo in range(max(0, i - k + 1), min(i, len(pool) - k) + 1):
                hi = lo + k
                if not padded and lens[lo] != lens[hi - 1]:
                    continue
                cost = self._cost(k, lens[hi - 1])
                if cost <= budget and cost <= ratio * (alone[hi] - alone[lo]) + 1e-9:
                    runs.append((cost, lens[hi - 1] - lens[lo], lo))
            if runs:
                lo = min(runs)[2]
                return pool[lo:lo + k]
        return [req]

    def _prefill_batch(self, group: list[GenerationRequest], started: list[GenerationRequest]) -> int:
        """Prefill ``group`` in one backend call (padded to its longest prompt); on failure one by one.
        Returns the budget spent (:meth:`_cost`)."""
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
            return self._cost(len(group), length)
        for j, req in enumerate(group):
            req.logits, req.state = logits[j], states[j]
            self._prefilled(req, started)
        return self._cost(len(group), length)

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
        choices: list[_Choice] = []
        owners: list[GenerationRequest] = []
        rows: list[Tensor] = []
        for req in reqs:
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
            first = self.backend.first_tokens([c.slot for c in choices], torch.stack(rows), logprobs=want_lp)
        except Exception as e:
            for req in {id(r): r for r in owners}.values():
                self._fail(req, e)
            return
        self._to_host(choices, owners, first, "prefill")

    def _active(self) -> tuple[list[_Choice], list[GenerationRequest]]:
        active: list[_Choice] = []
        owners: list[GenerationRequest] = []
        for req in self.running:
            for choice in req.choices:
                if not choice.done:
                    active.append(choice)
                    owners.append(req)
        return active, owners

    def _launch_window(self) -> _Window | None:
        """Queue a decode window (:meth:`_window` steps) over the running sequences that have budget left;
        None when there are none. If the batched launch fails, everything in flight is read and each
        sequence is retried alone for one step, so only the sequence(s) at fault fail."""
        active, owners = self._active()
        # sequences whose budget the tokens not read yet use up are not relaunched (once every token is
        # read, a sequence not done has steps left)
        keep = [j for j, c in enumerate(active) if c.steps_left > 0]
        active, owners = [active[j] for j in keep], [owners[j] for j in keep]
        if not active:
            return None
        try:
            return self._launch(active, owners, self._window(active, owners))
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

    def _read_before(self, window: _Window) -> None:
        """Read and hand out what was launched before ``window`` (the previous window, first tokens), while
        ``window`` runs on the device."""
        self._drain(before=window)
        if not self.overlap:
            self._drain()

    def _decode(self) -> None:
        window = self._launch_window()
        if window is not None:
            self._read_before(window)
            return
        self._drain()
        self._last_decode = 0.0

    def _window(self, active: list[_Choice], owners: list[GenerationRequest]) -> int:
        """Decode steps before the next host read: ``decode_steps_per_read``, at most the longest remaining
        budget (at most the shortest for a chat turn whose end state goes to the prefix cache, so a
        length stop leaves a state that matches the tokens). Every request samples on the device, greedy
        or not, so every batch gets windows. Requests arriving meanwhile are admitted after the window
        (their first token waits up to ``k - 1`` steps longer). The budget left counts the tokens of a
        window still in flight (``fed``: inputs handed to the device)."""
        k = self.decode_steps_per_read
        longest = 0
        for choice, req in zip(active, owners):
            left = choice.steps_left
            longest = max(longest, left)
            if req.cache_generation_end and self.cache is not None:
                k = min(k, left)
        return max(1, min(k, longest))

    def _to_host(self, active: list[_Choice], owners: list[GenerationRequest], sampled: Sampled,
                 phase: str = "decode") -> _Window:
        """Start copying a block of sampled tokens (and logprobs) to pinned host memory behind the work
        queued so far, without waiting; it joins the blocks to read (:meth:`_finish_window`)."""
        event = None
        if sampled.tokens.device.type == "cuda":
            sampled = Sampled(*(None if t is None else t.to("cpu", non_blocking=True)
                                for t in (sampled.tokens, sampled.logprobs, sampled.top_logprobs, sampled.top_ids)))
            event = torch.cuda.Event()
            event.record()
        window = _Window(active, owners, sampled, event, phase)
        self._unread.append(window)
        return window

    def _launch(self, active: list[_Choice], owners: list[GenerationRequest], steps: int) -> _Window:
        """Queue a window of ``steps`` decode steps on the device and start copying its tokens to the host
        (no wait)."""
        want_lp = any(c.params.logprobs is not None for c in active)
        out = self.backend.decode_window([c.slot for c in active], steps, logprobs=want_lp)
        for choice in active:
            choice.fed += steps
        window = self._to_host(active, owners, out)
        self.prof.lap("decode_launch")
        return window

    def _drain(self, before: _Window | None = None) -> None:
        """Read and hand out every block of tokens in flight (launched before ``before``), in launch order."""
        while self._unread and self._unread[0] is not before:
            self._finish_window(self._unread.popleft())

    def _finish_window(self, w: _Window) -> None:
        sampled = w.sampled
        try:
            if w.event is not None:
                w.event.synchronize()
            block = sampled.tokens.tolist()
            lps = sampled.logprobs.tolist() if sampled.logprobs is not None else None
            tops = None
            if sampled.top_ids is not None and any(c.params.logprobs for c in w.active):
                tops = (sampled.top_ids.tolist(), sampled.top_logprobs.tolist())
        except Exception as e:  # an asynchronous device error: fail that window's requests
            log.error("reading a decode window failed:\n%s", traceback.format_exc())
            for req in {id(r): r for r in w.owners}.values():
                self._fail(req, e)
            return
        self.prof.lap(f"{w.phase}_wait")
        self._emit_block(w.active, w.owners, block, lps, tops, decode=w.phase == "decode")
        self.prof.lap(f"{w.phase}_emit")

    def _emit_block(self, active: list[_Choice], owners: list[GenerationRequest], block: list[list[int]],
                    lps: list[list[float]] | None, tops: tuple[list, list] | None, decode: bool = True) -> None:
        """Tokens of a multi-step window (or, not ``decode``, first tokens from prefill logits), row per
        sequence: each is emitted up to its first stop; what the device computed past it is dropped (the
        slot is freed). ``lps`` / ``tops`` (top ids, top values): per row and step, where asked for."""
        now = time.monotonic()
        if decode:
            steps = len(block[0])
            self.steps += steps
            if self._last_decode:  # interval between two reads (the window's tokens arrive together)
                self.metrics.itl.observe(now - self._last_decode)
            self._last_decode = now
            for _ in range(steps):
                self.metrics.decode_batch.observe(len(active))
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

    def _retire(self, owners: list[GenerationRequest]) -> None:
        """Take the finished requests among ``owners`` off the running list."""
        for req in {id(r): r for r in owners}.values():
            if req.finished and req in self.running:
                self.running.remove(req)

    def _emit(self, choice: _Choice, req: GenerationRequest, token: int, lp: float | None,
              top: list[tuple[int, float]] | None, now: float) -> None:
        """Hand one sampled token over and finish the choice where a stop condition holds."""
        choice.generated.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.ttft.observe(now - req.arrival)
        self._post(req, TokenEvent(choice.index, token, lp, top))
        p = req.params
        if (token == self.eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
            self._release(req, choice, "stop")
        elif len(choice.generated) >= p.max_new_tokens:
            self._release(req, choice, "length")


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters choice ``index`` of a request samples with: the request's, the seed ``seed + index``
    (a fresh random seed per choice when the request has none), so choices differ and each reproduces."""
    seed = secrets.randbits(63) if params.seed is None else (params.seed + index) % (1 << 64)
    return dataclasses.replace(params, seed=seed)


def post_events(items: list[tuple[GenerationRequest, list]]) -> None:
    """(Any thread.) Hand each request's events to its event loop: one :func:`_deliver` call per loop."""
    by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list]] = {}
    for req, events in items:
        by_loop.setdefault(id(req.loop), (req.loop, []))[1].append((req, events))
    for loop, batch in by_loop.values():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # that event loop is gone
            pass


def _deliver(items: list) -> None:
    """(Runs in the event loop.) Put each request's events into its queue."""
    for req, events in items:
        req.queue.put_nowait((req, events))
