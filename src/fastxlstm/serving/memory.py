"""Give the heap memory a large request freed back to the operating system (glibc's ``malloc_trim``).

A request body of megabytes (its bytes, the parsed JSON, the validated model, the text) is freed when the request
ends, but glibc keeps most of it in the process's heap: measured on the CPU (glibc 2.36, the embedded model, five
13.8 MB prompts refused as too long), the HTTP process grew from 481 MB to 639 MB and stayed there; one
``malloc_trim(0)`` (84 ms) brought it back to 528 MB. So after a request with a body over ``TRIM_AFTER_BYTES`` the
front end trims once, in a thread of its own, half a second after the request (when its objects are gone) and
at most once per ``MIN_INTERVAL`` seconds. Elsewhere (musl, macOS, Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading
import time
from collections.abc import Callable

log = logging.getLogger("fastxlstm.serving")

TRIM_AFTER_BYTES = 1 << 20  # request bodies larger than this are followed by a trim
DELAY = 0.5  # seconds after the request
MIN_INTERVAL = 5.0  # seconds between two trims


def _glibc_trim() -> Callable[[], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: fn(0)


class Trimmer:
    """Coalesces trim requests: one trim ``DELAY`` s after the first request, then none for ``MIN_INTERVAL`` s
    (requests meanwhile are served by one trim when the interval ends)."""

    def __init__(self, trim: Callable[[], int] | None = None, delay: float = DELAY, min_interval: float = MIN_INTERVAL):
        self.trim = _glibc_trim() if trim is None else trim
        self.delay, self.min_interval = delay, min_interval
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._last = float("-inf")
        self.trims = 0

    @property
    def available(self) -> bool:
        return self.trim is not None

    def request(self) -> None:
        """(Any thread.) Trim soon."""
        if self.trim is None:
            return
        with self._lock:
            if self._timer is not None:
                return  # one is scheduled already
            wait = max(self.delay, self._last + self.min_interval - time.monotonic())
            self._timer = threading.Timer(wait, self._run)
            self._timer.daemon = True
            self._timer.start()

    def _run(self) -> None:
        try:
            self.trim()
        except Exception:  # never worth more than a log line
            log.exception("malloc_trim failed")
        with self._lock:
            self._timer = None
            self._last = time.monotonic()
            self.trims += 1


trimmer = Trimmer()  # the process's (the heap is the process's too)

__all__ = ["TRIM_AFTER_BYTES", "Trimmer", "trimmer"]
