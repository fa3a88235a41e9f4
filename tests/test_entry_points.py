"""One inference core: the same seeded request gives the same tokens through ``LLM.generate`` (alone and
with batch-mates of other lengths), the OpenAI server (openai client, streaming and not) and
``fastxlstm generate --seed``; greedy equals the reference loop everywhere."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from fastxlstm.cli import app
from fastxlstm.engine import LLM

from .helpers import greedy_reference

openai = pytest.importorskip("openai")  # (the GPU image has no openai: skip there, before the serving imports)
from .test_serving_api import start, tiny  # noqa: E402, F401  (the module fixture)

KNOBS = [dict(temperature=0.0),
         dict(temperature=0.9, seed=3),
         dict(temperature=1.1, top_p=0.85, top_k=40, seed=11),
         dict(temperature=0.8, min_p=0.1, seed=5),
         dict(temperature=1.0, presence_penalty=0.8, frequency_penalty=0.5, seed=7),
         dict(temperature=0.7, repetition_penalty=1.3, seed=9, logit_bias={12: 3.0, 40: -100.0})]
PROMPT = "The quick brown fox"
MATES = ["xLSTM", "Ein Bär läuft über die Brücke — schön! Ein Bär", "over the lazy dog and the"]
N = 14


def _body(kw: dict) -> dict:
    out = {k: v for k, v in kw.items() if k not in ("top_k", "min_p", "repetition_penalty", "logit_bias")}
    extra = {k: kw[k] for k in ("top_k", "min_p", "repetition_penalty") if k in kw}
    if "logit_bias" in kw:
        out["logit_bias"] = {str(t): b for t, b in kw["logit_bias"].items()}
    return out, extra


def test_seeded_requests_agree_across_entry_points(tiny):  # noqa: F811
    path, model, tok = tiny
    llm = LLM(model, tok, max_slots=4)
    want = {}
    for i, kw in enumerate(KNOBS):
        alone = llm.generate(PROMPT, max_new_tokens=N, ignore_eos=True, **kw)[0]
        mixed = llm.generate([MATES[i % 3], PROMPT, *MATES], max_new_tokens=N, ignore_eos=True, **kw)[1]
        assert mixed.token_ids == alone.token_ids, kw  # batch-mates of other lengths change nothing
        want[i] = alone
    assert want[0].token_ids == greedy_reference(model, tok.encode(PROMPT), N)[0].tolist()
    assert len({tuple(w.token_ids) for w in want.values()}) == len(KNOBS)  # the knobs matter here

    with start(tiny, max_slots=6, prefill_chunk=16) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
        aclient = openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
        for i, kw in enumerate(KNOBS):
            body, extra = _body(kw)
            r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, extra_body={
                "ignore_eos": True, **extra}, logprobs=1, **body)
            assert r.choices[0].text == want[i].text, kw
            stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, stream=True,
                                               extra_body={"ignore_eos": True, **extra}, **body)
            assert "".join(c.choices[0].text for c in stream if c.choices) == want[i].text, kw

        async def concurrent():  # the same requests with busy batch-mates in the server
            try:
                mates = [aclient.completions.create(model="tiny", prompt=m, max_tokens=N + 5, temperature=1.0)
                         for m in MATES]
                ours = [aclient.completions.create(model="tiny", prompt=PROMPT, max_tokens=N,
                                                   extra_body={"ignore_eos": True, **_body(kw)[1]}, **_body(kw)[0])
                        for kw in KNOBS]
                return (await asyncio.gather(*mates, *ours))[len(MATES):]
            finally:
                await aclient.close()

        for i, r in enumerate(asyncio.run(concurrent())):
            assert r.choices[0].text == want[i].text, KNOBS[i]

    runner = CliRunner()
    for i in (0, 2, 3):
        kw = KNOBS[i]
        args = ["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", str(N), "--ignore-eos"]
        for key in ("temperature", "top_p", "top_k", "min_p", "seed"):
            if key in kw:
                args += [f"--{key.replace('_', '-')}", str(kw[key])]
        for flag in ("--stream", "--no-stream"):
            res = runner.invoke(app, args + [flag])
            assert res.exit_code == 0, res.output
            assert res.stdout == PROMPT + want[i].text + "\n", (kw, flag)
