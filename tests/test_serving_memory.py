"""Freed heap memory goes back to the OS after a large request (``serving.memory``: glibc's malloc_trim, coalesced
and rate-limited, off the event loop)."""

from __future__ import annotations

import platform
import time

import httpx
import pytest

from fastxlstm.config import XLSTMConfig
from fastxlstm.serving import memory
from fastxlstm.serving.app import build_app
from fastxlstm.serving.runtime import ServeConfig
from fastxlstm.serving.testing import ServerThread
from fastxlstm.tokenizer import Tokenizer

from .helpers import perturbed_model


def wait_for(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_trims_are_coalesced_and_rate_limited():
    calls: list[float] = []
    t = memory.Trimmer(lambda: calls.append(time.monotonic()) or 1, delay=0.05, min_interval=0.6)
    for _ in range(5):
        t.request()  # one trim for a burst
    assert wait_for(lambda: t.trims == 1)
    time.sleep(0.1)
    assert len(calls) == 1
    t.request()
    t.request()
    assert wait_for(lambda: t.trims == 2)
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.55  # not before the interval ended
    memory.Trimmer(None).request()  # no libc function: nothing happens


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_malloc_trim_is_found_and_runs():
    t = memory.Trimmer()
    assert t.available and t.trim() in (0, 1)


def test_a_large_body_is_followed_by_one_trim(tiny_tokenizer_dir, monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(memory.trimmer, "trim", lambda: calls.append(time.monotonic()) or 1)
    monkeypatch.setattr(memory.trimmer, "delay", 0.0)
    monkeypatch.setattr(memory.trimmer, "min_interval", 0.0)
    model = perturbed_model(XLSTMConfig(vocab_size=320, embedding_dim=32, num_blocks=1, num_heads=2))
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    with ServerThread(build_app(model, tok, ServeConfig(model_name="t", max_slots=1, warm_prefill=False))) as srv:
        with httpx.Client(base_url=srv.base_url, timeout=60) as http:
            small = http.post("/v1/completions", json={"model": "t", "prompt": "hi", "max_tokens": 2})
            assert small.status_code == 200
            time.sleep(0.2)
            assert calls == []  # small bodies: no trim
            big = http.post("/v1/completions", json={"model": "t", "prompt": "The quick brown fox. " * 100_000})
            assert big.status_code == 400  # too long for max_model_len, refused before tokenising
            assert wait_for(lambda: len(calls) == 1)
            too_big = http.post("/v1/completions", content=b"x" * (17 << 20),
                                headers={"content-type": "application/json"})
            assert too_big.status_code == 413  # read and dropped: trimmed as well
            assert wait_for(lambda: len(calls) == 2)
