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

A request with ``prompt_logprobs`` is prefilled alone and scored on the device as it goes (the backend's
``prefill_scored``; no prefix-cache lookup), its scores handed over before its first token (with
``max_new_tokens == 0`` it ends there). Choices under a grammar (structured output) each hold an xgrammar
matcher that advances with every token read; a window holding one is launched only after everything in flight
is read, one step long, with the matchers' next bitmasks uploaded to the sampler first (:mod:`.grammar`).

The code, one job a module: :mod:`.requests` (requests, choices, events), :mod:`.prefill_plan` (pure prefill
planning), :mod:`.inflight` (the tokens in flight and the window length), :mod:`.core` (the synchronous
:meth:`~.core.SchedulerCore.step`), :mod:`.delivery` (the hand-over to asyncio) and this module (the thread:
submit, wake, stats, drain and shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback

import torch

from .core import SchedulerCore
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .requests import ErrorEvent, GenerationRequest, QueueFull, ShuttingDown
from .slots import SlotBackend

log = logging.getLogger("fastxlstm.serving")


class Scheduler(SchedulerCore):
    """Owns the slots of a :class:`SlotBackend` and runs :meth:`SchedulerCore.step` in a background thread;
    start it with :meth:`start`, hand it requests with :meth:`submit` (any thread)."""

    def __init__(self, backend: SlotBackend, eos_token_id: int | None, cache: PrefixCache | None = None,
                 metrics: Metrics | None = None, max_waiting: int = 256, prefill_chunk: int = 512,
                 stream_interval: float = 0.0, decode_steps_per_read: int = 1, overlap: bool = True,
                 prefill_pad_ratio: float = 1.3, early_launch: bool = False):
        super().__init__(backend, eos_token_id, cache, metrics, prefill_chunk=prefill_chunk,
                         stream_interval=stream_interval, decode_steps_per_read=decode_steps_per_read,
                         overlap=overlap, prefill_pad_ratio=prefill_pad_ratio, early_launch=early_launch)
        self.max_waiting = max_waiting
        self._inbox: list[GenerationRequest] = []
        self._cv = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None

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
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        prof = self.prof
        prof.restart()
        while True:
            with self._cv:
                if not self._stop and not self._inbox and not self.has_work():
                    # held-back tokens (stream_interval) still go out on time when nothing else runs
                    self._cv.wait(timeout=self.outbox.stream_interval if self.outbox else 0.5)
                self.waiting.extend(self._inbox)
                self._inbox.clear()
                stop = self._stop
                if not self._accepting:  # draining: queued requests are answered now, not after the drain
                    for req in list(self.waiting):
                        self._fail(req, ErrorEvent(503, "the server is shutting down", "shutting_down"))
            prof.lap("idle")
            if stop:
                self._abort_all(ErrorEvent(503, "the server shut down before this request finished", "shutdown"))
                self.outbox.flush(force=True)
                prof.lap("flush")
                prof.push(self.metrics, force=True)
                return
            try:
                self.step()
            except Exception as e:  # a bug outside any one request: fail what is in flight, keep serving
                log.error("scheduler iteration failed:\n%s", traceback.format_exc())
                for req in list(self.prefilling) + list(self.running):
                    self._fail(req, e)
            self.outbox.flush(force=not self.has_work())
            self._gauges()
            prof.lap("flush")
            prof.push(self.metrics, force=not self.has_work())

    def _abort_all(self, event: ErrorEvent) -> None:
        for req in list(self.waiting) + list(self._inbox) + list(self.prefilling) + list(self.running):
            self._fail(req, event)
        self.waiting.clear()
        self._inbox.clear()

