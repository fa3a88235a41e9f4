"""The FastAPI application: OpenAI-compatible routes over the continuous-batching scheduler."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..tokenizer import Tokenizer
from .chat_template import ChatTemplate, ChatTemplateError
from .errors import APIError, error_response, http_phrase
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .sampling import SamplingParams
from .scheduler import (
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    PrefillDone,
    QueueFull,
    Scheduler,
    ShuttingDown,
    TokenEvent,
)
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
from .slots import ModelSlots, SlotBackend, warm_prefill
from .text import StopText
from .worker import RemoteBackend, SchedulerProxy, WorkerSpec

log = logging.getLogger("fastxlstm.serving")


@dataclass
class ServeConfig:
    """Limits and knobs of one server."""

    model_name: str = "fastxlstm"
    backend: str = "auto"  # "engine" (fused kernels, CUDA-graph decode), "model" (plain model calls), "auto"
    aliases: tuple[str, ...] = ()
    max_slots: int = 32
    max_waiting: int = 256
    prefill_chunk: int = 2048  # prompt tokens prefilled per scheduler iteration (between two decode steps)
    prefill_pad_ratio: float = 1.3  # prompts of different lengths share a forward while padded <= this x real
    stream_interval_ms: float = 0.0  # >0: hand a request's tokens to the HTTP side at most this often (first
    # token, finish and errors go at once): fewer, larger SSE chunks, up to this much extra latency per token
    decode_steps_per_read: int = 4  # greedy-only batches: decode steps between two host reads of the tokens
    overlap_decode: bool = True  # queue the next window before reading the previous one's tokens
    early_launch: bool = False  # queue each iteration's window before its prefill (two windows ahead of the host)
    scheduler_process: bool = False  # run model + scheduler in a worker process (own GIL); see serving.worker
    warm_prefill: bool = True  # at start-up, prefill once per kernel shape class (GPU backends only)
    max_model_len: int = 32768
    default_max_tokens: int = 1024  # chat, when the request gives none (completions default to 16, as OpenAI)
    prefix_cache_bytes: int = 2 * 1024**3
    cache_chat_turns: bool = True
    request_timeout: float | None = 600.0
    max_body_bytes: int = 16 * 1024 * 1024
    max_prompts: int = 64  # prompts in one /v1/completions call
    api_key: str | None = None
    retry_after: float = 1.0
    extra_model_names: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ middleware
class _BodyTooLarge(Exception):
    pass


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


# --------------------------------------------------------------------------------------------- helpers
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


def _now() -> int:
    return int(time.time())


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else _dumps(obj)
    return f"data: {data}\n\n"

def _event_stream(call, head: dict, include_usage: bool, events: AsyncIterator[str]) -> StreamingResponse:
    """SSE response around a request's chunk stream: usage chunk, ``[DONE]``, errors as an error
    event, and the request cancelled (slot freed) however the stream ends, client disconnects too."""

    async def stream() -> AsyncIterator[str]:
        try:
            async for piece in events:
                yield piece
            if include_usage:
                yield _sse({**head, "choices": [], "usage": call.usage().model_dump()})
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield _sse(e.body())
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()
            call.cancel()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})



class SSEChunks:
    """Per-token SSE chunks of one streamed response, built from a pre-serialised head: only the fields that
    change (text piece, logprobs, finish reason, usage) go through ``json.dumps``. The result is byte for byte
    ``_sse({**head, "choices": [{"index": index, **fields}], "usage": usage})``."""

    def __init__(self, head: dict):
        self.prefix = "data: " + _dumps(head)[:-1] + ',"choices":[{"index":'

    def chunk(self, index: int, fields: str, usage: dict | None = None) -> str:
        """``fields``: the choice's other members, pre-serialised, each starting with a comma."""
        return f'{self.prefix}{index}{fields}}}],"usage":{"null" if usage is None else _dumps(usage)}}}\n\n'

    @staticmethod
    def field(key: str, value) -> str:
        """``,"key":value`` (the key must need no JSON escaping)."""
        return f',"{key}":null' if value is None else f',"{key}":{_dumps(value)}'


@dataclass
class _ChoiceState:
    text: StopText
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] = field(default_factory=list)


@dataclass
class _Update:
    index: int
    delta: str
    logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]]
    finish_reason: str | None


