"""Prompt logprobs (echo, max_tokens 0, vLLM's prompt_logprobs) against the model's log-softmax and transformers';
vLLM's /tokenize, /detokenize, /tokenizer_info, /version, GET /v1/models/{id}; OpenAI fields accepted or refused by
name; the default chat template's stop and a custom template's variables."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from fastxlstm.serving.app import build_app
from fastxlstm.serving.chat_template import ChatTemplate
from fastxlstm.serving.runtime import ServeConfig
from fastxlstm.serving.testing import ServerThread

from .helpers import hf_twin
from .test_serving_api import client, server, tiny  # noqa: F401  (fixtures)

PROMPT = "The quick brown fox jumps over the lazy dog. xLSTM is a recurrent language model."


def model_logprobs(tiny, ids: list[int]) -> torch.Tensor:  # noqa: F811
    """log p(ids[t + 1] | ids[:t + 1]) under the model's own forward, in float64."""
    _, model, _ = tiny
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    lsm = torch.log_softmax(logits[0].double(), -1)
    return lsm[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_echo_prompt_logprobs_equal_the_models_and_transformers(tiny, client):  # noqa: F811
    _, model, tok = tiny
    ids = tok.encode(PROMPT)
    want = model_logprobs(tiny, ids)
    with torch.no_grad():
        hf = torch.log_softmax(hf_twin(model)(torch.tensor([ids]), use_cache=False).logits[0].double(), -1)
    assert torch.allclose(want, hf[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4)
    r = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    (c,) = r.choices
    assert c.text == PROMPT and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token: null, as OpenAI
    assert lp.tokens == [tok.decode([t]) for t in ids]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:], dtype=torch.float64), want, atol=2e-5)
    for t, top in zip(range(1, len(ids)), lp.top_logprobs[1:]):
        best = hf[t - 1].topk(2).values.tolist()  # (two byte fragments can decode alike: one entry)
        assert max(top.values()) == pytest.approx(best[0], abs=2e-4)
        assert all(min(abs(v - b) for b in best) < 2e-4 for v in top.values())
    assert lp.text_offset == [len(tok.decode(ids[:t])) for t in range(len(ids))]

    # with a completion: the prompt's entries, then the completion's (greedy: what the model's argmax picks)
    r = client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=0, max_tokens=3, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 3 and lp.token_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:len(ids)], dtype=torch.float64), want, atol=2e-5)
    # streamed: the first chunk carries the echoed prompt and its logprobs
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=1, max_tokens=2,
                                            temperature=0, stream=True))
    first = chunks[0].choices[0]
    assert first.text == PROMPT and first.logprobs.token_logprobs[1:] == pytest.approx(want.tolist(), abs=2e-5)


def test_vllm_prompt_logprobs_on_completions_and_chat(tiny, server):  # noqa: F811
    _, _, tok = tiny
    ids = tok.encode(PROMPT)
    want = model_logprobs(tiny, ids)
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": ids, "prompt_logprobs": 3,
                                               "max_tokens": 2, "temperature": 0}).json()
        pl = r["choices"][0]["prompt_logprobs"]
        assert pl[0] is None and len(pl) == len(ids)
        for t, entry in enumerate(pl[1:]):
            mine = entry[str(ids[t + 1])]
            assert mine["logprob"] == pytest.approx(float(want[t]), abs=2e-5) and mine["decoded_token"]
            ranks = sorted(v["rank"] for k, v in entry.items() if k != str(ids[t + 1]))
            assert ranks == [1, 2, 3][: len(ranks)] and len(entry) >= 3
            assert (mine["rank"] == 1) == (max(v["logprob"] for v in entry.values()) == mine["logprob"])
        msgs = [{"role": "user", "content": "hi"}]
        chat = http.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "prompt_logprobs": 0,
                                                        "max_tokens": 2}).json()
        chat_ids = http.post("/tokenize", json={"model": "tiny", "messages": msgs}).json()["tokens"]
        got = [next(iter(e.values()))["logprob"] for e in chat["prompt_logprobs"][1:]]
        assert got == pytest.approx(model_logprobs(tiny, chat_ids).tolist(), abs=2e-5)
        bad = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
        assert bad.status_code == 400 and "echo or prompt_logprobs" in bad.json()["error"]["message"]


def test_tokenizer_endpoints_version_and_model_card(tiny, server):  # noqa: F811
    _, _, tok = tiny
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        r = http.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
        assert r["tokens"] == tok.encode(PROMPT) and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
        assert "".join(r["token_strs"]) == PROMPT
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
        r = http.post("/tokenize", json={"model": "tiny", "messages": msgs}).json()
        assert r["tokens"] == tok.encode(ChatTemplate().render(msgs))
        assert http.post("/detokenize", json={"tokens": tok.encode(PROMPT)}).json() == {"prompt": PROMPT}
        assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
        assert http.post("/tokenize", json={"prompt": "a", "model": "nope"}).status_code == 404
        info = http.get("/tokenizer_info").json()
        assert info["eos_token"] == "<|eos|>" and info["chat_template"] == ChatTemplate().source
        import fastxlstm

        assert http.get("/version").json() == {"version": fastxlstm.__version__}
        card = http.get("/v1/models/tiny").json()
        assert card["id"] == "tiny" and card["object"] == "model"
        missing = http.get("/v1/models/gpt-4")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_harmless_fields_are_accepted_and_unsupported_ones_named(client, server):  # noqa: F811
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], max_tokens=3,
        store=False, metadata={"k": "v"}, user="u1", service_tier="auto", reasoning_effort="low",
        stream_options=None, extra_body={"chat_template_kwargs": {"x": 1}, "skip_special_tokens": True})
    assert r.choices[0].message.content is not None
    s = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       stream=True, stream_options={"include_usage": True,
                                                                    "continuous_usage_stats": True})
    assert [c for c in s][-1].usage.completion_tokens == 3
    for extra, name in (({"audio": {}}, "audio"), ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
                        ({"modalities": ["text", "audio"]}, "modalities"), ({"min_tokens": 3}, "min_tokens"),
                        ({"chat_template": "{{ x }}"}, "chat_template")):
        with pytest.raises(openai.BadRequestError, match=name):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           extra_body=extra)
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])


def test_default_template_stops_at_the_next_user_turn(server):  # noqa: F811
    """A base model continues the dialogue with the next ``User:`` turn: the answer ends before it (forced
    here with a regex grammar, which makes the model write exactly that text)."""
    pytest.importorskip("xgrammar")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40,
            "guided_regex": " Hello there\nUser: more"}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).json()
    assert r["choices"][0]["message"]["content"] == " Hello there" and r["choices"][0]["finish_reason"] == "stop"
    c = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 40,
                                                              "guided_regex": " Hello there\nUser: more"}, timeout=60)
    assert c.json()["choices"][0]["text"] == " Hello there\nUser: more"  # no template, no stop


def test_custom_template_gets_the_request_variables(tiny):  # noqa: F811
    _, model, tok = tiny
    template = ChatTemplate("{% for m in messages %}{{ greeting }} {{ m['content'] }}{% endfor %}|", origin="t.jinja")
    assert template.stop == ()
    with ServerThread(build_app(model, tok, ServeConfig(model_name="tiny", max_slots=2), template)) as srv:
        r = httpx.post(srv.base_url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "chat_template_kwargs": {"greeting": "Hail"}}).json()
        assert r["tokens"] == tok.encode("Hail hi|")
        bad = httpx.post(srv.base_url + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "chat_template_kwargs": {"messages": []}})
        assert bad.status_code == 400 and "chat_template_kwargs" in json.dumps(bad.json())

