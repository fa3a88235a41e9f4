"""The runtime of one server: its limits (:class:`ServeConfig`) and the factories that build what runs the model
(slot backend, scheduler with its prefix cache, start-up warm-up). The scheduler process
(:mod:`~fastxlstm.serving.worker`) builds its side with these too."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tokenizer import Tokenizer
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .scheduler import Scheduler
from .slots import SlotBackend, warm_prefill

log = logging.getLogger("fastxlstm.serving")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # the Host names a loopback-bound server answers


@dataclass
class ServeConfig:
    """Limits and knobs of one server."""

    model_name: str = "fastxlstm"
    backend: str = "auto"  # "engine" (fused kernels, CUDA-graph decode), "model" (plain model calls), "auto"
    aliases: tuple[str, ...] = ()
    max_slots: int = 32
    max_waiting: int = 256
    # prompt tokens prefilled per scheduler iteration, between two decode windows (--max-num-batched-tokens)
    prefill_chunk: int = 8192
    prefill_pad_ratio: float = 1.3  # prompts of different lengths share a forward while padded <= this x real
    stream_interval_ms: float = 0.0  # >0: hand a request's tokens to the HTTP side at most this often (first
    # token, finish and errors go at once): fewer, larger SSE chunks, up to this much extra latency per token
    decode_steps_per_read: int = 4  # greedy-only batches: decode steps between two host reads of the tokens
    overlap_decode: bool = True  # queue the next window before reading the previous one's tokens
    early_launch: bool = False  # queue each iteration's window before its prefill (two windows ahead of the host)
    scheduler_process: bool = False  # run model + scheduler in a worker process (own GIL); see serving.worker
    data_parallel_size: int = 1  # worker processes (replicas) behind the front end, with scheduler_process
    worker_restarts: int = 3  # restarts of a dead worker per restart_window before the server gives up (exit 1)
    restart_window: float = 600.0  # seconds
    restart_backoff: float = 1.0  # seconds before the first restart, doubling with each restart in the window
    warm_prefill: bool = True  # at start-up, prefill once per kernel shape class (GPU backends only)
    max_model_len: int = 32768
    default_max_tokens: int = 1024  # chat, when the request gives none (completions default to 16, as OpenAI)
    prefix_cache_bytes: int = 2 * 1024**3
    cache_chat_turns: bool = True
    request_timeout: float | None = 600.0
    max_body_bytes: int = 16 * 1024 * 1024
    body_timeout: float | None = 30.0  # seconds for a request body to arrive after its headers (408 after)
    max_prompts: int = 64  # prompts in one /v1/completions call
    max_messages: int = 2048  # messages in one chat request
    max_prompt_bytes: int | None = None  # UTF-8 bytes of one prompt's text (None: max_model_len x the bytes one
    # token can cover, so nothing that could fit is refused); checked before the text is tokenised
    tokenizer_threads: int = 2  # threads that render chat templates and tokenise, off the event loop
    api_key: str | None = None  # bearer token for every path but /health (and /metrics when public_metrics)
    public_metrics: bool = False
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS  # trusted Host header names (None or "*": any)
    retry_after: float = 1.0
    extra_model_names: list[str] = field(default_factory=list)
    # speculative decoding (vLLM's speculative_config: a dict, its JSON or a SpeculativeConfig; None: off);
    # the draft model ("model") is loaded by make_scheduler, where the engine runs (.speculate)
    speculative_config: Any = None



def make_scheduler(backend: SlotBackend, eos_token_id: int | None, config: ServeConfig, metrics: Metrics,
                   max_waiting: int | None = None, tokenizer=None) -> Scheduler:
    """The scheduler (and its prefix cache) a server of ``config`` runs over ``backend``, speculating where
    ``config.speculative_config`` asks for it (:func:`enable_speculation`)."""
    enable_speculation(backend, config.speculative_config, tokenizer, eos_token_id)
    cache = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes > 0 else None
    return Scheduler(backend, eos_token_id, cache, metrics,
                     max_waiting=config.max_waiting if max_waiting is None else max_waiting,
                     prefill_chunk=config.prefill_chunk, stream_interval=config.stream_interval_ms / 1000,
                     decode_steps_per_read=config.decode_steps_per_read, overlap=config.overlap_decode,
                     prefill_pad_ratio=config.prefill_pad_ratio, early_launch=config.early_launch)


def enable_speculation(backend: SlotBackend, value, tokenizer=None, eos_token_id: int | None = None) -> None:
    """Turn on the speculative decoding of ``value`` (vLLM's ``speculative_config``: a dict, JSON or
    :class:`~fastxlstm.engine.speculative.SpeculativeConfig`; None: nothing) on an engine backend, loading the
    draft model (on the target's device, in its dtype) for ``"draft"``; its tokenizer must equal ``tokenizer``
    (None: the one in the target's directory, where it has one); ``eos_token_id``: the scheduler's, at which the
    engine then stops a slot too."""
    from ..engine.llm import load_draft_model
    from ..engine.speculative import SpeculativeConfig

    spec = SpeculativeConfig.parse(value)
    if spec is None:
        return
    if not hasattr(backend, "enable_speculation"):
        raise ValueError(f"speculative decoding needs the engine's slot backend, not {type(backend).__name__}")
    draft = None
    if spec.method == "draft":
        target = backend.engine.model
        source = getattr(target, "source_dir", None)
        if tokenizer is None and source is not None and (Path(source) / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_dir(source)
        draft = load_draft_model(spec, tokenizer, target)
    backend.enable_speculation(spec, draft, eos_token_id)


def check_speculative_config(value, tokenizer, remote: bool = False):
    """``value`` parsed and checked before anything starts (every problem a ValueError, or FileNotFoundError for a
    draft directory that is not there): its fields, the draft model's tokenizer against ``tokenizer``; with the
    scheduler in worker processes (``remote``) the draft model must be a directory, hub id or ``random:`` preset,
    which each worker loads."""
    from ..engine.llm import check_draft_tokenizer
    from ..engine.speculative import SpeculativeConfig

    spec = SpeculativeConfig.parse(value)
    if remote and spec is not None and spec.method == "draft" and not isinstance(spec.model, (str, os.PathLike)):
        raise ValueError("with the scheduler in a worker process (--scheduler-process) the speculative_config "
                         "model must be a directory, hub id or random:<preset> (the worker loads it)")
    check_draft_tokenizer(spec, tokenizer)
    return spec


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



def make_backend(model, max_slots: int, kind: str = "auto") -> SlotBackend:
    """The slot backend: the engine over ``model``, with the mLSTM kernels ``kind`` (``auto``: Triton on
    CUDA, else PyTorch; ``triton``; ``reference``). ``engine`` is an old name of ``auto``."""
    from ..engine.backend import EngineSlotBackend

    kind = "auto" if kind == "engine" else kind
    if kind not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {kind!r} (the plain-model "
                         "backend is gone: the engine is the one inference path)")
    return EngineSlotBackend(model, max_slots, backend=kind)

