"""Handing the scheduler's events to asyncio: an :class:`Outbox` collects them per request in the scheduler
thread and hands what is due to the requests' event loops, one thread-safe wake-up per loop."""

from __future__ import annotations

import asyncio
import time

from .requests import GenerationRequest, TokenEvent


class Outbox:
    """Events waiting to be handed over, per request. With ``stream_interval`` > 0 (seconds), a request's
    tokens are handed over at most once per interval; its first token, its end and errors go at once."""

    def __init__(self, stream_interval: float = 0.0):
        if stream_interval < 0:
            raise ValueError(f"stream_interval must be >= 0, got {stream_interval}")
        self.stream_interval = stream_interval  # seconds between two hand-overs of one request's tokens
        self.pending: dict[int, tuple[GenerationRequest, list]] = {}

    def __bool__(self) -> bool:
        return bool(self.pending)

    def post(self, req: GenerationRequest, event) -> None:
        self.pending.setdefault(req.id, (req, []))[1].append(event)

    def flush(self, force: bool = False) -> None:
        """Hand the events due to the event loop(s): one thread-safe wake-up per loop. With a stream
        interval, a request's tokens wait until the interval since its last hand-over has passed, unless
        ``force`` or anything but tokens is among its events."""
        pending, self.pending = self.pending, {}
        now = time.monotonic()
        interval = 0.0 if force else self.stream_interval
        due: list[tuple[GenerationRequest, list]] = []
        for key, (req, events) in pending.items():
            if req.loop is None or req.queue is None:
                continue
            if (interval and now - req.last_delivery < interval and req.first_token_time is not None
                    and all(type(ev) is TokenEvent for ev in events)):
                self.pending[key] = (req, events)  # not due yet
                continue
            req.last_delivery = now
            due.append((req, events))
        post_events(due)


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
