"""Run an app with uvicorn in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import threading
import time

from .http import DrainingServer, HTTPOptions, uvicorn_config


class ServerThread:
    """``with ServerThread(app) as srv: srv.base_url`` -- uvicorn on 127.0.0.1 and a free port, with the
    connection limits of ``fastxlstm serve`` (``http``)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 graceful_timeout: float | None = None, http: HTTPOptions | None = None, start_timeout: float = 180.0):
        self.server = DrainingServer(uvicorn_config(app, host, port, http, log_level, graceful_timeout))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host
        self.port = port
        self.start_timeout = start_timeout  # seconds for the app's start-up (worker processes load their models)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __exit__(self, *exc) -> None:
        self.stop()
