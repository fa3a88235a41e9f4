"""The HTTP layer under the app: uvicorn's h11 protocol with a request-header deadline and a connection cap,
the uvicorn options ``fastxlstm serve`` exposes, and rate limits on the logs a flood of bad clients writes.

uvicorn has no deadline for a request's headers (its keep-alive timer runs only between requests, and any
byte stops it), so a client that opens a connection and sends a header byte now and then holds a file
descriptor forever (slowloris). Here every connection must deliver a request's complete headers within
``header_timeout`` seconds of opening (or of its previous response ending), or it is closed. With more
than ``max_connections`` open, a new connection closes the oldest one that has no request in progress
(waiting for headers or idle between requests), or itself when every other one is busy; so a flood of
idle connections cannot take the descriptors a health check needs. The body's deadline is the app's
(``ServeConfig.body_timeout``: a 408 through the usual error body).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("fastxlstm.serving")

FD_RESERVE = 64  # file descriptors kept free of connections (model files, the worker's pipes, logs)


@dataclass
class HTTPOptions:
    """Connection-level limits (uvicorn's option names where uvicorn has the option)."""

    header_timeout: float = 10.0  # seconds for a request's complete headers (None: no deadline)
    max_connections: int | None = None  # open connections before idle ones are closed (None: fd limit - reserve)
    limit_concurrency: int | None = None  # uvicorn: connections or requests in flight before 503 (None: off)
    backlog: int = 2048  # uvicorn: listen() backlog of not yet accepted connections
    timeout_keep_alive: int = 5  # uvicorn: seconds an idle keep-alive connection stays open
    h11_max_incomplete_event_size: int | None = None  # uvicorn: bytes of one request's headers (None: 16 KiB)
    access_log: bool = True
    log_burst: int = 20  # per message template and window: records logged before the rest are counted only
    log_window: float = 10.0

    def connection_cap(self) -> int:
        if self.max_connections is not None:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(16, soft - FD_RESERVE) if soft != resource.RLIM_INFINITY else 65536


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (as vLLM does); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the header deadline and the connection cap (class attributes, set by
    :func:`guarded_protocol`)."""

    header_timeout: float | None = 10.0
    max_connections: int = 65536

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting_since: float | None = None
        self._header_timer = None
        self._start_header_clock()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def _make_room(self) -> None:
        idle = [c for c in self.connections if c is not self and getattr(c, "_waiting_since", None) is not None]
        victim = min(idle, key=lambda c: c._waiting_since) if idle else self
        log.warning("connection cap of %d reached: closing %s", self.max_connections,
                         "the oldest idle connection" if idle else "a new connection (all others busy)")
        victim._close()

    def _close(self) -> None:
        self._stop_header_clock()
        self.connections.discard(self)
        self.transport.close()

    def _start_header_clock(self) -> None:
        self._stop_header_clock()
        self._waiting_since = time.monotonic()
        if self.header_timeout is not None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _stop_header_clock(self) -> None:
        self._waiting_since = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._waiting_since is not None and not self.transport.is_closing():
            log.warning("closed a connection that sent no complete request headers within %.0f s",
                             self.header_timeout)
            self._close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers arrived (maybe one pipelined after a response)
            self._stop_header_clock()

    def on_response_complete(self) -> None:
        self._start_header_clock()  # before uvicorn handles a pipelined next request
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)


def guarded_protocol(options: HTTPOptions) -> type[GuardedH11Protocol]:
    attrs = {"header_timeout": options.header_timeout, "max_connections": options.connection_cap()}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attrs)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but on the stop signal (SIGINT/SIGTERM, ``should_exit``) the app drains first
    (``app.state.drain``: refuse new work with 503, finish or end what runs) while the socket still listens, so
    new clients get a 503 + Retry-After instead of a refused connection; then uvicorn's own shutdown closes the
    listener and waits for the responses to end (``timeout_graceful_shutdown``). It also stops when the app gives up
    on its engine (``app.state.fatal``: worker processes that keep dying); ``fastxlstm serve`` then exits with 1."""

    @property
    def fatal(self) -> str | None:
        return getattr(getattr(self.config.app, "state", None), "fatal", None)

    async def on_tick(self, counter: int) -> bool:
        if self.fatal is not None:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        drain = getattr(getattr(self.config.app, "state", None), "drain", None)
        if drain is not None:
            try:
                await drain()
            except Exception:
                log.exception("draining failed")
            await asyncio.sleep(0.05)  # let the last events reach their streams
        await super().shutdown(sockets)


def uvicorn_config(app, host: str, port: int, options: HTTPOptions | None = None, log_level: str = "info",
                   graceful_timeout: float | None = None) -> uvicorn.Config:
    """The uvicorn config of a server (CLI and tests alike), with the log rate limits installed."""
    options = options or HTTPOptions()
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", http=guarded_protocol(options),
        timeout_graceful_shutdown=graceful_timeout, limit_concurrency=options.limit_concurrency,
        backlog=options.backlog, timeout_keep_alive=options.timeout_keep_alive,
        h11_max_incomplete_event_size=options.h11_max_incomplete_event_size, access_log=options.access_log,
    )
    install_log_limits(options.log_burst, options.log_window)  # after uvicorn configured its loggers
    return config


# ------------------------------------------------------------------------------------------ log limits
class RateLimitFilter(logging.Filter):
    """At most ``burst`` records per message template in each ``window`` seconds; the first record after a
    window in which some were dropped says how many."""

    def __init__(self, burst: int = 20, window: float = 10.0):
        super().__init__()
        self.burst, self.window = burst, window
        self._counts: dict[tuple[str, object], list] = {}  # key -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        slot = self._counts.get(key)
        if slot is None or now - slot[0] >= self.window:
            dropped = slot[2] if slot is not None else 0
            if len(self._counts) > 1024:  # many distinct templates: forget old windows
                self._counts = {k: v for k, v in self._counts.items() if now - v[0] < self.window}
            slot = self._counts[key] = [now, 0, 0]
            if dropped:
                record.msg = f"{record.msg} ({dropped} similar messages suppressed in the previous window)"
        if slot[1] < self.burst:
            slot[1] += 1
            return True
        slot[2] += 1
        return False


_LIMITED = ("uvicorn.error", "asyncio", "fastxlstm.serving")


def install_log_limits(burst: int = 20, window: float = 10.0) -> None:
    """Rate-limit warnings and errors of uvicorn, asyncio (accept() failures when out of descriptors) and the
    server (one filter per logger; installing again replaces it)."""
    for name in _LIMITED:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, RateLimitFilter)]:
            logger.removeFilter(f)
        logger.addFilter(RateLimitFilter(burst, window))
