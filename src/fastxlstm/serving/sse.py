"""Server-sent events: the ``data:`` framing, the byte-identical fast per-token chunk (:class:`SSEChunks`) and the
response around a call's chunk stream (:func:`event_stream`: usage chunk, ``[DONE]``, errors, cancellation)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from .errors import APIError


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_event(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else dumps(obj)
    return f"data: {data}\n\n"


def event_stream(call, head: dict, include_usage: bool, events: AsyncIterator[str]) -> StreamingResponse:
    """SSE response around a request's chunk stream: usage chunk, ``[DONE]``, errors as an error
    event, and the request cancelled (slot freed) however the stream ends, client disconnects too."""

    async def stream() -> AsyncIterator[str]:
        gone = False
        try:
            async for piece in events:
                yield piece
            if include_usage:
                yield sse_event({**head, "choices": [], "usage": call.usage().model_dump()})
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield sse_event(e.body())
            yield "data: [DONE]\n\n"
        except (GeneratorExit, asyncio.CancelledError):  # the client went away: starlette closes or cancels us
            gone = True
            raise
        finally:
            await events.aclose()
            call.cancel()
            if gone:
                call.log_disconnect()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class SSEChunks:
    """Per-token SSE chunks of one streamed response, built from a pre-serialised head: only the fields that
    change (text piece, logprobs, finish reason, usage) go through ``json.dumps``. The result is byte for byte
    ``sse_event({**head, "choices": [{"index": index, **fields}], "usage": usage})``."""

    def __init__(self, head: dict):
        self.prefix = "data: " + dumps(head)[:-1] + ',"choices":[{"index":'

    def chunk(self, index: int, fields: str, usage: dict | None = None) -> str:
        """``fields``: the choice's other members, pre-serialised, each starting with a comma."""
        return f'{self.prefix}{index}{fields}}}],"usage":{"null" if usage is None else dumps(usage)}}}\n\n'

    @staticmethod
    def field(key: str, value) -> str:
        """``,"key":value`` (the key must need no JSON escaping)."""
        return f',"{key}":null' if value is None else f',"{key}":{dumps(value)}'

