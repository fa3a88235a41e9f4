"""The server with its scheduler in a worker process (``ServeConfig.scheduler_process``), through the real
``openai`` client: the same answers as the in-process server, streaming, cancellation, timeouts, the bounded
queue, metrics from the worker, graceful shutdown, and a dead worker: its requests fail with 503, the watchdog
restarts it, or (restarts used up) the server stops; ``fastxlstm serve`` exits 1 then."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from fastxlstm.checkpoint import load
from fastxlstm.serving.app import build_app
from fastxlstm.serving.replicas import Replicas
from fastxlstm.serving.runtime import ServeConfig
from fastxlstm.serving.testing import ServerThread
from fastxlstm.serving.worker import SchedulerProxy, WorkerSpec
from fastxlstm.tokenizer import Tokenizer

from .helpers import children, kill_worker, serve_cli, wait_healthy, wait_restarted, worker_pids
from .test_serving_api import LONG, metric, stream_then_disconnect

BASE = {"model_name": "tiny", "max_slots": 4, "prefill_chunk": 16, "max_model_len": 1_000_000}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir, Tokenizer.from_dir(tiny_model_dir)


def start(tiny, process: bool, **overrides) -> ServerThread:
    path, tok = tiny
    cfg = ServeConfig(**{**BASE, "scheduler_process": process, **overrides})
    model = WorkerSpec(load, (str(path),)) if process else load(path)
    return ServerThread(build_app(model, tok, cfg))


@pytest.fixture(scope="module")
def servers(tiny):
    with start(tiny, False) as local, start(tiny, True) as remote:
        yield local, remote


def proxy(srv: ServerThread) -> SchedulerProxy:
    sched = srv.server.config.app.state.server.scheduler
    assert isinstance(sched, Replicas) and len(sched.proxies) == 1
    return sched.proxies[0]


def client(srv: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=30)


def wait_idle(srv: ServerThread, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = httpx.get(srv.base_url + "/health").json()
        if stats["slots_free"] == stats["slots_total"] and stats["running"] == stats["waiting"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"slots leaked: {stats}")


def test_config_needs_a_worker_spec(tiny):
    with pytest.raises(ValueError, match="WorkerSpec"):
        build_app(load(tiny[0]), tiny[1], ServeConfig(scheduler_process=True))


@pytest.mark.parametrize("prompt", ["The quick brown fox", "Ein Bär läuft über die Brücke — schön! " * 4])
def test_greedy_equals_in_process_server(servers, prompt):
    local, remote = servers
    kw = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 2}
    a, b = client(local).completions.create(**kw), client(remote).completions.create(**kw)
    assert b.choices[0].text == a.choices[0].text and b.choices[0].finish_reason == a.choices[0].finish_reason
    assert b.usage == a.usage
    assert b.choices[0].logprobs.tokens == a.choices[0].logprobs.tokens
    assert b.choices[0].logprobs.token_logprobs == pytest.approx(a.choices[0].logprobs.token_logprobs, abs=1e-5)
    # n > 1 with a seed, and streaming, give the same too
    kw = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "n": 2, "seed": 7, "temperature": 0.8}
    a, b = client(local).completions.create(**kw), client(remote).completions.create(**kw)
    assert [c.text for c in b.choices] == [c.text for c in a.choices]
    chunks = list(client(remote).completions.create(**kw, stream=True))
    texts = ["", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == [c.text for c in a.choices]


def test_chat_stream_and_prefix_cache_metrics(servers):
    local, remote = servers
    messages = [{"role": "system", "content": "You are terse. " * 8}, {"role": "user", "content": "The lazy dog?"}]
    kw = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0}
    want = client(local).chat.completions.create(**kw).choices[0].message.content
    hits = metric(remote, "fastxlstm_prefix_cache_hits_total")
    misses = metric(remote, "fastxlstm_prefix_cache_misses_total")
    chunks = list(client(remote).chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens > 0
    again = client(remote).chat.completions.create(**kw)  # the same system prompt: a cache hit
    assert again.choices[0].message.content == want and again.usage.prompt_tokens_details.cached_tokens > 0
    assert metric(remote, "fastxlstm_prefix_cache_hits_total") == hits + 1
    assert metric(remote, "fastxlstm_prefix_cache_misses_total") == misses + 1
    assert metric(remote, "fastxlstm_requests_total") > 0  # the HTTP process's own counts are there too
    types = [line for line in httpx.get(remote.base_url + "/metrics").text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types)), types  # each family once: from the worker or from the HTTP process


def test_disconnect_frees_the_slot_and_timeout(servers):
    _, remote = servers
    with httpx.Client(base_url=remote.base_url) as http:
        stream_then_disconnect(http, BASE["max_slots"])
        wait_idle(remote, timeout=2.0)  # freed by the disconnect, well before the request's timeout
        assert metric(remote, "fastxlstm_slots_used") == 0
        # the per-request timeout (4 s here; set where requests are built, in the HTTP process) holds in the worker
        config = remote.server.config.app.state.server.config
        config.request_timeout = 4.0
        t = time.monotonic()
        try:
            r = http.post("/v1/completions", json={**LONG, "stream": False}, timeout=30)
        finally:
            config.request_timeout = 600.0
        assert r.status_code == 408 and "timed out" in r.json()["error"]["message"]
        assert 3.5 < time.monotonic() - t < 20
        wait_idle(remote)


def test_bounded_queue_answers_429(tiny):
    with start(tiny, True, max_slots=1, max_waiting=1) as srv:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        codes: list[int] = []
        headers: list = []

        def one():
            r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=60)
            codes.append(r.status_code)
            headers.append(r.headers)

        threads = [threading.Thread(target=one) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert 200 in codes and 429 in codes, codes
        assert all("retry-after" in h for c, h in zip(codes, headers) if c == 429)
        wait_idle(srv)
        sched = proxy(srv)
        assert sched._queued == 0 and not sched._live  # every request left the queue and the proxy's books
        r = httpx.post(srv.base_url + "/v1/completions", json={**body, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200  # the queue is free again
    assert not sched.process.is_alive() and sched.exit_reason == "shut down"  # graceful shutdown


def test_worker_crash_fails_requests_then_the_worker_restarts(tiny):
    with start(tiny, True, restart_backoff=0.2) as srv:
        sched = proxy(srv)
        old = sched.pid
        c = client(srv)
        stream = c.completions.create(model="tiny", prompt="The quick", max_tokens=500_000, stream=True,
                                      extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        kill_worker(old, it)
        health = httpx.get(srv.base_url + "/health")  # down until the new worker is up
        assert health.status_code == 503 and "retry-after" in health.headers, health.text
        assert "not running" in health.json()["error"]["message"] or "restarting" in health.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="tiny", prompt="hi", max_tokens=4)
        assert e.value.status_code == 503 and e.value.code == "engine_unavailable"
        assert httpx.get(srv.base_url + "/metrics").status_code == 200  # the HTTP side still answers
        wait_restarted(sched, old)
        r = c.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        assert metric(srv, "fastxlstm_worker_restarts_total") == 1


def test_worker_deaths_beyond_the_restart_budget_stop_the_server(tiny):
    srv = start(tiny, True, worker_restarts=0)
    with srv:
        os.kill(proxy(srv).pid, signal.SIGKILL)
        srv.thread.join(timeout=60)  # the front end stops by itself
        assert not srv.thread.is_alive()
        assert "worker_restarts=0" in srv.server.fatal


def test_cli_scheduler_process_restarts_a_killed_worker_and_stops_on_sigint(tmp_path):
    proc, base = serve_cli("--model", "random:xlstm-tiny", "--served-model-name", "t", "--scheduler-process",
                           "--max-slots", "2", "--max-model-len", "100000", "--disable-uvicorn-access-log")
    try:
        wait_healthy(proc, base, timeout=120)
        victim = worker_pids(proc.pid)[0]
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30)
        r = c.completions.create(model="t", prompt="hello", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5
        # two clients hang up (a stream, a plain request): one log line each, no traceback
        long = {"model": "t", "prompt": "hello", "max_tokens": 90_000, "ignore_eos": True}
        with httpx.Client(base_url=base) as http:
            with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as resp:
                lines = resp.iter_lines()
                assert next(lines).startswith("data: ")
            with pytest.raises(httpx.TimeoutException):
                http.post("/v1/completions", json=long, timeout=1.0)
            deadline = time.monotonic() + 30
            while http.get("/health").json()["slots_free"] != 2 and time.monotonic() < deadline:
                time.sleep(0.1)
        # kill -9 the engine worker: the watchdog starts a new one (after 1 s) and the server serves again
        os.kill(victim, signal.SIGKILL)
        wait_healthy(proc, base, timeout=120, also=lambda: victim not in children(proc.pid))
        r = c.completions.create(model="t", prompt="hello", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5
        worker = children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole group, the scheduler process included
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "Traceback" not in out, out
        assert out.count("client disconnected") == 2, out
        assert out.count("restarting it in") == 1 and out.count("running again") == 1, out  # one restart
        assert worker

        def running(pid: int) -> bool:
            try:
                return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
            except OSError:
                return False

        deadline = time.monotonic() + 10
        while any(map(running, worker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(running, worker))  # the scheduler process (and multiprocessing's helper) ended too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
