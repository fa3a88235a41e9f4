"""The scheduler in its own process (``ServeConfig.scheduler_process``, ``serve --scheduler-process``).

The HTTP process keeps the API, validation and the (de)tokenizer, and a :class:`SchedulerProxy` with the
interface the app uses of a :class:`~fastxlstm.serving.scheduler.Scheduler` (start / submit / wake / stats /
shutdown / alive / accepting). The worker process (started with ``spawn``, as CUDA needs) loads the model,
captures the CUDA graphs and runs the real scheduler thread; the two do not share a GIL.

Two one-way pipes carry plain picklable messages. To the worker: ``("submit", [request tuples])``,
``("cancel", [(id, choice)])``, ``("query", qid, "stats" | "metrics")``, ``("shutdown", drain_timeout)``, and
``("grammar_info", text)`` (xgrammar's JSON of the tokenizer's vocabulary) before the first request under a
grammar: structured output's grammars are compiled on the HTTP side (their errors are 400s there) and travel in
the request tuples as xgrammar's JSON text (:class:`~fastxlstm.serving.grammar.SerializedGrammar`), which the
worker turns back into compiled grammars (:class:`~fastxlstm.serving.grammar.GrammarStore`) for the matchers
and the sampler of its scheduler.
From it: ``("ready", info)`` or ``("failed", text)`` once, then ``("events", [(id, [events])])`` (one message per
scheduler hand-over, every request's events of that hand-over in it; token events as plain
``(choice, token, logprob, top_logprobs)`` tuples), ``("reply", qid, value)`` and ``("bye",)``.
When the worker dies, every request in flight gets a 503 error event (``engine_unavailable``), the proxy is no
longer ``alive`` (new requests 503) and its ``on_exit`` hook runs: :class:`~fastxlstm.serving.replicas.Replicas`
restarts the worker (:meth:`SchedulerProxy.start` again) or gives up and stops the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .delivery import post_events
from .grammar import GrammarStore, SerializedGrammar
from .metrics import Metrics
from .requests import ErrorEvent, FinishEvent, GenerationRequest, QueueFull, ShuttingDown, TokenEvent

log = logging.getLogger("fastxlstm.serving")

_REQUESTS_FAMILY = "fastxlstm_requests"  # the HTTP process's own metric (GuardMiddleware); all others: the worker's
_ENV_LOCK = threading.Lock()  # a worker's environment is the parent's os.environ at spawn time


class EngineUnavailable(ShuttingDown):
    """The engine (worker) process is not running: dead, restarting or given up (503 + Retry-After)."""

    code = "engine_unavailable"


@dataclass
class WorkerSpec:
    """How the worker builds its model: ``loader(*args, **kwargs)`` (picklable: a module-level function),
    returning the model (or ``(model, anything)``, as ``load_model_and_tokenizer`` does); with ``backend``,
    a ready :class:`~fastxlstm.serving.slots.SlotBackend` (e.g. a stand-in engine). ``replica_envs``: one dict of
    environment variables per data-parallel replica (``CUDA_VISIBLE_DEVICES``; empty: the parent's environment)."""

    loader: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    backend: bool = False
    replica_envs: tuple[dict[str, str], ...] = ()

    def load(self):
        out = self.loader(*self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


class RemoteBackend:
    """What the HTTP side needs to know of the worker's slot backend (``vocab_size`` once it is ready)."""

    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self.vocab_size = 0
        self.device = "?"


# ------------------------------------------------------------------------------------------- the worker
class _PipeSink:
    """Stands in for the event loop and queue of the worker's requests: the scheduler's hand-over
    (``loop.call_soon_threadsafe(_deliver, items)``) becomes one pipe message."""

    def __init__(self, conn):
        self.conn, self.lock = conn, threading.Lock()

    def send(self, msg) -> None:
        with self.lock:  # the scheduler thread's hand-overs and the command loop's replies share the pipe
            self.conn.send(msg)

    def call_soon_threadsafe(self, _fn, items: list) -> None:
        # token events as plain tuples (the app reads them as such): ~8x cheaper to pickle and unpickle
        tok = TokenEvent
        msg = ("events", [(req.id, [(ev.choice, ev.token, ev.logprob, ev.top_logprobs) if type(ev) is tok else ev
                                    for ev in events]) for req, events in items])
        self.send(msg)


def worker_main(spec: WorkerSpec, config, eos_token_id: int | None, cmd_conn, evt_conn) -> None:
    """The worker process: build model, backend and scheduler, then serve the command pipe until shutdown
    (or until the HTTP process goes away)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the HTTP process decides when to stop (Ctrl-C hits the group)
    from .runtime import make_backend, make_scheduler, warm_up

    try:
        model = spec.load()
        backend = model if spec.backend else make_backend(model, config.max_slots, config.backend)
        metrics = Metrics()
        # (the scheduler first: it turns speculative decoding on, whose graphs the warm-up captures too)
        scheduler = make_scheduler(backend, eos_token_id, config, metrics, max_waiting=1 << 30)  # the proxy gates
        warm_up(backend, config, metrics)
        scheduler.start()
    except BaseException:
        evt_conn.send(("failed", traceback.format_exc()))
        return
    evt_conn.send(("ready", {"vocab_size": backend.vocab_size, "max_slots": backend.max_slots,
                             "device": str(backend.device)}))
    sink = _PipeSink(evt_conn)
    send = sink.send
    live: weakref.WeakValueDictionary[int, GenerationRequest] = weakref.WeakValueDictionary()
    grammars = GrammarStore()

    while True:
        try:
            msg = cmd_conn.recv()
        except (EOFError, OSError):  # the HTTP process is gone
            scheduler.shutdown(0.0)
            return
        kind = msg[0]
        if kind == "submit":
            reqs, bad = [], []
            for rid, prompt, params, n, points, gen_end, arrival, deadline, scored, grammar in msg[1]:
                try:
                    compiled = None if grammar is None else grammars.load(grammar)
                except (RuntimeError, ValueError) as e:
                    bad.append((rid, [ErrorEvent(500, f"structured output failed in the engine process: {e}")]))
                    continue
                req = GenerationRequest(prompt, params, n, cache_points=points, cache_generation_end=gen_end,
                                        prompt_logprobs=scored, grammar=compiled)
                req.id, req.arrival, req.deadline = rid, arrival, deadline
                reqs.append(req)
            if bad:
                send(("events", bad))
            try:
                scheduler.submit(reqs, sink, sink)  # type: ignore[arg-type]
            except (QueueFull, ShuttingDown, ValueError) as e:
                status, code = (503, "shutting_down") if isinstance(e, ShuttingDown) else (
                    (429, "queue_full") if isinstance(e, QueueFull) else (400, None))
                send(("events", [(r.id, [ErrorEvent(status, str(e), code)]) for r in reqs]))
                continue
            for req in reqs:
                live[req.id] = req
        elif kind == "grammar_info":
            try:
                grammars.set_info(msg[1])
            except Exception:  # noqa: BLE001 - its requests fail one by one (load raises), the worker stays up
                log.exception("the tokenizer info of structured output does not load")
        elif kind == "cancel":
            for rid, choice in msg[1]:
                req = live.get(rid)
                if req is not None:
                    req.cancel(choice)
            scheduler.wake()
        elif kind == "query":
            _, qid, what = msg
            try:
                value = scheduler.stats() if what == "stats" else metrics.render(exclude={_REQUESTS_FAMILY})
            except Exception as e:
                value = e
            send(("reply", qid, value))
        elif kind == "shutdown":
            scheduler.shutdown(msg[1])
            send(("bye",))
            return


# ------------------------------------------------------------------------------------ the HTTP side
class _Entry:
    __slots__ = ("req", "open", "admitted")

    def __init__(self, req: GenerationRequest):
        self.req = req
        self.open = req.n  # choices without a finish event yet
        self.admitted = False  # prefilled (no longer counts against the queue)


class SchedulerProxy:
    """The app's scheduler, run by a worker process (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, config, eos_token_id: int | None, backend: RemoteBackend,
                 start_timeout: float | None = None, query_timeout: float = 10.0, replica: int = 0,
                 env: dict[str, str] | None = None):
        self.spec, self.config, self.eos_token_id, self.backend = spec, config, eos_token_id, backend
        self.replica = replica  # its index among the server's data-parallel replicas
        self.env = dict(env or {})  # set in the worker's environment (e.g. CUDA_VISIBLE_DEVICES)
        self.max_waiting = config.max_waiting
        self.start_timeout = start_timeout
        self.query_timeout = query_timeout
        self.process: mp.process.BaseProcess | None = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._live: dict[int, _Entry] = {}
        self._queued = 0  # submitted and not yet prefilled (or ended): the bounded queue
        self._queries: dict[int, concurrent.futures.Future] = {}
        self._qids = 0
        self._accepting = False
        self._alive = False
        self._reader: threading.Thread | None = None
        self._cmd = self._evt = None
        self._grammar_info: str | None = None  # the tokenizer info the running worker has been sent
        self.exit_reason: str | None = None
        self.on_exit: Callable[[SchedulerProxy], None] | None = None  # called (reader thread) when the worker dies

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Spawn the worker and wait until its model, graphs and scheduler are up (raises if it fails). After
        the worker died, this starts a new one (the reader of the old one has ended)."""
        ctx = mp.get_context("spawn")
        for conn in (self._cmd, self._evt):
            if conn is not None:
                conn.close()
        self.exit_reason = None
        with self._send_lock:  # a new worker: the tokenizer info goes again, before its first grammar
            cmd_r, self._cmd = ctx.Pipe(duplex=False)
            self._grammar_info = None
        self._evt, evt_w = ctx.Pipe(duplex=False)
        name = "fastxlstm-scheduler" + (f"-{self.replica}" if self.replica else "")
        self.process = ctx.Process(target=worker_main, name=name,
                                   args=(self.spec, self.config, self.eos_token_id, cmd_r, evt_w), daemon=True)
        # the environment is read when the child starts (CUDA reads CUDA_VISIBLE_DEVICES before any code of
        # ours could set it there): set it here around the spawn, as vLLM does for its engine processes
        with _ENV_LOCK:
            saved = {k: os.environ.get(k) for k in self.env}
            os.environ.update(self.env)
            try:
                self.process.start()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        cmd_r.close()
        evt_w.close()  # the worker holds the only write end: its exit reads as EOF here
        deadline = None if self.start_timeout is None else time.monotonic() + self.start_timeout
        while not self._evt.poll(0.5):
            if not self.process.is_alive():
                raise RuntimeError(f"the scheduler process exited during start-up (code {self.process.exitcode})")
            if deadline is not None and time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError("the scheduler process did not start in time")
        msg = self._evt.recv()
        if msg[0] != "ready":
            self.process.join(10)
            raise RuntimeError(f"the scheduler process failed to start:\n{msg[1]}")
        info = msg[1]
        self.backend.vocab_size, self.backend.max_slots, self.backend.device = (
            info["vocab_size"], info["max_slots"], info["device"])
        self._alive = self._accepting = True
        self._reader = threading.Thread(target=self._read, name="fastxlstm-worker-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def load(self) -> int:
        """Choices submitted here and not finished yet (what least-loaded routing compares)."""
        with self._lock:
            return sum(e.open for e in self._live.values())

    @property
    def accepting(self) -> bool:
        return self._accepting

    def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting; the worker drains for up to ``drain_timeout`` s, fails the rest (503) and exits."""
        self._accepting = False
        if self.process is None:
            return
        if self._alive:
            try:
                self._send(("shutdown", drain_timeout))
            except OSError:
                pass
        if self._reader is not None:
            self._reader.join(timeout=drain_timeout + 30)
        self.process.join(timeout=10)
        if self.process.is_alive():
            log.warning("the scheduler process did not exit; killing it")
            self.process.kill()
            self.process.join(timeout=10)
        self._cmd.close()

    # ------------------------------------------------------------------ requests (event-loop thread)
    def submit(self, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop,
               queue: asyncio.Queue) -> None:
        """As :meth:`Scheduler.submit`: all or none; :class:`QueueFull`, :class:`ShuttingDown`, ValueError."""
        for req in requests:
            if req.n > self.backend.max_slots:
                raise ValueError(f"n={req.n} exceeds the server's {self.backend.max_slots} sequence slots")
            if req.grammar is not None and not isinstance(req.grammar, SerializedGrammar):
                raise ValueError("a grammar for the scheduler process must be a SerializedGrammar")
        with self._lock:
            if not self._alive:
                raise EngineUnavailable("the engine process is not running")
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self._queued + len(requests) > self.max_waiting:
                raise QueueFull(f"too many requests waiting ({self.max_waiting}); retry later")
            for req in requests:
                req.loop, req.queue = loop, queue
                req.on_cancel = self._cancel_hook(req.id)
                self._live[req.id] = _Entry(req)
            self._queued += len(requests)
        info = next((r.grammar.info for r in requests if r.grammar is not None), None)
        try:
            self._send(("submit", [(r.id, r.prompt, r.params, r.n, r.cache_points, r.cache_generation_end,
                                    r.arrival, r.deadline, r.prompt_logprobs,
                                    None if r.grammar is None else r.grammar.compiled) for r in requests]), info)
        except OSError:  # the worker is gone: the reader fails these with the others
            pass

    def _cancel_hook(self, rid: int) -> Callable[[int | None], None]:
        def cancel(choice: int | None) -> None:
            if rid in self._live and self._alive:
                try:
                    self._send(("cancel", [(rid, choice)]))
                except OSError:
                    pass
        return cancel

    def wake(self) -> None:
        """(Cancellations go to the worker as they happen.)"""

    def stats(self) -> dict:
        """The worker scheduler's counts (a blocking round trip; the app uses :meth:`stats_async`)."""
        return self._query("stats").result(self.query_timeout)

    async def stats_async(self) -> dict:
        return await asyncio.wait_for(asyncio.wrap_future(self._query("stats")), self.query_timeout)

    async def metrics_async(self) -> bytes:
        """The worker's metrics (all but the HTTP request counts), Prometheus text."""
        return await asyncio.wait_for(asyncio.wrap_future(self._query("metrics")), self.query_timeout)

    def _query(self, what: str) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self._alive:
                fut.set_exception(EngineUnavailable("the engine process is not running"))
                return fut
            self._qids += 1
            qid = self._qids
            self._queries[qid] = fut
        try:
            self._send(("query", qid, what))
        except OSError as e:
            with self._lock:
                self._queries.pop(qid, None)
            fut.set_exception(EngineUnavailable(f"the engine process is not running ({e})"))
        return fut

    def _send(self, msg, grammar_info: str | None = None) -> None:
        """Send ``msg``; with ``grammar_info`` (a request under a grammar), the tokenizer info first, once per
        worker (under the same lock as the pipe's replacement in :meth:`start`)."""
        with self._send_lock:
            if grammar_info is not None and grammar_info is not self._grammar_info:
                self._cmd.send(("grammar_info", grammar_info))
                self._grammar_info = grammar_info
            self._cmd.send(msg)

    # ------------------------------------------------------------------ reader thread
    def _read(self) -> None:
        try:
            while True:
                msg = self._evt.recv()
                kind = msg[0]
                if kind == "events":
                    self._dispatch(msg[1])
                elif kind == "reply":
                    with self._lock:
                        fut = self._queries.pop(msg[1], None)
                    if fut is not None:
                        if isinstance(msg[2], BaseException):
                            fut.set_exception(msg[2])
                        else:
                            fut.set_result(msg[2])
                elif kind == "bye":
                    self.exit_reason = "shut down"
                    break
        except (EOFError, OSError):
            self.process.join(timeout=1)
            self.exit_reason = f"exited with code {self.process.exitcode}"
            log.error("the scheduler process%s (pid %s) %s", f" of replica {self.replica}" if self.replica else "",
                      self.process.pid, self.exit_reason)
        finally:
            self._gone()
        if self.exit_reason != "shut down" and self.on_exit is not None:
            self.on_exit(self)

    def _dispatch(self, items: list) -> None:
        batch: list[tuple[GenerationRequest, list]] = []
        with self._lock:
            for rid, events in items:
                entry = self._live.get(rid)
                if entry is None:
                    continue
                for ev in events:
                    kind = type(ev)
                    if kind is FinishEvent:
                        entry.open -= 1
                    elif kind is ErrorEvent:
                        entry.open = 0
                if not entry.admitted:  # its first events (prefill done, or an error): it left the queue
                    entry.admitted = True
                    self._queued -= 1
                if entry.open <= 0:
                    del self._live[rid]
                batch.append((entry.req, events))
        post_events(batch)

    def _gone(self) -> None:
        """The worker exited: fail whatever is in flight (503) and refuse new work."""
        with self._lock:
            self._alive = self._accepting = False
            entries, self._live = list(self._live.values()), {}
            self._queued = 0
            queries, self._queries = list(self._queries.values()), {}
        for fut in queries:
            if not fut.done():
                fut.set_exception(EngineUnavailable("the engine process is not running"))
        if not entries:
            return
        if self.exit_reason == "shut down":
            event = ErrorEvent(503, "the server shut down before this request finished", "shutdown")
        else:
            event = ErrorEvent(503, f"the engine process {self.exit_reason}; retry later", "engine_unavailable")
        post_events([(entry.req, [event]) for entry in entries])


__all__ = ["EngineUnavailable", "RemoteBackend", "SchedulerProxy", "WorkerSpec", "worker_main"]
