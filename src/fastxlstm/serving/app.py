"""The FastAPI application: OpenAI-compatible routes over the continuous-batching scheduler.

:func:`create_app` wires the pieces: the lifespan (warm-up, scheduler start and drain), the guard middleware
(:mod:`.middleware`), the OpenAI error bodies, the API key, and the routes: ``/health``, ``/metrics``,
``/v1/models`` and ``/v1/models/{id}`` here, ``/v1/completions`` in :mod:`.completions`, ``/v1/chat/completions``
in :mod:`.chat`, vLLM's ``/tokenize``, ``/detokenize``, ``/tokenizer_info`` and ``/version`` in :mod:`.tokenize`.
Per-server state and request checks live in :mod:`.server`, the model-side factories and limits in :mod:`.runtime`.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..tokenizer import Tokenizer
from .chat import chat_completions as chat_endpoint
from .chat_template import ChatTemplate
from .completions import completions as completions_endpoint
from .errors import APIError, error_response, http_phrase
from .middleware import GuardMiddleware
from .replicas import Replicas
from .requests import ShuttingDown
from .runtime import ServeConfig, make_backend, warm_up
from .schemas import ModelCard, ModelList
from .server import ServerState
from .slots import SlotBackend
from .tokenize import detokenize as detokenize_endpoint
from .tokenize import tokenize as tokenize_endpoint
from .tokenize import tokenizer_info as tokenizer_info_endpoint
from .tokenize import version as version_endpoint
from .worker import WorkerSpec

log = logging.getLogger("fastxlstm.serving")

UNSUPPORTED_APIS = ("embeddings", "responses", "audio", "images", "moderations", "files", "batches", "fine_tuning",
                    "assistants", "threads", "vector_stores", "uploads", "realtime", "edits", "rerank", "score")


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
            server.pool.shutdown(wait=False)
            if server._grammars is not None:
                server._grammars.shutdown()

    app = FastAPI(title="fastxlstm", version="0.1.0", lifespan=lifespan)
    app.state.server = server
    app.state.fatal = None  # set when the engine processes cannot be kept up: the HTTP server then stops
    if isinstance(server.scheduler, Replicas):
        server.scheduler.on_fatal = lambda reason: setattr(app.state, "fatal", reason)

    async def drain() -> None:
        """On the stop signal, while the socket still listens (``serving.http.DrainingServer``): stop admitting
        (new and queued requests get 503 + Retry-After, /health 503), let running requests finish for up to
        ``drain_timeout`` s, then end the rest with an error event (streams: then ``[DONE]``)."""
        await asyncio.to_thread(server.scheduler.shutdown, drain_timeout)

    app.state.drain = drain
    app.add_middleware(GuardMiddleware, max_body_bytes=config.max_body_bytes, metrics=server.metrics,
                       allowed_hosts=config.allowed_hosts, api_key=config.api_key,
                       public_metrics=config.public_metrics, body_timeout=config.body_timeout)

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

    # ------------------------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        sched = server.scheduler
        down = error_response(503, "the engine is not running", retry_after=config.retry_after)
        if not sched.alive or not sched.accepting:
            return down
        if isinstance(sched, Replicas):
            try:
                stats = await sched.stats_async()
            except (ShuttingDown, asyncio.TimeoutError) as e:
                return error_response(503, f"the engine is not running: {e}" if str(e) else
                                      "the engine is not running", retry_after=config.retry_after)
        else:
            stats = sched.stats()
        return {"status": "ok", **stats}

    @app.get("/metrics")
    async def metrics():
        if not isinstance(server.scheduler, Replicas):
            body = server.metrics.render()
        else:  # the worker's metrics, and the HTTP request counts
            body = server.metrics.render(include={"fastxlstm_requests"})
            try:
                body += await server.scheduler.metrics_async()
            except (ShuttingDown, asyncio.TimeoutError):
                pass
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    def card() -> ModelCard:
        return ModelCard(id=config.model_name, created=server.created, max_model_len=config.max_model_len)

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return card() if model_id == config.model_name else card().model_copy(update={"id": model_id})

    def post_route(endpoint):
        async def route(request: Request):
            return await endpoint(server, request)
        return route

    for path, endpoint, name in (("/tokenize", tokenize_endpoint, "tokenize"),
                                 ("/detokenize", detokenize_endpoint, "detokenize"),
                                 ("/v1/completions", completions_endpoint, "completions"),
                                 ("/v1/chat/completions", chat_endpoint, "chat_completions")):
        app.add_api_route(path, post_route(endpoint), methods=["POST"], name=name)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenizer_info_endpoint(server)

    @app.get("/version")
    async def version():
        return version_endpoint()

    # OpenAI APIs this server does not have: a 400 that says so (an unknown path stays a 404)
    @app.api_route("/v1/{api}/{rest:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
    @app.api_route("/v1/{api}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
    async def unsupported(api: str, rest: str = ""):
        if api in ("completions", "chat", "models"):  # our routes, another method
            raise APIError(405, "Method Not Allowed")
        if api not in UNSUPPORTED_APIS:
            raise APIError(404, "Not Found")
        raise APIError(400, f"the OpenAI {api} API (/v1/{api}) is not supported by this server; it serves "
                            "/v1/completions and /v1/chat/completions", code="unsupported_api")

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


__all__ = ["build_app", "create_app"]
