"""One HTTP call's generation: its requests submitted to the scheduler, their events folded into per-choice text
updates (stop strings, logprobs, finish reasons), usage counts, and cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from ..text import StopText
from .errors import APIError
from .requests import (
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    PrefillDone,
    PromptLogprobs,
    QueueFull,
    ShuttingDown,
    TokenEvent,
)
from .schemas import Usage
from .server import ServerState

log = logging.getLogger("fastxlstm.serving")


@dataclass
class _ChoiceState:
    text: StopText
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] = field(default_factory=list)


@dataclass
class Update:
    index: int
    delta: str
    logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]]
    finish_reason: str | None


class Call:
    """One HTTP call: its generation requests, their choices' text, and usage counts."""

    def __init__(self, server: ServerState, reqs: list[GenerationRequest], n: int, stops: list[str] | None,
                 include_stop: bool):
        self.server, self.reqs, self.n = server, reqs, n
        self.offsets = {req.id: i * n for i, req in enumerate(reqs)}
        tok = server.tokenizer
        self.choices = [_ChoiceState(StopText(tok, stops, include_stop)) for _ in range(len(reqs) * n)]
        self.prompt_tokens = sum(len(r.prompt) for r in reqs)
        self.cached_tokens = 0
        self.prompt_scores: list = [None] * len(reqs)  # each request's PromptScores, where it asked for them
        self._req_index = {req.id: i for i, req in enumerate(reqs)}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = time.monotonic()

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens,
                     prompt_tokens_details={"cached_tokens": self.cached_tokens})

    def submit(self) -> None:
        try:
            self.server.scheduler.submit(self.reqs, asyncio.get_running_loop(), self.queue)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", retry_after=self.server.config.retry_after) from None
        except ShuttingDown as e:  # (EngineUnavailable: the worker process is down)
            raise APIError(503, str(e), code=getattr(e, "code", "shutting_down"),
                           retry_after=self.server.config.retry_after) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def log_disconnect(self) -> None:
        """The one log line of a client that went away before its answer was complete (no traceback)."""
        log.info("client disconnected after %.1f s: request %s cancelled after %d of its tokens",
                 time.monotonic() - self.started, ",".join(str(r.id) for r in self.reqs), self.completion_tokens)

    def cancel(self) -> None:
        for req in self.reqs:
            req.cancel()
        self.server.scheduler.wake()

    def _apply(self, req: GenerationRequest, events: list, out: dict[int, Update]) -> None:
        """Fold one request's events into ``out`` (one merged update per choice)."""
        special = {self.server.tokenizer.eos_token_id, *req.params.stop_token_ids}
        base = self.offsets[req.id]

        def update(idx: int) -> Update:
            u = out.get(idx)
            if u is None:
                u = out[idx] = Update(idx, "", [], None)
            return u

        for ev in events:
            kind = type(ev)
            if kind is TokenEvent or kind is tuple:  # a tuple: a token event as a scheduler process sends it
                choice, token, logprob, top = (ev.choice, ev.token, ev.logprob, ev.top_logprobs) \
                    if kind is TokenEvent else ev
                st = self.choices[base + choice]
                if st.finish_reason is not None:
                    continue
                st.tokens += 1
                st.text.add(token, special=token in special)
                u = update(base + choice)
                u.delta += st.text.ready()
                if logprob is not None:
                    u.logprobs.append((token, logprob, top))
                if st.text.stopped:
                    st.finish_reason = u.finish_reason = "stop"
                    req.cancel(choice)
                    self.server.scheduler.wake()
                    self.remaining -= 1
            elif isinstance(ev, FinishEvent):
                st = self.choices[base + ev.choice]
                if st.finish_reason is not None:
                    continue
                u = update(base + ev.choice)
                st.text.finish()
                u.delta += st.text.ready(final=True)
                st.finish_reason = u.finish_reason = "stop" if st.text.stopped else ev.reason
                self.remaining -= 1
            elif isinstance(ev, PrefillDone):
                self.cached_tokens += ev.cached_tokens
            elif isinstance(ev, PromptLogprobs):
                self.prompt_scores[self._req_index[req.id]] = ev.scores
            elif isinstance(ev, ErrorEvent):
                self.cancel()
                raise APIError(ev.status, ev.message, code=ev.code,
                               retry_after=self.server.config.retry_after if ev.status == 503 else None)

    async def batches(self) -> AsyncIterator[list[Update]]:
        """Updates as they come; whatever queued up meanwhile is merged into one update per choice, so a
        client (or an event loop) that falls behind gets fewer, larger chunks instead of a growing backlog."""
        self.remaining = len(self.choices)
        while self.remaining:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            merged: dict[int, Update] = {}
            for req, events in items:
                self._apply(req, events, merged)
            batch = [u for u in merged.values() if u.delta or u.logprobs or u.finish_reason is not None]
            if batch:
                yield batch

    async def updates(self) -> AsyncIterator[Update]:
        async for batch in self.batches():
            for u in batch:
                yield u


async def _watch_disconnect(request: Request, call: Call) -> None:
    """Cancel the call's generation when the client goes away (non-streaming requests)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            call.cancel()
            return


async def collect(request: Request, call: Call) -> tuple[list[str], list[list]]:
    """A non-streaming call's answer: each choice's whole text and its logprob entries (as :class:`Update`
    carries them); gives up (and cancels) when the client disconnects."""

    async def gather() -> list[Update]:
        return [u async for u in call.updates()]

    work = asyncio.create_task(gather())
    watcher = asyncio.create_task(_watch_disconnect(request, call))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client is gone: nobody will read an answer
            work.cancel()
            call.log_disconnect()
            raise APIError(499, "client closed the request", code="client_closed")
        texts = [""] * len(call.choices)
        logprobs: list[list] = [[] for _ in call.choices]
        for u in work.result():
            texts[u.index] += u.delta
            logprobs[u.index].extend(u.logprobs)
        return texts, logprobs
    finally:
        watcher.cancel()
        work.cancel()
        call.cancel()  # no-op for finished requests; frees slots if we leave early

