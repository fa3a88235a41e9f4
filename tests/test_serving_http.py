"""Slow and hostile clients at the connection level: header deadline, connection cap, log rate limits (a few dozen
connections and sub-second deadlines prove the mechanisms; nothing here floods)."""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------------------- browsers, Host names, API key
OK = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 2, "temperature": 0}


def raw(srv, request: bytes, wait: float = 5.0) -> bytes:
    with connect(srv) as s:
        s.sendall(request)
        s.settimeout(wait)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def test_host_header_and_json_content_type(tiny):  # noqa: F811
    """DNS rebinding (an attacker's name resolving to 127.0.0.1) and cross-site simple requests (text/plain or no
    Content-Type, no preflight) are refused; the server's own names and JSON clients work."""
    with serve(tiny, HTTPOptions()) as srv, httpx.Client(base_url=srv.base_url, timeout=30) as http:
        port = srv.port
        for host in ["evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example",
                     "evil.example@127.0.0.1", f"[::2]:{port}", "127.0.0.1:x", "", "0.0.0.0"]:
            for method, path in [("GET", "/metrics"), ("GET", "/health"), ("POST", "/v1/completions"),
                                 ("GET", "/v1/models")]:
                r = http.request(method, path, headers={"host": host}, json=OK if method == "POST" else None)
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (host, path)
        for host in [f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", "localhost.", f"[::1]:{port}"]:
            assert http.get("/health", headers={"host": host}).status_code == 200, host
        no_host = raw(srv, b"GET /health HTTP/1.0\r\n\r\n")
        assert no_host.startswith(b"HTTP/1.1 400") and b"invalid_host" in no_host
        body = json.dumps(OK).encode()
        for ctype in ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", None, "application/jsonx", "json"]:
            r = http.post("/v1/completions", content=body, headers={} if ctype is None else {"content-type": ctype})
            assert r.status_code == 415, (ctype, r.status_code)
        for ctype in ["application/json", "application/json; charset=utf-8", "Application/JSON"]:
            assert http.post("/v1/completions", content=body, headers={"content-type": ctype}).status_code == 200
    with serve(tiny, HTTPOptions(), allowed_hosts=("api.example.com", "*.internal")) as srv:
        with httpx.Client(base_url=srv.base_url, timeout=30) as http:
            assert http.get("/health", headers={"host": "api.example.com"}).status_code == 200
            assert http.get("/health", headers={"host": "a.b.internal:80"}).status_code == 200
            for host in ["internal", "127.0.0.1", "example.com", "xinternal"]:
                assert http.get("/health", headers={"host": host}).status_code == 400, host
    with serve(tiny, HTTPOptions(), allowed_hosts=None) as srv:
        assert httpx.get(srv.base_url + "/health", headers={"host": "anything.example"}).status_code == 200


def test_api_key_guards_every_path_but_health(tiny, monkeypatch):  # noqa: F811
    import hmac

    from fastxlstm.serving import middleware

    compared, real = [], hmac.compare_digest
    monkeypatch.setattr(middleware.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    key = "s3cret-key"
    paths = [("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc"), ("GET", "/v1/models"),
             ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/nope")]
    wrong = [None, "", "Bearer", f"Bearer {key[:-1]}", f"Bearer {key}x", f"bearer {key.upper()}", key,
             f"Basic {key}", f"Bearer  {key}", "Bearer " + "x" * 5000]
    with serve(tiny, HTTPOptions(), api_key=key) as srv, httpx.Client(base_url=srv.base_url, timeout=30) as http:
        for method, path in paths:
            for auth in wrong:
                r = http.request(method, path, headers={} if auth is None else {"authorization": auth}, json=OK)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, auth)
        good = {"authorization": f"Bearer {key}"}
        for path in ["/metrics", "/docs", "/openapi.json", "/v1/models"]:
            assert http.get(path, headers=good).status_code == 200, path
        assert http.post("/v1/completions", headers=good, json=OK).status_code == 200
        assert http.get("/health").status_code == 200  # load balancers probe without the key
        assert compared  # the key is compared in constant time
    with serve(tiny, HTTPOptions(), api_key=key, public_metrics=True) as srv:
        assert httpx.get(srv.base_url + "/metrics").status_code == 200
        assert httpx.get(srv.base_url + "/openapi.json").status_code == 401


def test_body_read_deadline(tiny):  # noqa: F811
    """A body that never completes (declared longer than sent, or dripped) gets a 408 at the deadline; the slot-free
    server keeps serving."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 500\r\n\r\n")
    with serve(tiny, HTTPOptions(), body_timeout=0.5) as srv:
        t = time.monotonic()
        out = raw(srv, head + b'{"model": "tiny", ', wait=5)
        assert out.startswith(b"HTTP/1.1 408") and b"request_timeout" in out and time.monotonic() - t < 3
        with connect(srv) as s:
            s.sendall(head)
            t = time.monotonic()
            status = b""
            for _ in range(40):  # a byte every 0.1 s: the deadline is for the whole body
                try:
                    s.sendall(b" ")
                except (BrokenPipeError, ConnectionResetError):
                    break
                s.settimeout(0.1)
                try:
                    status += s.recv(4096)
                except TimeoutError:
                    continue
                if status:
                    break
            assert status.startswith(b"HTTP/1.1 408") and time.monotonic() - t < 2.5
        assert httpx.post(srv.base_url + "/v1/completions", json=OK).status_code == 200
