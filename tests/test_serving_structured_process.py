"""Structured output with the scheduler in a worker process (``--scheduler-process``), through the real openai
client: the HTTP side compiles, the worker's matchers and sampler apply the grammar; seeded answers parse,
validate and equal the in-process server's, token for token; a restarted worker is sent the tokenizer info
again; a grammar text the worker cannot read fails that request alone."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("xgrammar")

from fastxlstm.checkpoint import load, load_model_and_tokenizer  # noqa: E402
from fastxlstm.sampling import SamplingParams  # noqa: E402
from fastxlstm.serving.app import build_app  # noqa: E402
from fastxlstm.serving.grammar import Grammars, GrammarStore, SerializedGrammar  # noqa: E402
from fastxlstm.serving.requests import ErrorEvent, FinishEvent, GenerationRequest  # noqa: E402
from fastxlstm.serving.runtime import ServeConfig  # noqa: E402
from fastxlstm.serving.structured import GrammarSpec  # noqa: E402
from fastxlstm.serving.testing import ServerThread  # noqa: E402
from fastxlstm.serving.worker import WorkerSpec  # noqa: E402

from .test_serving_structured import MESSAGES, Person, Scene, Weather  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "xlstm-shakespeare-10m"
CFG = {"model_name": "bard", "max_slots": 4}


@pytest.fixture(scope="module")
def servers():
    model, tok = load_model_and_tokenizer(str(MODEL))
    local = ServerThread(build_app(model, tok, ServeConfig(**CFG)))
    remote = ServerThread(build_app(WorkerSpec(load, (str(MODEL),)), tok,
                                    ServeConfig(**CFG, scheduler_process=True, restart_backoff=0.2)))
    with local, remote:
        yield local, remote


def client(srv: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def proxy(srv: ServerThread):
    (p,) = srv.server.config.app.state.server.scheduler.proxies
    return p


def answers(srv: ServerThread, schema, seed: int) -> list[tuple[str, object]]:
    r = client(srv).chat.completions.parse(model="bard", messages=MESSAGES, response_format=schema, temperature=1.0,
                                           n=2, seed=seed, max_tokens=300)
    return [(c.message.content, c.message.parsed) for c in r.choices]


@pytest.mark.parametrize("schema,seed", [(Person, 7), (Scene, 3)])
def test_json_schema_through_the_worker_equals_the_in_process_server(servers, schema, seed):
    local, remote = servers
    got = answers(remote, schema, seed)
    for text, parsed in got:
        assert isinstance(parsed, schema) and schema.model_validate_json(text) == parsed
    assert got == answers(local, schema, seed)  # the same seeded draws under the same masks


def test_other_constraints_and_tools_through_the_worker(servers):
    local, remote = servers
    choices = ["to be", "not to be", "perchance to dream"]
    req = {"model": "bard", "prompt": "HAMLET:", "max_tokens": 20, "temperature": 1.0, "n": 4, "seed": 5,
           "extra_body": {"guided_choice": choices}}
    texts = [[c.text for c in client(s).completions.create(**req).choices] for s in (local, remote)]
    assert texts[0] == texts[1] and set(texts[1]) <= set(choices)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": Weather.model_json_schema()}}]
    call = {"model": "bard", "messages": [{"role": "user", "content": "Weather in Verona?"}], "tools": tools,
            "tool_choice": "required", "temperature": 1.0, "seed": 4, "max_tokens": 200}
    args = [client(s).chat.completions.create(**call).choices[0].message.tool_calls[0].function.arguments
            for s in (local, remote)]
    assert args[0] == args[1]
    Weather.model_validate_json(args[1])
    # a bad schema is still the HTTP side's 400
    r = httpx.post(remote.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "bard", "messages": MESSAGES, "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_a_restarted_worker_gets_the_tokenizer_info_again(servers):
    _, remote = servers
    answers(remote, Person, 1)  # this worker has the info
    p = proxy(remote)
    old = p.pid
    assert p._grammar_info is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while not (p.alive and p.pid != old) and time.monotonic() < deadline:
        time.sleep(0.1)
    while httpx.get(remote.base_url + "/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    for text, parsed in answers(remote, Person, 2):
        assert Person.model_validate_json(text) == parsed


def test_grammar_store_round_trip_and_bad_texts():
    """The worker's side alone: a serialized grammar loads into one that masks as the original does (same
    allowed tokens at the start), is deserialized once per distinct text, and bad input is a ValueError."""
    import torch
    import xgrammar as xgr

    _, tok = load_model_and_tokenizer(str(MODEL))
    g = Grammars(tok, 8192)
    spec = GrammarSpec("json", json.dumps(Person.model_json_schema()))
    sent = g.serialized(spec)
    assert g.serialized(spec) is sent  # memoised per spec
    store = GrammarStore()
    with pytest.raises(RuntimeError, match="tokenizer info"):
        store.load(sent.compiled)
    store.set_info(sent.info)
    compiled = store.load(sent.compiled)
    assert store.load(sent.compiled) is compiled  # deserialized once
    masks = torch.zeros(2, 256, dtype=torch.int32)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(masks, 0)
    xgr.GrammarMatcher(g.compile(spec)).fill_next_token_bitmask(masks, 1)
    assert torch.equal(masks[0], masks[1]) and 0 < int(masks[0].ne(0).sum()) < 256
    with pytest.raises(ValueError, match="deserialize"):
        store.load('{"not": "a grammar"}')
    g.shutdown()


def test_a_bad_grammar_text_fails_only_its_request(servers):
    """What the worker does with a grammar it cannot load: that request gets an error event, the others run."""
    import asyncio

    _, remote = servers
    p = proxy(remote)
    good = httpx.post(remote.base_url + "/v1/completions", timeout=60, json={
        "model": "bard", "prompt": "HAMLET:", "max_tokens": 8, "guided_choice": ["aye", "nay"]})
    assert good.status_code == 200  # the worker has the tokenizer info
    info = p._grammar_info

    async def run():
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        bad = GenerationRequest([5, 6], SamplingParams(max_new_tokens=2), grammar=SerializedGrammar("{}", info))
        ok = GenerationRequest([5, 6], SamplingParams(max_new_tokens=2))
        p.submit([bad, ok], loop, queue)
        events: dict[int, list] = {bad.id: [], ok.id: []}
        while not events[bad.id] or not any(isinstance(e, FinishEvent) for e in events[ok.id]):
            req, evs = await asyncio.wait_for(queue.get(), 60)
            events[req.id].extend(evs)
        return events[bad.id], events[ok.id]

    bad_events, ok_events = asyncio.run(run())
    assert isinstance(bad_events[0], ErrorEvent) and "deserialize" in bad_events[0].message
    assert not any(isinstance(e, ErrorEvent) for e in ok_events)