class _Call:
    """One HTTP call: its generation requests, their choices' text, and usage counts."""

    def __init__(self, server: ServerState, reqs: list[GenerationRequest], n: int, stops: list[str] | None,
                 include_stop: bool):
        self.server, self.reqs, self.n = server, reqs, n
        self.offsets = {req.id: i * n for i, req in enumerate(reqs)}
        tok = server.tokenizer
        self.choices = [_ChoiceState(StopText(tok, stops, include_stop)) for _ in range(len(reqs) * n)]
        self.prompt_tokens = sum(len(r.prompt) for r in reqs)
        self.cached_tokens = 0
        self.queue: asyncio.Queue = asyncio.Queue()

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
        except ShuttingDown as e:
            raise APIError(503, str(e), code="shutting_down", retry_after=self.server.config.retry_after) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def cancel(self) -> None:
        for req in self.reqs:
            req.cancel()
        self.server.scheduler.wake()

    def _apply(self, req: GenerationRequest, events: list, out: dict[int, _Update]) -> None:
        """Fold one request's events into ``out`` (one merged update per choice)."""
        special = {self.server.tokenizer.eos_token_id, *req.params.stop_token_ids}
        base = self.offsets[req.id]

        def update(idx: int) -> _Update:
            u = out.get(idx)
            if u is None:
                u = out[idx] = _Update(idx, "", [], None)
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
            elif isinstance(ev, ErrorEvent):
                self.cancel()
                raise APIError(ev.status, ev.message, code=ev.code)

    async def batches(self) -> AsyncIterator[list[_Update]]:
        """Updates as they come; whatever queued up meanwhile is merged into one update per choice, so a
        client (or an event loop) that falls behind gets fewer, larger chunks instead of a growing backlog."""
        self.remaining = len(self.choices)
        while self.remaining:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            merged: dict[int, _Update] = {}
            for req, events in items:
                self._apply(req, events, merged)
            batch = [u for u in merged.values() if u.delta or u.logprobs or u.finish_reason is not None]
            if batch:
                yield batch

    async def updates(self) -> AsyncIterator[_Update]:
        async for batch in self.batches():
            for u in batch:
                yield u


