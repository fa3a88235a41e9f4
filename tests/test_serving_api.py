"""The OpenAI-compatible server through the real ``openai`` client, against ``generate``."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from fastxlstm.engine import LLM
from fastxlstm.serving.app import build_app
from fastxlstm.serving.chat_template import ChatTemplate
from fastxlstm.serving.runtime import ServeConfig
from fastxlstm.serving.testing import ServerThread
from fastxlstm.tokenizer import Tokenizer

from .helpers import greedy_reference as generate
from .helpers import serve_cli, wait_healthy


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The small random model saved with the test tokenizer (conftest's), the model and tokenizer loaded from it."""
    from fastxlstm.checkpoint import load

    return tiny_model_dir, load(tiny_model_dir), Tokenizer.from_dir(tiny_model_dir)


def start(tiny, **overrides):
    _, model, tok = tiny
    cfg = ServeConfig(**{"model_name": "tiny", "max_slots": 8, **overrides})
    return ServerThread(build_app(model, tok, cfg))


@pytest.fixture(scope="module")
def server(tiny):
    with start(tiny, max_slots=12, prefill_chunk=16) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def reference(tiny, ids: list[int], max_tokens: int, **kw) -> tuple[str, int]:
    """Text and token count that ``generate`` produces (stopping at EOS, as the server does)."""
    _, model, tok = tiny
    out = generate(model, ids, max_tokens, eos_token_id=tok.eos_token_id, **kw)[0].tolist()
    n = len(out)
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    return tok.decode(out), n


def scheduler(srv):
    return srv.server.config.app.state.server.scheduler


def wait_idle(srv, timeout=10.0) -> dict:
    sched = scheduler(srv)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = sched.stats()
        if stats["slots_free"] == stats["slots_total"] and sched.idle():
            return stats
        time.sleep(0.02)
    raise AssertionError(f"slots leaked: {sched.stats()}")


def metric(srv, name: str) -> float:
    text = httpx.get(srv.base_url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# ------------------------------------------------------------------------------------------- basics
def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server.base_url + "/health").json()
    assert health["status"] == "ok" and health["slots_total"] == 12
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("fastxlstm_prefix_cache_hits_total", "fastxlstm_prefix_cache_misses_total",
                 "fastxlstm_time_to_first_token_seconds", "fastxlstm_slots_used"):
        assert name in text


@pytest.mark.parametrize("prompt", ["The quick brown fox", "x", "Ein Bär läuft über die Brücke — schön! " * 6])
def test_completion_greedy_equals_generate(tiny, client, prompt):
    tok = tiny[2]
    ids = tok.encode(prompt)
    want, n = reference(tiny, ids, 24)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n
    assert r.usage.total_tokens == len(ids) + n
    assert r.choices[0].finish_reason == ("length" if n == 24 and tok.eos_token_id not in [] else "stop")
    # token-id prompts and streaming give the same
    s = client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0, stream=True)
    chunks = list(s)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n


def test_chat_greedy_equals_generate_stream_and_not(tiny, client):
    tok = tiny[2]
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The lazy dog?"}]
    ids = tok.encode(ChatTemplate().render(messages))
    want, n = reference(tiny, ids, 20)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


def test_stop_strings(tiny, client):
    tok = tiny[2]
    prompt = "The quick brown fox"
    full, _ = reference(tiny, tok.encode(prompt), 40)
    assert len(full) > 8
    stop = full[5:8]
    want = full[: full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "\x00zz"],
                                      stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            text, reasons = r.choices[0].text, [r.choices[0].finish_reason]
        assert text == want and reasons == ["stop"]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stop=stop,
                                  extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == full[: full.index(stop) + len(stop)]


def test_stream_interval_exact_text_stops_and_fewer_chunks(tiny):
    """Tokens handed over several decode steps at a time: same text, same stop and token counts, fewer chunks."""
    tok = tiny[2]
    prompt = "The quick brown fox"
    full, n_full = reference(tiny, tok.encode(prompt), 40)
    stop = full[5:8]
    with start(tiny, stream_interval_ms=40) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
        for stops, want, reason in (([stop], full[: full.index(stop)], "stop"), (None, full, None)):
            chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                                    stop=stops, stream=True, logprobs=0,
                                                    stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            assert text == want
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert reasons == [reason or ("stop" if n_full < 40 else "length")]
            tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
            assert len(tokens) == chunks[-1].usage.completion_tokens
            if reason is None:
                assert chunks[-1].usage.completion_tokens == n_full
                assert sum(1 for c in chunks if c.choices) < n_full  # several tokens per chunk
        wait_idle(srv)


