"""Graceful shutdown: on the stop signal the server stops admitting (queued and new requests: 503 + Retry-After,
/health 503) while it still listens, running streams that outlast the drain get an error event and ``[DONE]``, and
the aborted sequences are counted."""

from __future__ import annotations

import json
import threading
import time

import httpx

from fastxlstm.serving.app import build_app
from fastxlstm.serving.runtime import ServeConfig
from fastxlstm.serving.testing import ServerThread

from .test_serving_api import LONG, tiny  # noqa: F401  (fixture)


def test_drain_answers_503_and_ends_streams_with_an_error(tiny):  # noqa: F811
    _, model, tok = tiny
    cfg = ServeConfig(model_name="tiny", max_slots=1, max_model_len=1_000_000, retry_after=3)
    srv = ServerThread(build_app(model, tok, cfg, drain_timeout=1.5)).__enter__()
    sched = srv.server.config.app.state.server.scheduler
    lines: list[str] = []
    queued: list[httpx.Response] = []
    streaming = threading.Event()

    def stream():
        with httpx.Client(base_url=srv.base_url, timeout=60) as http, \
                http.stream("POST", "/v1/completions", json=LONG) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                    streaming.set()

    def queue():
        queued.append(httpx.post(srv.base_url + "/v1/completions", timeout=60,
                                 json={"model": "tiny", "prompt": "hi", "max_tokens": 3}))

    runner, waiter = threading.Thread(target=stream), threading.Thread(target=queue)
    try:
        runner.start()
        assert streaming.wait(30)
        waiter.start()  # waits for the one slot
        deadline = time.monotonic() + 10
        while sched.stats()["waiting"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = metric_abort(srv)
        t = time.monotonic()
        srv.server.should_exit = True  # what SIGTERM / Ctrl-C does
        waiter.join(5)
        assert queued and queued[0].status_code == 503 and queued[0].headers["retry-after"] == "3"
        assert time.monotonic() - t < 1.0, "a queued request waited out the drain"
        with httpx.Client(base_url=srv.base_url, timeout=5) as http:  # still listening: 503, not refused
            health = http.get("/health")
            assert health.status_code == 503 and health.headers["retry-after"] == "3"
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and "retry-after" in r.headers
            assert metric_abort(srv, http) >= before + 1  # the queued request, counted
        runner.join(30)
        assert not runner.is_alive()
        assert time.monotonic() - t >= 1.4  # the stream ran on through the drain
        assert lines[-1] == "data: [DONE]", lines[-3:]
        err = json.loads(lines[-2][len("data: "):])["error"]
        assert err["code"] == "shutdown" and err["type"] == "service_unavailable_error"
        assert sum(line.startswith('data: {"id"') for line in lines) > 3  # tokens came before the end
    finally:
        srv.stop()
        runner.join(5)
        waiter.join(5)


def metric_abort(srv, http: httpx.Client | None = None) -> float:
    text = (http or httpx).get(srv.base_url + "/metrics").text
    for line in text.splitlines():
        if line.startswith('fastxlstm_sequences_finished_total{reason="abort"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
