"""One request must not stall the event loop: huge texts are refused before tokenising (bounded by max_model_len),
message counts are capped, and rendering/tokenising/parsing of large bodies run off the loop, so /health and
running streams keep their pace meanwhile."""

from __future__ import annotations

import threading
import time

import httpx

from fastxlstm.serving.app import build_app
from fastxlstm.serving.runtime import ServeConfig
from fastxlstm.serving.testing import ServerThread

from .test_serving_api import tiny  # noqa: F401  (fixture)

C, CHAT = "/v1/completions", "/v1/chat/completions"


def serve(tiny, **overrides):  # noqa: F811
    _, model, tok = tiny
    cfg = ServeConfig(**{"model_name": "tiny", "max_slots": 2, "max_model_len": 256, **overrides})
    return ServerThread(build_app(model, tok, cfg))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def health_gaps(srv, work) -> tuple[float, list]:
    """Run ``work()`` in a thread while polling /health; the longest wall time between two /health answers (the
    server runs in this process: a stall that holds the GIL stops this thread too, so only the gap shows it) and
    work's results."""
    results: list = []
    t = threading.Thread(target=lambda: results.append(work()))
    worst = 0.0
    with httpx.Client(base_url=srv.base_url, timeout=60) as http:
        http.get("/health")
        t.start()
        last = time.monotonic()
        while t.is_alive():
            assert http.get("/health").status_code == 200
            now = time.monotonic()
            worst, last = max(worst, now - last), now
            time.sleep(0.02)
    t.join()
    return worst, results


def test_huge_texts_refused_before_tokenising(tiny):  # noqa: F811
    huge = "the quick brown fox " * 200_000  # 4 MB: far more than 256 tokens can hold
    with serve(tiny, max_body_bytes=16 * 1024**2) as srv:
        limit = srv.server.config.app.state.server.max_prompt_bytes
        assert 256 <= limit < 256 * 64
        before = _rss()

        def attack():
            out = []
            with httpx.Client(base_url=srv.base_url, timeout=60) as http:
                for body in [{"model": "tiny", "prompt": huge},
                             {"model": "tiny", "prompt": ["x", huge]},
                             {"model": "tiny", "messages": [{"role": "user", "content": huge}]},
                             {"model": "tiny", "messages": [{"role": "user", "content": huge[:20_000]}] * 300},
                             {"model": "tiny", "messages": [{"role": "user", "content": [
                                 {"type": "text", "text": huge[:40_000]}] * 100}]}]:
                    t = time.monotonic()
                    r = http.post(CHAT if "messages" in body else C, json=body)
                    out.append((r.status_code, r.json()["error"], time.monotonic() - t))
            return out

        worst, (out,) = health_gaps(srv, attack)
        for status, err, took in out:
            assert status == 400 and err["code"] == "context_length_exceeded", err
            assert err["param"] in ("prompt", "messages") and took < 3.0, (err, took)
        assert worst < 0.5, worst
        assert _rss() - before < 200 * 1024**2  # nothing of the size of 4 MB of tokens stayed
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            many = {"model": "tiny", "messages": [{"role": "user", "content": "a"}] * 2049, "max_tokens": 1}
            r = http.post(CHAT, json=many)
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "2048" in r.text
            edge = "a" * (limit + 1)  # one byte over the bound, and one non-ASCII character that makes it so
            assert http.post(C, json={"model": "tiny", "prompt": edge}).status_code == 400
            assert http.post(C, json={"model": "tiny", "prompt": "é" * (limit // 2 + 1)}).status_code == 400
            r = http.post(C, json={"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 2})
            assert r.status_code == 200


def test_tokenising_runs_off_the_event_loop(tiny):  # noqa: F811
    """With the text bound lifted, a 400 KB prompt is tokenised (seconds) while /health answers at once."""
    text = "Ein Bär läuft über die Brücke — schön! " * 10_000
    with serve(tiny, max_prompt_bytes=10**8, max_body_bytes=16 * 1024**2) as srv:

        def work():
            t = time.monotonic()
            r = httpx.post(srv.base_url + C, json={"model": "tiny", "prompt": text}, timeout=120)
            return r.status_code, r.json()["error"]["code"], time.monotonic() - t

        worst, ((status, code, took),) = health_gaps(srv, work)
        assert status == 400 and code == "context_length_exceeded"  # counted in tokens, after tokenising
        assert took > 3 * worst and worst < 1.0, (took, worst)  # on the loop, one /health waited all of it
