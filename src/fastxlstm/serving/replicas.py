"""The engine processes behind one HTTP front end: ``data_parallel_size`` scheduler worker processes (one per GPU,
``CUDA_VISIBLE_DEVICES`` per worker; on a CPU just N processes), a router, and a watchdog.

:class:`Replicas` is the app's scheduler whenever the model runs in worker processes (``--scheduler-process``,
``--data-parallel-size N``; one replica is the plain scheduler process). It offers the interface the app uses
of a :class:`~fastxlstm.serving.scheduler.Scheduler` and hands each call's requests to one
:class:`~fastxlstm.serving.worker.SchedulerProxy`: the replica that holds the prompt's longest cached prefix,
else the least-loaded one (:mod:`.router`); when that replica's queue is full, the next least-loaded one.

Watchdog: when a worker dies (killed, out of memory, a device fault), its requests in flight end at once with a
503 ``engine_unavailable`` error (streams: an error event, then ``[DONE]``), new requests go to the other
replicas (or get 503 + Retry-After when none is up), ``/health`` says so, and the worker is started again after
``restart_backoff`` x 2^k seconds (k: its restarts in the window; at most 30 s). A replica that needs more than
``worker_restarts`` restarts within ``restart_window`` seconds makes the server give up: the front end stops
(drain as on SIGTERM) and ``fastxlstm serve`` exits with status 1, so a supervisor (systemd, Kubernetes) can
restart the whole server, as vLLM's API server exits when its engine dies. ``worker_restarts=0`` gives up at the
first death.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .prefix_cache import block_hashes
from .requests import GenerationRequest, QueueFull, ShuttingDown
from .router import PrefixRouter
from .worker import EngineUnavailable, RemoteBackend, SchedulerProxy, WorkerSpec

log = logging.getLogger("fastxlstm.serving")

MAX_BACKOFF = 30.0  # seconds: the longest wait before a restart


class Replicas:
    """Worker processes, routing and restarts (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, config, eos_token_id: int | None, backend: RemoteBackend,
                 on_fatal: Callable[[str], None] | None = None):
        n = config.data_parallel_size
        if n < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {n}")
        envs = list(spec.replica_envs) or [{}] * n
        if len(envs) != n:
            raise ValueError(f"{len(envs)} replica environments for data_parallel_size={n}")
        self.config, self.backend, self.on_fatal = config, backend, on_fatal
        self.proxies = [SchedulerProxy(spec, config, eos_token_id, RemoteBackend(config.max_slots), replica=i,
                                       env=envs[i]) for i in range(n)]
        self.router = PrefixRouter(n, slack=config.max_slots)
        self.fatal: str | None = None  # why the server gave up
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._accepting = False
        self._restarts: list[deque[float]] = [deque() for _ in range(n)]
        self._restarting: dict[int, str] = {}  # replica -> what its watchdog is doing
        self._threads: list[threading.Thread] = []
        r = self.registry = CollectorRegistry()
        self.routed = Counter("fastxlstm_router_requests", "Requests handed to each replica, by how it was chosen "
                              "(prefix affinity or least loaded)", ["replica", "route"], registry=r)
        self.restarts = Counter("fastxlstm_worker_restarts", "Engine worker processes started again after they "
                                "died", ["replica"], registry=r)
        self.up = Gauge("fastxlstm_replica_up", "Whether each replica's engine process is running", ["replica"],
                        registry=r)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start every worker (in parallel) and wait until all are up; raises if one fails (the others stop)."""
        errors: list[BaseException] = []

        def one(proxy: SchedulerProxy) -> None:
            try:
                proxy.start()
            except BaseException as e:  # reported below
                errors.append(e)

        _each_in_a_thread(one, self.proxies)
        if errors:
            for proxy in self.proxies:
                if proxy.alive:
                    proxy.shutdown(0.0)
            raise errors[0]
        first = self.proxies[0].backend
        self.backend.vocab_size, self.backend.max_slots, self.backend.device = (
            first.vocab_size, first.max_slots, first.device)
        for proxy in self.proxies:
            proxy.on_exit = self._died
            self.up.labels(replica=str(proxy.replica)).set(1)
        self._accepting = True

    @property
    def alive(self) -> bool:
        """At least one replica runs."""
        return any(p.alive for p in self.proxies)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def pid(self) -> int | None:
        return self.proxies[0].pid

    def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting and restarting; every replica drains for up to ``drain_timeout`` s and exits."""
        self._accepting = False
        self._stopping.set()
        for th in list(self._threads):
            th.join(timeout=60)
        _each_in_a_thread(lambda p: p.shutdown(drain_timeout), self.proxies)

    # ------------------------------------------------------------------ watchdog
    def _died(self, proxy: SchedulerProxy) -> None:
        """(The proxy's reader thread.) Its worker exited: restart it in the background, or give up."""
        i = proxy.replica
        self.up.labels(replica=str(i)).set(0)
        with self._lock:
            self.router.forget(i)  # a new worker starts with an empty prefix cache
        if self._stopping.is_set():
            return
        th = threading.Thread(target=self._restart, args=(proxy,), name=f"fastxlstm-watchdog-{i}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [th]
        th.start()

    def _restart(self, proxy: SchedulerProxy) -> None:
        i, cfg = proxy.replica, self.config
        times = self._restarts[i]
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                while times and now - times[0] > cfg.restart_window:
                    times.popleft()
                if len(times) >= cfg.worker_restarts:
                    self._give_up(f"the engine process of replica {i} {proxy.exit_reason} after {len(times)} "
                                  f"restart(s) in {cfg.restart_window:.0f} s (worker_restarts={cfg.worker_restarts})")
                    return
                delay = min(cfg.restart_backoff * 2 ** len(times), MAX_BACKOFF)
                self._restarting[i] = f"restarting (in {delay:.1f} s)"
                log.warning("replica %d: the engine process %s; restarting it in %.1f s", i, proxy.exit_reason, delay)
                if self._stopping.wait(delay):
                    return
                times.append(time.monotonic())
                self._restarting[i] = "restarting"
                self.restarts.labels(replica=str(i)).inc()
                try:
                    proxy.start()
                except RuntimeError as e:
                    proxy.exit_reason = "failed to start"
                    log.error("replica %d: the engine process failed to restart: %s", i, str(e)[-2000:])
                    continue
                self.up.labels(replica=str(i)).set(1)
                log.warning("replica %d: the engine process is running again (pid %s)", i, proxy.pid)
                return
        finally:
            self._restarting.pop(i, None)

    def _give_up(self, reason: str) -> None:
        log.critical("giving up: %s; the server stops (exit status 1) so that its supervisor can restart it", reason)
        self.fatal = reason
        self._accepting = False
        if self.on_fatal is not None:
            self.on_fatal(reason)

    # ------------------------------------------------------------------ requests (event-loop thread)
    def submit(self, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop,
               queue: asyncio.Queue) -> None:
        """All of one call's requests go to one replica (all or none): the prefix-affine or least-loaded one,
        then the others by load while queues are full. Raises as :meth:`Scheduler.submit`."""
        if not self._accepting:
            raise EngineUnavailable(self.fatal) if self.fatal else ShuttingDown("the server is shutting down")
        hashes = block_hashes(requests[0].prompt) if requests else []
        with self._lock:
            loads = {p.replica: p.load for p in self.proxies if p.alive}
            if not loads:
                raise EngineUnavailable("the engine process is restarting" if self._restarting else
                                        "the engine process is not running")
            first, affine = self.router.choose(hashes, loads)
        order = [first] + sorted((i for i in loads if i != first), key=loads.__getitem__)
        error: Exception | None = None
        for i in order:
            try:
                self.proxies[i].submit(requests, loop, queue)
            except (QueueFull, ShuttingDown) as e:
                error = e
                continue
            with self._lock:
                self.router.record(hashes, i)
            self.routed.labels(replica=str(i), route="affinity" if affine and i == first else "least_loaded").inc()
            return
        assert error is not None
        raise error

    def wake(self) -> None:
        """(Cancellations go to the workers as they happen.)"""

    async def stats_async(self) -> dict:
        """The replicas' scheduler counts, summed, and each replica's (``replicas``); raises
        :class:`EngineUnavailable` when no replica answers."""
        async def one(proxy: SchedulerProxy) -> dict:
            if not proxy.alive:
                return {"replica": proxy.replica, "status": self._restarting.get(proxy.replica, "not running")}
            try:
                return {"replica": proxy.replica, "status": "ok", **await proxy.stats_async()}
            except (ShuttingDown, asyncio.TimeoutError):
                return {"replica": proxy.replica, "status": "not answering"}

        each = await asyncio.gather(*(one(p) for p in self.proxies))
        ok = [s for s in each if s["status"] == "ok"]
        if not ok:
            raise EngineUnavailable("; ".join(f"replica {s['replica']}: {s['status']}" for s in each))
        total = {k: sum(s[k] for s in ok) for k in ok[0] if k not in ("replica", "status")}
        return {**total, "replicas": each} if len(each) > 1 else total

    def stats(self) -> dict:
        """(Blocking.) The summed counts of the replicas that answer."""
        each = [p.stats() for p in self.proxies if p.alive]
        if not each:
            raise EngineUnavailable("the engine process is not running")
        return {k: sum(s[k] for s in each) for k in each[0]}

    async def metrics_async(self) -> bytes:
        """The workers' metrics (one replica: as it renders them; several: each sample labelled ``replica``),
        then the router's and watchdog's."""
        async def one(proxy: SchedulerProxy) -> bytes:
            try:
                return await proxy.metrics_async() if proxy.alive else b""
            except (ShuttingDown, asyncio.TimeoutError):
                return b""

        texts = await asyncio.gather(*(one(p) for p in self.proxies))
        body = texts[0] if len(texts) == 1 else label_replicas({i: t for i, t in enumerate(texts) if t})
        return body + generate_latest(self.registry)


def label_replicas(texts: dict[int, bytes]) -> bytes:
    """Prometheus texts of several replicas as one: each family once, every sample with a ``replica`` label."""
    families: dict[str, Metric] = {}
    for replica, text in texts.items():
        for fam in text_string_to_metric_families(text.decode()):
            out = families.get(fam.name)
            if out is None:
                out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            out.samples.extend(s._replace(labels={**s.labels, "replica": str(replica)}) for s in fam.samples)
    return generate_latest(_Families(list(families.values())))  # type: ignore[arg-type]


class _Families:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


__all__ = ["Replicas", "label_replicas"]


def _each_in_a_thread(fn: Callable[[SchedulerProxy], object], proxies: list[SchedulerProxy]) -> None:
    """``fn(proxy)`` for every proxy at once, each in a daemon thread of its own; returns when all have."""
    threads = [threading.Thread(target=fn, args=(p,), daemon=True) for p in proxies]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
