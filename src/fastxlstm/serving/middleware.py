"""What stands between the socket and the endpoints: :class:`GuardMiddleware` (the body-size limit, 413 before
anything is parsed, and per-endpoint request metrics) and :func:`parse_body` (a JSON body into its request schema,
with OpenAI-style 400/415 errors)."""

from __future__ import annotations

import json

from fastapi import Request
from pydantic import BaseModel, ValidationError

from .errors import APIError
from .metrics import Metrics


class GuardMiddleware:
    """Body-size limit (413 before the app parses anything) and per-endpoint request metrics."""

    _ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}

    def __init__(self, app, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope.get("path", "") if scope.get("path", "") in self._ENDPOINTS else "other"
        status: dict[str, int] = {}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def reply(err: APIError) -> None:
            resp = err.response()
            await resp(scope, receive, send_wrapper)

        length = dict(scope.get("headers", [])).get(b"content-length")
        limit = self.max_body_bytes
        try:
            if length is not None:
                try:
                    declared = int(length)
                except ValueError:
                    await reply(APIError(400, "invalid Content-Length header"))
                    return
                if declared > limit:
                    await self._drain(receive, declared)
                    await reply(APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                                         code="request_too_large"))
                    return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise APIError(413, f"request body exceeds the limit of {limit} bytes",
                                       code="request_too_large")
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status.get("code", 500))).inc()

    @staticmethod
    async def _drain(receive, declared: int, cap: int = 256 * 1024 * 1024) -> None:
        """Read (and drop) a too-large body, so the client can read our 413 instead of a reset."""
        if declared > cap:
            return
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return



def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _param(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("body",)) or None


async def parse_body(request: Request, schema: type[BaseModel]) -> BaseModel:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and not (ctype == "application/json" or ctype.endswith("+json") or ctype == "text/plain"):
        raise APIError(415, f"Content-Type must be application/json, got {ctype!r}")
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        param = _param(tuple(first.get("loc", ())))
        msgs = []
        for err in errors[:3]:
            where = _param(tuple(err.get("loc", ())))
            msg = err.get("msg", "invalid")
            if err.get("type") == "extra_forbidden":
                msg = "unrecognized request argument"
            msgs.append(f"{where}: {msg}" if where else msg)
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise APIError(400, "; ".join(msgs) + more, param=param) from None