async def _watch_disconnect(request: Request, call: _Call) -> None:
    """Cancel the call's generation when the client goes away (non-streaming requests)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            call.cancel()
            return


async def _collect(request: Request, call: _Call) -> list[_Update]:
    """All updates of a non-streaming call; gives up (and cancels) when the client disconnects."""

    async def gather() -> list[_Update]:
        return [u async for u in call.updates()]

    work = asyncio.create_task(gather())
    watcher = asyncio.create_task(_watch_disconnect(request, call))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client is gone: nobody will read an answer
            work.cancel()
            raise APIError(499, "client closed the request", code="client_closed")
        return work.result()
    finally:
        watcher.cancel()
        work.cancel()
        call.cancel()  # no-op for finished requests; frees slots if we leave early


# --------------------------------------------------------------------------------------------- server
def make_scheduler(backend: SlotBackend, eos_token_id: int | None, config: ServeConfig, metrics: Metrics,
                   max_waiting: int | None = None) -> Scheduler:
    """The scheduler (and its prefix cache) a server of ``config`` runs over ``backend``."""
    cache = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes > 0 else None
    return Scheduler(backend, eos_token_id, cache, metrics,
                     max_waiting=config.max_waiting if max_waiting is None else max_waiting,
                     prefill_chunk=config.prefill_chunk, stream_interval=config.stream_interval_ms / 1000,
                     decode_steps_per_read=config.decode_steps_per_read, overlap=config.overlap_decode,
                     prefill_pad_ratio=config.prefill_pad_ratio, early_launch=config.early_launch)


def warm_up(backend: SlotBackend, config: ServeConfig, metrics: Metrics) -> None:
    """Before serving: the engine's decode CUDA graphs, then the prefill graphs and kernel variants
    (GPU only); the times go to the ``startup_seconds`` gauge."""
    engine = getattr(backend, "engine", None)
    started = time.perf_counter()
    if engine is not None and hasattr(engine, "warmup"):  # no-op on CPU
        engine.warmup()
        metrics.startup_seconds.labels(phase="decode_graphs").set(time.perf_counter() - started)
    if config.warm_prefill:
        started = time.perf_counter()
        runs = warm_prefill(backend, min(config.prefill_chunk, config.max_model_len - 1), budget=config.prefill_chunk)
        metrics.startup_seconds.labels(phase="prefill_warmup").set(time.perf_counter() - started)
        log.info("prefill warm-up: %d graphs and prefills in %.1f s", runs, time.perf_counter() - started)


class ServerState:
    """Everything a route needs: tokenizer, template, scheduler, metrics, config. ``backend`` a
    :class:`~fastxlstm.serving.worker.WorkerSpec`: the scheduler runs in a worker process (a proxy here)."""

    def __init__(self, backend: SlotBackend | WorkerSpec, tokenizer: Tokenizer, config: ServeConfig,
                 chat_template: ChatTemplate | None = None):
        self.tokenizer, self.config = tokenizer, config
        self.chat_template = chat_template or ChatTemplate()
        self.metrics = Metrics()
        self.remote = isinstance(backend, WorkerSpec)
        self.scheduler: Scheduler | SchedulerProxy
        if isinstance(backend, WorkerSpec):
            self.backend = RemoteBackend(config.max_slots)
            self.scheduler = SchedulerProxy(backend, config, tokenizer.eos_token_id, self.backend)
        else:
            self.backend = backend
            self.scheduler = make_scheduler(backend, tokenizer.eos_token_id, config, self.metrics)
        self.created = _now()
        self.names = {config.model_name, *config.aliases, *config.extra_model_names}
        self._pieces: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        """The text of one token on its own (special tokens included), memoised per token id."""
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    # ------------------------------------------------------------------ request -> generation requests
    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def encode(self, text: str) -> list[int]:
        try:
            ids = self.tokenizer.encode(text)
        except Exception as e:  # e.g. lone surrogates that are no valid Unicode text
            raise APIError(400, f"the prompt cannot be tokenized: {type(e).__name__}", param="prompt") from None
        if not ids:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise APIError(400, "the prompt is empty", param="prompt")
            ids = [bos]
        return ids

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.backend.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of range [0, {vocab})", param=param)

    def params(self, body, prompt_len: int, max_tokens: int | None, default_max: int,
               logprobs: int | None) -> SamplingParams:
        limit = self.config.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                                f"{prompt_len} tokens", param="messages" if hasattr(body, "messages") else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max, limit - prompt_len)
        if prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for "
                                "the completion)", param="max_tokens", code="context_length_exceeded")
        bias = {}
        if body.logit_bias:
            bias = {int(k): float(v) for k, v in body.logit_bias.items()}
            self.check_ids(list(bias), "logit_bias")
        stop_ids = tuple(body.stop_token_ids or ())
        self.check_ids(list(stop_ids), "stop_token_ids")
        try:
            return SamplingParams(
                max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, logit_bias=bias, seed=body.seed,
                ignore_eos=body.ignore_eos, stop_token_ids=list(stop_ids), logprobs=logprobs,
            )
        except ValueError as e:  # the shared checks (e.g. at most 7 stop_token_ids)
            raise APIError(400, str(e)) from None

    def check_n(self, n: int, prompts: int) -> None:
        if n > self.backend.max_slots:
            raise APIError(400, f"n={n} exceeds the server's {self.backend.max_slots} sequence slots", param="n")
        if n * prompts > self.config.max_waiting:
            raise APIError(400, f"{n * prompts} choices in one request exceed the queue size "
                                f"{self.config.max_waiting}", param="n")

    def chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[int], tuple[int, ...]]:
        """Prompt token ids and the chat-turn boundaries worth caching (system prompt end, previous turn end)."""
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        try:
            text = self.chat_template.render(messages, body.add_generation_prompt, body.continue_final_message)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = self.encode(text)
        points: list[int] = []
        if self.config.cache_chat_turns and self.config.prefix_cache_bytes > 0:
            n_sys = next((i for i, m in enumerate(messages) if m["role"] not in ("system", "developer")),
                         len(messages))
            for k in sorted({n_sys, len(messages) - 1}):
                if not 0 < k < len(messages):
                    continue
                try:
                    prefix = self.chat_template.render(messages[:k], add_generation_prompt=False)
                except ChatTemplateError:
                    continue
                if not prefix or not text.startswith(prefix):
                    continue
                prefix_ids = self.tokenizer.encode(prefix)
                if 0 < len(prefix_ids) < len(ids) and ids[: len(prefix_ids)] == prefix_ids:
                    points.append(len(prefix_ids))
        return ids, tuple(points)


def create_app(backend: SlotBackend | WorkerSpec, tokenizer: Tokenizer, config: ServeConfig | None = None,
               chat_template: ChatTemplate | None = None, drain_timeout: float = 0.0) -> FastAPI:
    """The OpenAI-compatible app. The scheduler thread starts and stops with the app's lifespan: in this
    process over ``backend``, or (``backend`` a :class:`~fastxlstm.serving.worker.WorkerSpec`) in a worker
    process that builds the model itself (warm-up there too)."""
    config = config or ServeConfig()
    server = ServerState(backend, tokenizer, config, chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not server.remote:
            await asyncio.to_thread(warm_up, server.backend, config, server.metrics)
        await asyncio.to_thread(server.scheduler.start)
        try:
            yield
        finally:
            await asyncio.to_thread(server.scheduler.shutdown, drain_timeout)

    app = FastAPI(title="fastxlstm", version="0.1.0", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(GuardMiddleware, max_body_bytes=config.max_body_bytes, metrics=server.metrics)

    # ------------------------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else http_phrase(exc.status_code)
        return error_response(exc.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, str(exc)[:500])

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal server error: {type(exc).__name__}")

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {config.api_key}":
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    # ------------------------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        sched = server.scheduler
        down = error_response(503, "the engine is not running", retry_after=config.retry_after)
        if not sched.alive or not sched.accepting:
            return down
        if isinstance(sched, SchedulerProxy):
            try:
                stats = await sched.stats_async()
            except (ShuttingDown, asyncio.TimeoutError):
                return down
        else:
            stats = sched.stats()
        return {"status": "ok", **stats}

    @app.get("/metrics")
    async def metrics():
        if not isinstance(server.scheduler, SchedulerProxy):
            body = server.metrics.render()
        else:  # the worker's metrics, and the HTTP request counts
            body = server.metrics.render(include={"fastxlstm_requests"})
            try:
                body += await server.scheduler.metrics_async()
            except (ShuttingDown, asyncio.TimeoutError):
                pass
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        cards = [ModelCard(id=config.model_name, created=server.created, max_model_len=config.max_model_len)]
        return ModelList(data=cards)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        body: CompletionRequest = await parse_body(request, CompletionRequest)  # type: ignore[assignment]
        server.check_model(body.model)
        prompts = body.prompts()
        if len(prompts) > config.max_prompts:
            raise APIError(400, f"at most {config.max_prompts} prompts per request", param="prompt")
        server.check_n(body.n, len(prompts))
        reqs, texts = [], []
        for p in prompts:
            if isinstance(p, str):
                ids = server.encode(p)
                texts.append(p)
            else:
                if not p:
                    raise APIError(400, "a token-id prompt must not be empty", param="prompt")
                server.check_ids(p, "prompt")
                ids = p
                texts.append(tokenizer.decode(p))
            params = server.params(body, len(ids), body.max_tokens, 16, body.logprobs)
            reqs.append(GenerationRequest(ids, params, body.n, timeout=config.request_timeout))
        call = _Call(server, reqs, body.n, body.stop, body.include_stop_str_in_output)
        call.submit()
        cid, created = f"cmpl-{uuid.uuid4().hex}", _now()
        echo = [texts[i // body.n] if body.echo else "" for i in range(len(call.choices))]

        def lp_dict(entries, offset0: int) -> dict:
            out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            pos = offset0
            for tok_id, lp, top in entries:
                piece = server.piece(tok_id)
                out["tokens"].append(piece)
                out["token_logprobs"].append(lp)
                alts: dict[str, float] = {}
                for t, v in top or []:  # byte fragments can decode alike: keep the likelier one
                    alts.setdefault(server.piece(t), v)
                out["top_logprobs"].append(alts or None)
                out["text_offset"].append(pos)
                pos += len(piece)
            return out

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            head = {"id": cid, "object": "text_completion", "created": created, "model": body.model}

            async def stream() -> AsyncIterator[str]:
                offsets = [len(e) for e in echo]
                sse, field = SSEChunks(head), SSEChunks.field
                want_lp = body.logprobs is not None
                done = 0
                if body.echo:
                    yield "".join(_sse({**head, "choices": [{"index": i, "text": e, "logprobs": None,
                                                             "finish_reason": None}]})
                                  for i, e in enumerate(echo))
                async for batch in call.batches():
                    out = []
                    for u in batch:
                        lp = lp_dict(u.logprobs, offsets[u.index]) if want_lp else None
                        offsets[u.index] += len(u.delta)
                        done += u.finish_reason is not None
                        last = done == len(call.choices) and not include_usage
                        out.append(sse.chunk(u.index, field("text", u.delta) + field("logprobs", lp)
                                             + field("finish_reason", u.finish_reason),
                                             call.usage().model_dump() if last else None))
                    yield "".join(out)

            return _event_stream(call, head, include_usage, stream())

        updates = await _collect(request, call)
        texts_out = list(echo)
        lps: list[list] = [[] for _ in call.choices]
        for u in updates:
            texts_out[u.index] += u.delta
            lps[u.index].extend(u.logprobs)
        choices = [
            CompletionChoice(index=i, text=texts_out[i], finish_reason=st.finish_reason,
                             logprobs=CompletionLogprobs(**lp_dict(lps[i], len(echo[i])))
                             if body.logprobs is not None else None)
            for i, st in enumerate(call.choices)
        ]
        return CompletionResponse(id=cid, created=created, model=body.model, choices=choices, usage=call.usage())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)  # type: ignore[assignment]
        server.check_model(body.model)
        server.check_n(body.n, 1)
        ids, points = server.chat_prompt(body)
        top = body.top_logprobs or 0
        params = server.params(body, len(ids), body.max_new_tokens, config.default_max_tokens,
                               top if body.logprobs else None)
        req = GenerationRequest(ids, params, body.n, cache_points=points,
                                cache_generation_end=config.cache_chat_turns, timeout=config.request_timeout)
        call = _Call(server, [req], body.n, body.stop, body.include_stop_str_in_output)
        call.submit()
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", _now()

        def lp_dict(entries) -> dict:
            content = []
            for tok_id, lp, alts in entries:
                piece = server.piece(tok_id)
                tops = []
                for t, v in alts or []:
                    alt = server.piece(t)
                    tops.append({"token": alt, "logprob": v, "bytes": list(alt.encode("utf-8", "replace"))})
                content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8", "replace")),
                                "top_logprobs": tops})
            return {"content": content}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model}

            sse, field = SSEChunks(head), SSEChunks.field

            def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, usage=None) -> str:
                return sse.chunk(index, field("delta", delta) + field("logprobs", logprobs)
                                 + field("finish_reason", finish_reason), usage)

            async def stream() -> AsyncIterator[str]:
                done = 0
                yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(body.n))
                async for batch in call.batches():
                    out = []
                    for u in batch:
                        done += u.finish_reason is not None
                        last = done == len(call.choices) and not include_usage
                        if u.delta or u.logprobs:
                            out.append(chunk(u.index, {"content": u.delta},
                                             lp_dict(u.logprobs) if body.logprobs else None))
                        if u.finish_reason is not None:
                            out.append(chunk(u.index, {}, None, u.finish_reason,
                                             call.usage().model_dump() if last else None))
                    yield "".join(out)

            return _event_stream(call, head, include_usage, stream())

        updates = await _collect(request, call)
        texts = [""] * len(call.choices)
        lps: list[list] = [[] for _ in call.choices]
        for u in updates:
            texts[u.index] += u.delta
            lps[u.index].extend(u.logprobs)
        choices = [ChatChoice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=st.finish_reason,
                              logprobs=ChatLogprobs(**lp_dict(lps[i])) if body.logprobs else None)
                   for i, st in enumerate(call.choices)]
        return ChatCompletionResponse(id=cid, created=created, model=body.model, choices=choices, usage=call.usage())

    return app


def build_app(model, tokenizer: Tokenizer, config: ServeConfig | None = None, chat_template: ChatTemplate | None = None,
              drain_timeout: float = 0.0) -> FastAPI:
    """App over a loaded model (slots on the model itself). With ``config.scheduler_process``, ``model`` must
    be a :class:`~fastxlstm.serving.worker.WorkerSpec` (the worker process builds its own model)."""
    config = config or ServeConfig()
    if isinstance(model, WorkerSpec):
        return create_app(model, tokenizer, config, chat_template, drain_timeout)
    if config.scheduler_process:
        raise ValueError("scheduler_process: pass a WorkerSpec (how the worker process loads the model), "
                         "not a loaded model")
    return create_app(make_backend(model, config.max_slots, config.backend), tokenizer, config, chat_template,
                      drain_timeout)


def make_backend(model, max_slots: int, kind: str = "auto") -> SlotBackend:
    """The slot backend: the engine's (``engine``, the default when it imports) or plain model calls (``model``)."""
    if kind not in ("auto", "engine", "model"):
        raise ValueError(f"backend must be 'auto', 'engine' or 'model', got {kind!r}")
    if kind in ("auto", "engine"):
        try:
            from ..engine.backend import EngineSlotBackend
        except ImportError:
            if kind == "engine":
                raise
        else:
            return EngineSlotBackend(model, max_slots)
    return ModelSlots(model, max_slots)


__all__ = ["ServeConfig", "ServerState", "build_app", "create_app", "make_backend", "JSONResponse"]
