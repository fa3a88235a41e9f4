"""What stands between the socket and the endpoints: :class:`GuardMiddleware` (trusted Host names, the API key,
the body-size limit and read deadline, per-endpoint request metrics) and :func:`parse_body` (a JSON body into its
request schema, with OpenAI-style 400/415 errors)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from fastapi import Request
from pydantic import BaseModel, ValidationError

from .errors import APIError
from .memory import TRIM_AFTER_BYTES, trimmer
from .metrics import Metrics


def host_name(header: bytes | None) -> str | None:
    """The name of a Host header without its port (``[::1]:8000`` -> ``::1``), lower-cased."""
    if not header:
        return None
    try:
        host = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if host.startswith("["):  # an IPv6 literal
        name, sep, rest = host[1:].partition("]")
        ok = sep and (rest == "" or (rest.startswith(":") and rest[1:].isdigit()))
        return name if ok and name else None
    name, _, port = host.partition(":")
    name = name.rstrip(".")  # "localhost." is localhost
    return name if name and (not port or port.isdigit()) else None


def host_allowed(name: str | None, allowed: tuple[str, ...] | None) -> bool:
    """Whether a Host name is trusted: ``allowed`` None or holding ``*``: any; ``*.example.com``: its subdomains."""
    if allowed is None or "*" in allowed:
        return True
    if name is None:
        return False
    return any(name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


class GuardMiddleware:
    """Before any endpoint runs: the Host header must name this server (``allowed_hosts``; a DNS-rebinding page
    sends its own name), the API key must match (every path but ``/health``, and ``/metrics`` unless
    ``public_metrics``; ``/docs`` and ``/openapi.json`` too), the body must fit ``max_body_bytes`` (413 before the app
    parses anything) and arrive within ``body_timeout`` seconds of the headers (408). Counts requests per endpoint."""

    _ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}

    def __init__(self, app, max_body_bytes: int, metrics: Metrics, allowed_hosts: tuple[str, ...] | None = None,
                 api_key: str | None = None, public_metrics: bool = False, body_timeout: float | None = None):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.allowed_hosts = None if allowed_hosts is None else tuple(h.lower() for h in allowed_hosts)
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()
        self.open_paths = {"/health", "/metrics"} if public_metrics else {"/health"}
        self.body_timeout = body_timeout

    def _refusal(self, scope) -> APIError | None:
        headers = dict(scope.get("headers", []))
        if not host_allowed(host_name(headers.get(b"host")), self.allowed_hosts):
            return APIError(400, "the Host header does not name this server (see --allowed-hosts)",
                            code="invalid_host")
        if self.expected is not None and scope.get("path", "") not in self.open_paths:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return APIError(401, "invalid or missing API key", code="invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope.get("path", "") if scope.get("path", "") in self._ENDPOINTS else "other"
        status: dict[str, int] = {}
        timed_out = False

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if timed_out:  # the rest of the body is not worth waiting for: close after this answer
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        async def reply(err: APIError) -> None:
            resp = err.response()
            await resp(scope, receive, send_wrapper)

        length = dict(scope.get("headers", [])).get(b"content-length")
        limit = self.max_body_bytes
        received = 0
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await reply(refusal)
                return
            if length is not None:
                try:
                    declared = int(length)
                except ValueError:
                    await reply(APIError(400, "invalid Content-Length header"))
                    return
                if declared > limit:
                    received = declared
                    await self._drain(receive, declared)
                    await reply(APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                                         code="request_too_large"))
                    return
            body_done = False
            deadline = None if self.body_timeout is None else time.monotonic() + self.body_timeout

            async def limited_receive():
                nonlocal received, body_done, timed_out
                if body_done or deadline is None:
                    message = await receive()
                else:  # the body's deadline (later calls wait for the client to disconnect: no deadline)
                    try:
                        message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        timed_out = True
                        raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                                       code="request_timeout") from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    body_done = not message.get("more_body", False)
                    if received > limit:
                        raise APIError(413, f"request body exceeds the limit of {limit} bytes",
                                       code="request_too_large")
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status.get("code", 500))).inc()
            if received > TRIM_AFTER_BYTES:  # give the heap that body took back to the OS (serving.memory)
                trimmer.request()

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


def _decode(raw: bytes) -> object:
    if not raw.strip():
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None


OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed in the text threads, not on the event loop


async def parse_body(request: Request, schema: type[BaseModel], off_loop=None) -> BaseModel:
    """The body as ``schema``; a body over ``OFF_LOOP_BYTES`` is decoded and validated through ``off_loop``
    (``ServerState.off_loop``) when given."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (ctype == "application/json" or ctype.endswith("+json")):  # text/plain or none: what a cross-site
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")  # page can send
    raw = await request.body()
    if off_loop is not None and len(raw) > OFF_LOOP_BYTES:
        return await off_loop(_validate, raw, schema)
    return _validate(raw, schema)


def _validate(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    data = _decode(raw)
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

