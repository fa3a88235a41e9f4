"""``fastxlstm serve``: load a model and serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..options import DeviceOpt, DtypeOpt, ModelArg, ModelOrArgOpt, QuantizationOpt, SpeculativeOpt, pick_model


def serve(
    model_arg: ModelArg = None,
    model: ModelOrArgOpt = None,
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="Model id clients send (default: the --model value)")]
    = None,
    max_slots: Annotated[int, typer.Option(min=1, help="Concurrent sequences (each holds one recurrent state)")] = 32,
    max_waiting: Annotated[int, typer.Option(min=1, help="Queued requests before answering 429")] = 256,
    prefill_chunk: Annotated[int, typer.Option(
        "--max-num-batched-tokens", "--prefill-chunk", min=1,
        help="Prompt tokens prefilled per scheduler iteration, between two decode windows, counted as the device "
             "computes them (padding included); waiting prompts share forwards up to it (vLLM's name)")] = 8192,
    prefill_pad_ratio: Annotated[float, typer.Option(
        min=1.0, help="Prompts of different lengths share one prefill forward (right-padded) while the padded "
                      "tokens are at most this many times the real ones (1: equal lengths only)")] = 1.3,
    stream_interval_ms: Annotated[float, typer.Option(
        min=0, help="Send each stream's tokens at most this often (0: every decode step); fewer, larger chunks")] = 0.0,
    decode_steps_per_read: Annotated[int, typer.Option(
        min=1, help="Decode steps between host reads while every running request is plain greedy")] = 4,
    overlap_decode: Annotated[bool, typer.Option(
        help="Queue the next decode window before reading the previous one's tokens")] = True,
    early_launch: Annotated[bool, typer.Option(
        help="Queue each iteration's decode window before its prefill, so the device has two windows to run "
             "while the host prefills (new requests join one window later)")] = False,
    scheduler_process: Annotated[bool, typer.Option(
        help="Run the model and scheduler in a worker process, so the HTTP front end (its own process) does not "
             "compete with them for the GIL")] = False,
    data_parallel_size: Annotated[int, typer.Option(
        "--data-parallel-size", "-dp", min=1,
        help="Engine worker processes (replicas, each its own model; one GPU each via CUDA_VISIBLE_DEVICES) behind "
             "the one HTTP front end; requests go to the replica holding their prompt's cached prefix, else the "
             "least-loaded one. More than 1 implies --scheduler-process")] = 1,
    worker_restarts: Annotated[int, typer.Option(
        min=0, help="Restarts of a dead engine worker within 10 minutes before the server gives up and exits "
                    "with status 1 (for a supervisor to restart it); 0: exit at the first death")] = 3,
    triton_autotune: Annotated[bool, typer.Option(
        help="Autotune the Triton kernels for each new prompt shape while serving (each new shape stalls "
             "the server for seconds); off: the first launch config that fits")] = False,
    gil_switch_ms: Annotated[float, typer.Option(
        min=0.05, help="Python's thread switch interval (ms): how long the scheduler thread can wait for the GIL "
                       "while the HTTP thread holds it; Python's default, 5, until a GPU load test says otherwise)")]
    = 5.0,
    max_model_len: Annotated[int, typer.Option(min=2, help="Limit on prompt + completion tokens")] = 32768,
    prefix_cache_mb: Annotated[int, typer.Option(min=0, help="Prefix-cache size in MiB (0 disables)")] = 2048,
    request_timeout: Annotated[float, typer.Option(min=0, help="Seconds per request (0: none)")] = 600.0,
    drain_timeout: Annotated[float, typer.Option(min=0, help="Seconds to finish running requests on shutdown")]
    = 10.0,
    chat_template: Annotated[Path | None, typer.Option(help="Jinja chat template file (overrides the model's)")]
    = None,
    api_key: Annotated[str | None, typer.Option(envvar="FASTXLSTM_API_KEY", help="Require this bearer token")]
    = None,
    backend: Annotated[str, typer.Option(help="mLSTM kernels of the engine: auto (Triton on CUDA), triton, reference")]
    = "auto",
    public_metrics: Annotated[bool, typer.Option(
        help="Serve /metrics without the API key (every other path but /health needs it)")] = False,
    allowed_hosts: Annotated[str | None, typer.Option(
        help="Comma-separated Host header names to answer ('*': any; '*.example.com': subdomains). Default: "
             "the loopback names when --host is a loopback address, else any")] = None,
    body_timeout: Annotated[float, typer.Option(
        min=0, help="Seconds for a request body to arrive after its headers (0: no deadline)")] = 30.0,
    header_timeout: Annotated[float, typer.Option(
        min=0, help="Seconds a connection has to send a request's complete headers (0: no deadline)")] = 10.0,
    max_connections: Annotated[int | None, typer.Option(
        min=1, help="Open connections before the oldest idle one is closed (default: the open-files limit, "
                    "raised to its hard limit, minus 64)")] = None,
    limit_concurrency: Annotated[int | None, typer.Option(
        min=1, help="uvicorn: connections or requests in flight before new requests get 503 (default: none)")]
    = None,
    backlog: Annotated[int, typer.Option(min=1, help="uvicorn: backlog of connections not yet accepted")] = 2048,
    timeout_keep_alive: Annotated[int, typer.Option(
        min=1, help="uvicorn: seconds an idle keep-alive connection stays open")] = 5,
    h11_max_incomplete_event_size: Annotated[int | None, typer.Option(
        min=1024, help="Bytes of one request's headers (default: h11's 16 KiB)")] = None,
    disable_uvicorn_access_log: Annotated[bool, typer.Option(
        "--disable-uvicorn-access-log", help="No access-log line per request")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantization: QuantizationOpt = None,
    adapter: Annotated[Path | None, typer.Option(
        help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) trained on MODEL: "
             "merged into the weights at load (served at the base model's speed)")] = None,
    speculative_config: SpeculativeOpt = None,
    log_level: str = "info",
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)."""
    import os
    import sys

    from ..devices import resolve_device
    from ..engine.speculative import SpeculativeConfig
    from ..extras import MissingDependency, require
    from ..options import console, fail

    model = pick_model(model_arg, model, "serve")
    try:
        require("serve", feature="fastxlstm serve")
        device = str(resolve_device(device))
        speculative = SpeculativeConfig.parse(speculative_config)
    except (MissingDependency, ValueError) as e:
        fail(e)
    sys.setswitchinterval(gil_switch_ms / 1000)  # the scheduler and HTTP threads share one GIL

    # read when the kernels are first imported (below, with the model)
    os.environ["FASTXLSTM_TRITON_AUTOTUNE"] = "1" if triton_autotune else "0"

    from ..checkpoint import load_model_and_tokenizer, resolve_model_dir
    from ..tokenizer import Tokenizer
    from .app import build_app
    from .chat_template import ChatTemplate
    from .http import DrainingServer, HTTPOptions, raise_fd_limit, uvicorn_config
    from .runtime import LOOPBACK_HOSTS, ServeConfig
    from .worker import WorkerSpec

    scheduler_process = scheduler_process or data_parallel_size > 1
    _log_to_console(log_level)
    try:
        if scheduler_process:  # the worker process loads the model; here only the tokenizer and template
            net = WorkerSpec(load_model_and_tokenizer, (model,),
                             {"device": device, "dtype": dtype, "weight_mode": "fused",
                              "quantization": quantization, "adapter": adapter},
                             replica_envs=replica_envs(data_parallel_size, device))
            source_dir = None if model.startswith("random:") else resolve_model_dir(model)
            tok = Tokenizer.byte_level() if source_dir is None else Tokenizer.from_dir(source_dir)
        else:
            net, tok = load_model_and_tokenizer(model, device=device, dtype=dtype, weight_mode="fused",
                                                quantization=quantization, adapter=adapter)
            source_dir = getattr(net, "source_dir", None)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:
        fail(e)
    try:
        template = ChatTemplate.from_model_dir(source_dir)
        if chat_template is not None:
            template = ChatTemplate(chat_template.read_text(), template.special_tokens, str(chat_template))
    except (OSError, ValueError) as e:
        fail(str(e))
    if model.startswith("random:"):
        console.print(f"[yellow]note:[/] {model} is a randomly initialised model: its text is noise.")
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    hosts = tuple(h.strip() for h in allowed_hosts.split(",") if h.strip()) if allowed_hosts else None
    if hosts is None and loopback:
        hosts = LOOPBACK_HOSTS
    if not loopback and api_key is None:
        console.print(f"[yellow]warning:[/] --host {host} without --api-key: anyone who can reach this address "
                      "can run completions (set --api-key or FASTXLSTM_API_KEY)")
    name = served_model_name or model
    config = ServeConfig(
        model_name=name, aliases=(model,), max_slots=max_slots, max_waiting=max_waiting, prefill_chunk=prefill_chunk,
        max_model_len=max_model_len, prefix_cache_bytes=prefix_cache_mb * 1024**2,
        request_timeout=request_timeout or None, api_key=api_key, backend=backend, public_metrics=public_metrics,
        allowed_hosts=hosts, body_timeout=body_timeout or None,
        stream_interval_ms=stream_interval_ms, decode_steps_per_read=decode_steps_per_read,
        overlap_decode=overlap_decode, prefill_pad_ratio=prefill_pad_ratio, early_launch=early_launch,
        scheduler_process=scheduler_process, data_parallel_size=data_parallel_size, worker_restarts=worker_restarts,
        speculative_config=speculative,
    )
    try:
        app = build_app(net, tok, config, template, drain_timeout=drain_timeout)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:  # (a draft model's too)
        fail(e)
    where = (f"{data_parallel_size} worker processes" if data_parallel_size > 1 else "a worker process") \
        if scheduler_process else f"device {net.device}"
    console.print(f"serving [bold]{name}[/] on http://{host}:{port}/v1 ({max_slots} slots, {where}, "
                  f"chat template: {template.origin})")
    raise_fd_limit()
    options = HTTPOptions(header_timeout=header_timeout or None, max_connections=max_connections,
                          limit_concurrency=limit_concurrency, backlog=backlog, timeout_keep_alive=timeout_keep_alive,
                          h11_max_incomplete_event_size=h11_max_incomplete_event_size,
                          access_log=not disable_uvicorn_access_log)
    server = DrainingServer(uvicorn_config(app, host, port, options, log_level, drain_timeout or None))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's start-up failure status (as uvicorn.run)
    if server.fatal is not None:
        console.print(f"[red]error:[/] {server.fatal}; exiting")
        sys.exit(1)


def replica_envs(replicas: int, device: str | None) -> tuple[dict[str, str], ...]:
    """Each data-parallel replica's environment: on CUDA one GPU each (``CUDA_VISIBLE_DEVICES``, taken from the
    visible ones in order); on a CPU nothing (N processes)."""
    import os

    import torch

    if replicas == 1 or (device or "cuda").split(":")[0] != "cuda" or not torch.cuda.is_available():
        return ()
    if device is not None and ":" in device:
        raise ValueError(f"--device {device} with --data-parallel-size {replicas}: each replica gets its own GPU "
                         "(CUDA_VISIBLE_DEVICES); pass --device cuda")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) < replicas:
        raise ValueError(f"--data-parallel-size {replicas} needs {replicas} GPUs, {len(ids)} visible")
    return tuple({"CUDA_VISIBLE_DEVICES": ids[i]} for i in range(replicas))


def _log_to_console(level: str) -> None:
    """The server's own log lines (``fastxlstm.serving``: disconnects, the watchdog) as uvicorn writes its own."""
    import logging

    from uvicorn.logging import DefaultFormatter

    logger = logging.getLogger("fastxlstm.serving")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=None))
        logger.addHandler(handler)
        logger.setLevel(level.upper())
        logger.propagate = False
