"""Slow and hostile clients at the connection level: header deadline, connection cap, log rate limits (a few dozen
connections and sub-second deadlines prove the mechanisms; nothing here floods)."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest

from fastxlstm.serving.app import ServeConfig, build_app
from fastxlstm.serving.http import HTTPOptions, RateLimitFilter
from fastxlstm.serving.testing import ServerThread

from .test_serving_api import tiny  # noqa: F401  (fixture)


def serve(tiny, http: HTTPOptions, **overrides):  # noqa: F811
    _, model, tok = tiny
    return ServerThread(build_app(model, tok, ServeConfig(**{"model_name": "tiny", "max_slots": 2, **overrides})),
                        http=http)


def connect(srv) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\0" * 8)
    return s


def closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


PARTIAL = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def test_header_deadline_and_connection_cap(tiny):  # noqa: F811
    with serve(tiny, HTTPOptions(header_timeout=1.0, max_connections=16)) as srv:
        socks = []
        try:
            for _ in range(24):  # more half-sent requests than the cap, and a silent connection
                s = connect(srv)
                s.sendall(PARTIAL)
                socks.append(s)
            silent = connect(srv)
            socks.append(silent)
            time.sleep(0.2)
            t = time.monotonic()
            r = httpx.get(srv.base_url + "/health", timeout=5)  # the cap closes idle connections to make room
            assert r.status_code == 200 and time.monotonic() - t < 1.0
            dribble = connect(srv)  # a header byte every 0.2 s: the deadline is for the whole header, not idle
            socks.append(dribble)
            started = time.monotonic()
            closed = False
            for byte in PARTIAL * 4:
                try:
                    dribble.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                if closed_by_server(dribble, 0.2):
                    closed = True
                    break
            assert closed and time.monotonic() - started < 2.5
            assert all(closed_by_server(s, 2.0) for s in socks), "a header-less connection outlived the deadline"
            # a keep-alive client that sends its next request in time is not cut
            with httpx.Client(base_url=srv.base_url, timeout=5) as http:
                for _ in range(3):
                    assert http.get("/health").status_code == 200
                    time.sleep(0.4)
        finally:
            for s in socks:
                s.close()


def test_bad_request_flood_logs_are_rate_limited(tiny):  # noqa: F811
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    with serve(tiny, HTTPOptions(log_burst=5, log_window=60)) as srv:
        logger.addHandler(handler)
        try:
            for _ in range(40):
                s = connect(srv)
                s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
                closed_by_server(s, 2.0)
                s.close()
        finally:
            logger.removeHandler(handler)
        assert httpx.get(srv.base_url + "/health").status_code == 200
    bad = [r for r in records if "Invalid HTTP request" in r.getMessage()]
    assert len(bad) == 5, len(bad)


def test_rate_limit_filter_counts_what_it_drops():
    f = RateLimitFilter(burst=3, window=0.2)

    def rec(msg, *args):
        return logging.LogRecord("x", logging.WARNING, __file__, 1, msg, args, None)

    passed = [f.filter(rec("client %s sent junk", i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert f.filter(rec("another template"))  # counted per template
    time.sleep(0.25)
    r = rec("client %s sent junk", 99)
    assert f.filter(r) and "7 similar messages suppressed" in r.getMessage() and "client 99" in r.getMessage()


@pytest.mark.parametrize("soft", [1024])
def test_default_cap_leaves_descriptors_free(soft, monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, 4096))
    assert HTTPOptions().connection_cap() == soft - 64
    assert HTTPOptions(max_connections=7).connection_cap() == 7