def test_n_and_seeds(tiny, client):
    tok = tiny[2]
    prompt = "xLSTM is"
    kw = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, n=3, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible
    assert len({c.text for c in a.choices}) > 1  # different choices differ
    assert a.usage.prompt_tokens == len(tok.encode(prompt))
    # choice 0 with seed s samples exactly like LLM.generate(seed=s), choice 1 like seed s + 1
    llm = LLM(tiny[1], tok)
    for i in (0, 1):
        want = llm.generate(prompt, max_new_tokens=12, temperature=1.0, seed=1234 + i)[0].text
        assert a.choices[i].text == want
    # streaming n>1 delivers every choice
    s = client.completions.create(**kw, stream=True)
    texts = ["", "", ""]
    for c in s:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == [c.text for c in a.choices]
    # greedy n>1: all choices equal the greedy output
    g = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       temperature=0, n=2)
    assert g.choices[0].message.content == g.choices[1].message.content


def test_sampling_knobs_and_logprobs(tiny, client):
    prompt = "The quick brown fox"
    base = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, logprobs=3)
    lp = base.choices[0].logprobs
    assert len(lp.tokens) == base.usage.completion_tokens == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(t) <= 3 and max(t.values()) == pytest.approx(v, abs=1e-5)
               for t, v in zip(lp.top_logprobs, lp.token_logprobs))  # greedy picks the top token (dict keys
    # are token texts, so byte-fragment tokens that decode alike share a key)
    # logprobs equal the model's log-softmax
    _, model, tok = tiny
    ids = tok.encode(prompt)
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([ids]))[0][0, -1], -1).max().item()
    assert lp.token_logprobs[0] == pytest.approx(first, abs=1e-4)
    # vLLM extras change the output the way they should
    pen = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                    extra_body={"repetition_penalty": 3.0})
    assert pen.choices[0].text != base.choices[0].text
    banned = lp.tokens[0]
    top_id = tok.encode(banned) if banned else []
    if len(top_id) == 1:
        biased = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0,
                                           logit_bias={str(top_id[0]): -100})
        assert biased.choices[0].text != banned
    k1 = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=1.5, seed=3,
                                   extra_body={"top_k": 1})
    assert k1.choices[0].text == base.choices[0].text  # top-k 1 is greedy
    mp = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=1.0, seed=3,
                                   extra_body={"min_p": 1.0})
    assert mp.choices[0].text == base.choices[0].text  # min-p 1 keeps only the top token
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


# ------------------------------------------------------------------------------------- concurrency
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_32_concurrent_streams_match_solo_runs(tiny, backend):
    """Mixed prompt lengths, fewer slots than clients (queueing), small prefill chunks (interleaving),
    with the engine's Triton/auto and PyTorch reference kernels."""
    _, model, tok = tiny
    words = "The quick brown fox jumps over the lazy dog and xLSTM is a recurrent model".split()
    prompts = [" ".join(words[: 1 + (i * 7) % len(words)]) * (1 + i % 5) for i in range(32)]
    lengths = [6 + (i * 5) % 23 for i in range(32)]
    want = [reference(tiny, tok.encode(p), n) for p, n in zip(prompts, lengths)]
    assert len({len(tok.encode(p)) for p in prompts}) > 10

    with start(tiny, max_slots=12, prefill_chunk=24, backend=backend) as srv:
        aclient = openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)

        async def one(i):
            kind = "chat" if i % 4 == 3 else "completion"
            if kind == "completion":
                stream = await aclient.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                                          temperature=0, stream=True)
                text, usage = "", None
                async for c in stream:
                    text += "".join(ch.text for ch in c.choices)
                    usage = c.usage or usage
                return text, usage.completion_tokens
            msgs = [{"role": "user", "content": prompts[i]}]
            stream = await aclient.chat.completions.create(model="tiny", messages=msgs, max_tokens=lengths[i],
                                                           temperature=0, stream=True)
            text, usage = "", None
            async for c in stream:
                text += "".join(ch.delta.content or "" for ch in c.choices)
                usage = c.usage or usage
            return text, usage.completion_tokens

        async def main():
            try:
                return await asyncio.gather(*(one(i) for i in range(32)))
            finally:
                await aclient.close()

        got = asyncio.run(main())
        for i in range(32):
            if i % 4 == 3:
                ids = tok.encode(ChatTemplate().render([{"role": "user", "content": prompts[i]}]))
                exp = reference(tiny, ids, lengths[i])
            else:
                exp = want[i]
            assert got[i] == exp, f"client {i}"
        stats = wait_idle(srv)
        assert stats["running"] == 0 and stats["waiting"] == 0
        slots = scheduler(srv).backend
        assert not slots.engine.active.any()


# ------------------------------------------------------------------------------------ prefix cache
def test_prefix_cache_second_chat_turn(tiny, server, client):
    tok = tiny[2]
    system = {"role": "system", "content": "You answer questions about foxes and dogs, briefly."}
    turn1 = [system, {"role": "user", "content": "Is the fox quick?"}]
    r1 = client.chat.completions.create(model="tiny", messages=turn1, max_tokens=10, temperature=0)
    p1 = tok.encode(ChatTemplate().render(turn1))
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And the dog?"}]
    p2 = tok.encode(ChatTemplate().render(turn2))
    assert p2[: len(p1)] == p1
    before = metric(server, "fastxlstm_prefill_tokens_total")
    hits = metric(server, "fastxlstm_prefix_cache_hits_total")
    r2 = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=12, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r2.usage.prompt_tokens == len(p2)
    assert cached >= len(p1)
    assert metric(server, "fastxlstm_prefill_tokens_total") - before == len(p2) - cached  # only new tokens
    assert metric(server, "fastxlstm_prefix_cache_hits_total") == hits + 1
    want, _ = reference(tiny, p2, 12)  # a cold run
    assert r2.choices[0].message.content == want
    # a different conversation with the same system prompt reuses the system prompt's state
    other = [system, {"role": "user", "content": "What is xLSTM?"}]
    r3 = client.chat.completions.create(model="tiny", messages=other, max_tokens=6, temperature=0)
    sys_len = len(tok.encode(ChatTemplate().render([system], add_generation_prompt=False)))
    assert r3.usage.prompt_tokens_details.cached_tokens == sys_len
    assert r3.choices[0].message.content == reference(tiny, tok.encode(ChatTemplate().render(other)), 6)[0]
    # an exact repeat needs no prefill at all
    before = metric(server, "fastxlstm_prefill_tokens_total")
    r4 = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=12, temperature=0)
    assert r4.usage.prompt_tokens_details.cached_tokens == len(p2)
    assert metric(server, "fastxlstm_prefill_tokens_total") == before
    assert r4.choices[0].message.content == want


# -------------------------------------------------------------------------------------- robustness
LONG = {"model": "tiny", "prompt": "The quick", "max_tokens": 500_000, "temperature": 0, "stream": True,
        "ignore_eos": True}  # a greedy stream that ends only when the client hangs up


def stream_then_disconnect(http: httpx.Client, slots_total: int) -> None:
    """Open the :data:`LONG` stream, read its first lines (data among them) while it holds one of the
    server's ``slots_total`` slots (``/health``), and hang up (the caller checks the slot comes back)."""
    with http.stream("POST", "/v1/completions", json=LONG) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: ") for x in got)
        assert http.get("/health").json()["slots_free"] == slots_total - 1


def test_disconnect_cancels_and_frees_slot(tiny):
    with start(tiny, max_slots=2, max_model_len=1_000_000) as srv:
        with httpx.Client(base_url=srv.base_url) as http:
            stream_then_disconnect(http, 2)
            wait_idle(srv)
            body = {**LONG, "stream": False}  # non-streaming: the client gives up after 0.5 s
            with pytest.raises(httpx.TimeoutException):
                http.post("/v1/completions", json=body, timeout=0.5)
            wait_idle(srv)
            r = http.post("/v1/completions", json={**body, "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_request_timeout(tiny):
    with start(tiny, max_slots=2, request_timeout=0.3, max_model_len=1_000_000) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny", prompt="hi", max_tokens=500_000, temperature=0,
                                     extra_body={"ignore_eos": True})
        assert e.value.status_code == 408 and "timed out" in e.value.message
        with pytest.raises(openai.APIError):
            for _ in client.completions.create(model="tiny", prompt="hi", max_tokens=500_000, stream=True,
                                              extra_body={"ignore_eos": True}):
                pass
        wait_idle(srv)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_queue_full_gets_429_with_retry_after(tiny):
    with start(tiny, max_slots=1, max_waiting=1, max_model_len=1_000_000) as srv:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 500_000, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=srv.base_url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as first:
                lines = first.iter_lines()  # keep a reference: a collected iterator closes the response
                next(lines)
                with http.stream("POST", "/v1/completions", json=body) as second:
                    assert second.status_code == 200  # queued
                    deadline = time.monotonic() + 5
                    while scheduler(srv).stats()["waiting"] < 1 and time.monotonic() < deadline:
                        time.sleep(0.01)
                    third = httpx.post(srv.base_url + "/v1/completions", json=body)
                    assert third.status_code == 429 and third.headers["retry-after"] == "1"
                    assert third.json()["error"]["type"] == "rate_limit_error"
        wait_idle(srv)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_one_failing_request_does_not_hurt_others(tiny, backend):
    """Faults injected in prefill (one prompt) and in decode (whenever one request's forced token is fed)."""
    _, model, tok = tiny
    prompts = ["The quick brown fox", "over the lazy dog", "xLSTM is recurrent", "matrix memory"]
    want = [reference(tiny, tok.encode(p), 16) for p in prompts]
    used = {t for p in prompts for t in generate(model, tok.encode(p), 17)[0].tolist()}
    poison = next(t for t in range(3, 300) if t not in used)
    with start(tiny, max_slots=8, backend=backend) as srv:
        backend = scheduler(srv).backend
        real_prefill, real_decode = backend.prefill, backend.decode_window
        sched = scheduler(srv)
        real_batch = getattr(backend, "prefill_batch", None)

        def prefill(tokens, state):
            if tokens and tokens[0] == poison:
                raise RuntimeError("injected prefill fault")
            return real_prefill(tokens, state)

        def prefill_batch(tokens, states):  # a batch holding the poisoned prompt fails as a whole
            if any(t and t[0] == poison for t in tokens):
                raise RuntimeError("injected batched prefill fault")
            return real_batch(tokens, states)

        def decode(slots, steps, logprobs=False):  # a window holding a sequence that sampled the poison token
            fed = {c.slot for r in list(sched.running) for c in r.choices if poison in c.generated}
            if fed & set(slots):
                raise RuntimeError("injected decode fault")
            return real_decode(slots, steps, logprobs)

        backend.prefill, backend.decode_window = prefill, decode
        if real_batch is not None:
            backend.prefill_batch = prefill_batch
        aclient = openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)

        async def good(p):
            r = await aclient.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0)
            return r.choices[0].text, r.usage.completion_tokens

        async def bad_prefill():
            with pytest.raises(openai.InternalServerError):
                await aclient.completions.create(model="tiny", prompt=[poison, 5, 6], max_tokens=8)

        async def bad_decode():
            with pytest.raises(openai.InternalServerError):
                await aclient.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0,
                                                 logit_bias={str(poison): 100})

        async def main():
            try:
                return await asyncio.gather(*(good(p) for p in prompts), bad_prefill(), bad_decode())
            finally:
                await aclient.close()

        got = asyncio.run(main())
        assert list(got[:4]) == want
        wait_idle(srv)
        backend.prefill, backend.decode_window = real_prefill, real_decode
        r = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none").completions.create(
            model="tiny", prompt=prompts[0], max_tokens=16, temperature=0)
        assert (r.choices[0].text, r.usage.completion_tokens) == want[0]
        assert metric(srv, "fastxlstm_request_errors_total") == 2


def test_graceful_shutdown_drains_running_requests(tiny):
    _, model, tok = tiny  # the drain (running requests finish first) is the app's drain_timeout
    srv = ServerThread(build_app(model, tok, ServeConfig(model_name="tiny", max_slots=2), drain_timeout=30)).__enter__()
    result = {}

    def run():
        result["r"] = httpx.post(srv.base_url + "/v1/completions", timeout=60,
                                 json={"model": "tiny", "prompt": "hi", "max_tokens": 300, "temperature": 0,
                                       "ignore_eos": True})

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while scheduler(srv).stats()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    srv.stop()
    t.join(timeout=60)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 300
    assert not scheduler(srv).alive
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.base_url + "/health")


def test_api_key(tiny):
    with start(tiny, api_key="sekret") as srv:
        bad = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="sekret")
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_model_dir_chat_template(tiny, tmp_path):
    """A chat template in tokenizer_config.json is used instead of the default."""
    path, model, tok = tiny
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|eos|>"}))
    ct = ChatTemplate.from_model_dir(tmp_path)
    assert ct.origin.endswith("tokenizer_config.json")
    msgs = [{"role": "user", "content": "hi"}]
    assert ct.render(msgs) == "<user>hi<assistant>"
    app = build_app(model, tok, ServeConfig(model_name="tiny"), ct)
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none")
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0)
        assert r.usage.prompt_tokens == len(tok.encode("<user>hi<assistant>"))
        assert r.choices[0].message.content == reference(tiny, tok.encode("<user>hi<assistant>"), 5)[0]


def test_fastxlstm_serve_cli(tiny):
    """``fastxlstm serve`` in a subprocess: health, a chat completion, clean exit on SIGINT."""
    import os
    import signal

    path, _, tok = tiny
    proc, base = serve_cli("--model", str(path), "--served-model-name", "cli-model", "--max-slots", "2",
                           "--log-level", "warning", new_session=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_healthy(proc, base, timeout=60)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        r = client.chat.completions.create(model="cli-model", messages=msgs, max_tokens=6, temperature=0)
        assert r.choices[0].message.content == reference(tiny, tok.encode(ChatTemplate().render(msgs)), 6)[0]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "serving cli-model" in out
