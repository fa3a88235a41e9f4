"""Speculative decoding in the server (``ServeConfig.speculative_config``, ``fastxlstm serve --speculative-config``)
on the CPU with the embedded model: greedy and seeded sampled output token for token that of ``LLM.generate`` (with
and without speculation) and of the server without it, for both drafters; stops inside a draft; the grammar
fallback; the draft state rebuilt after plain windows; the n-gram path's plain windows when nobody has a draft;
and the ``/metrics`` counters equal to the engine's own counts, through the real openai client."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import openai
import pytest
import torch

from fastxlstm.checkpoint import load_model_and_tokenizer
from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import LLM
from fastxlstm.engine.backend import EngineSlotBackend
from fastxlstm.sampling import SamplingParams
from fastxlstm.serving.app import build_app
from fastxlstm.serving.metrics import Metrics
from fastxlstm.serving.requests import FinishEvent, GenerationRequest, TokenEvent
from fastxlstm.serving.runtime import ServeConfig, make_scheduler
from fastxlstm.serving.speculate import Speculator
from fastxlstm.serving.testing import ServerThread

from .helpers import perturbed_model
from .test_serving_units import run_requests

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "xlstm-shakespeare-10m"
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
PROMPTS = ["ROMEO: To be or not to be, to be or not to be, to be or", "JULIET:\nO Romeo, Romeo", "KING",
           "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\nFirst Citizen:\n"]


@pytest.fixture(scope="module")
def bard():
    return load_model_and_tokenizer(MODEL_DIR, device="cpu", dtype=torch.float32, weight_mode="fused")


def spec_configs(model):
    tiny = perturbed_model(XLSTMConfig(vocab_size=model.config.vocab_size, embedding_dim=32, num_blocks=1,
                                       num_heads=2, weight_mode="fused"))
    return {"ngram": NGRAM, "draft-self": {"method": "draft", "num_speculative_tokens": 3, "model": model},
            "draft-tiny": {"method": "draft", "num_speculative_tokens": 2, "model": tiny}}  # drafts mostly rejected


def serve(bard, spec, reqs, slots=3, **config):
    """Run ``reqs`` through a scheduler (speculating with ``spec``); returns (tokens, finish reasons, logprobs, top
    logprobs) per request in order, the metrics, the engine's (steps, drafted, accepted) summed over the released
    slots (read as each slot is released, before it is reused) and the scheduler."""
    model, tok = bard
    backend = EngineSlotBackend(model, slots)
    counts = [0, 0, 0]
    release = backend.release

    def counting_release(slot):
        for j, c in enumerate(backend.engine.spec_counts(slot)):
            counts[j] += c
        release(slot)

    backend.release = counting_release
    metrics = Metrics()
    sched = make_scheduler(backend, tok.eos_token_id, ServeConfig(max_slots=slots, speculative_config=spec,
                                                                  **{"prefix_cache_bytes": 0, **config}), metrics)
    assert (sched.speculator is not None) == (spec is not None)
    sched.start()
    try:
        events = run_requests(sched, reqs)
    finally:
        sched.shutdown()
    out = []
    for r in reqs:
        evs = events[r.id]
        out.append(([[e.token for e in evs if isinstance(e, TokenEvent) and e.choice == i] for i in range(r.n)],
                    [e.reason for e in evs if isinstance(e, FinishEvent)],
                    [e.logprob for e in evs if isinstance(e, TokenEvent)],
                    [e.top_logprobs for e in evs if isinstance(e, TokenEvent)]))
    return out, metrics, counts, sched


def counter(metrics, name):
    return getattr(metrics, name)._value.get()


def greedy_requests(tok, stop_id=None):
    """Mixed budgets (more prompts than slots), a stop id, top logprobs on one request, ``n = 2`` on another."""
    ids = [tok.encode(p) for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=29, logprobs=2), SamplingParams(max_new_tokens=17),
              SamplingParams(max_new_tokens=23, stop_token_ids=[stop_id] if stop_id is not None else []),
              SamplingParams(max_new_tokens=31)]
    return ids, params, [GenerationRequest(p, sp, n=2 if j == 1 else 1) for j, (p, sp) in enumerate(zip(ids, params))]


@pytest.fixture(scope="module")
def greedy_reference(bard):
    """The stop id (a token well inside the third request's run: inside a draft or a correction), LLM's greedy
    results of :func:`greedy_requests` and the server's without speculation."""
    model, tok = bard
    ids, params, _ = greedy_requests(tok)
    stop_id = LLM(model, tok, max_slots=1).generate(ids[2], sampling_params=params[2])[0].token_ids[9]
    ids, params, reqs = greedy_requests(tok, stop_id)
    want = LLM(model, tok, max_slots=3).generate(ids, sampling_params=params)
    plain, *_ = serve(bard, None, reqs)
    for (toks, reasons, *_), w in zip(plain, want):
        assert toks[0] == w.token_ids and reasons[0] == w.finish_reason
    return stop_id, want, plain


@pytest.mark.parametrize("which", ["ngram", "draft-self", "draft-tiny"])
def test_server_greedy_equals_llm_and_counts_equal_engine(bard, greedy_reference, which):
    """Greedy requests through the speculating scheduler: LLM's tokens (and the plain server's tokens, finish
    reasons and logprobs); the spec_decode counters equal the engine's counts."""
    model, tok = bard
    stop_id, want, plain = greedy_reference
    spec = spec_configs(model)[which]
    ids, params, reqs = greedy_requests(tok, stop_id)
    got, metrics, (steps, drafted, accepted), _ = serve(bard, spec, reqs)
    for (toks, reasons, lps, tops), (ptoks, preasons, plps, ptops), w in zip(got, plain, want):
        assert toks[0] == w.token_ids and toks == ptoks and reasons == preasons
        if lps and lps[0] is not None:  # (the first request: logprobs with 2 alternatives)
            torch.testing.assert_close(torch.tensor(lps), torch.tensor(plps), rtol=1e-4, atol=1e-4)
            assert [[i for i, _ in t] for t in tops] == [[i for i, _ in t] for t in ptops] and len(tops[0]) == 2
            torch.testing.assert_close(torch.tensor(tops), torch.tensor(ptops), rtol=1e-4, atol=1e-4)
    assert got[1][0][0] == got[1][0][1]  # n = 2 greedy choices agree
    assert got[2][1] == ["stop"] and len(got[2][0][0]) == 10
    assert drafted > 0 and counter(metrics, "spec_draft_tokens") == drafted
    assert counter(metrics, "spec_accepted_tokens") == accepted
    if which == "ngram":  # steps in which a sequence had no draft are not drafts
        assert 0 < counter(metrics, "spec_drafts") <= steps
    else:
        assert counter(metrics, "spec_drafts") == steps
    if which != "draft-tiny":
        assert accepted > 0 and steps < sum(len(t[0][0]) for t in got)
    if which == "draft-self":  # the target drafting for itself: every draft but those past a stop is accepted
        assert accepted >= drafted - 3 * 5
    if which != "ngram":  # every step speculative, in LLM too: the counters are LLM's own counts (n = 2: twice)
        own = LLM(model, tok, max_slots=3, speculative_config=spec).generate(ids, sampling_params=params)
        assert [r.token_ids for r in own] == [w.token_ids for w in want]
        for name, attr in (("spec_drafts", "num_spec_steps"), ("spec_draft_tokens", "num_draft_tokens"),
                           ("spec_accepted_tokens", "num_accepted_tokens")):
            assert counter(metrics, name) == sum(r.n * getattr(o, attr) for r, o in zip(reqs, own)), name


def test_server_seeded_sampling_equals_llm(bard):
    """Seeded sampled requests (temperature, top-k/p, penalties, logit bias) give LLM's speculative tokens (the
    engine's sampler, the same seeds and RNG positions) with both drafters."""
    model, tok = bard
    params = [SamplingParams(max_new_tokens=16, temperature=0.8, seed=s, top_k=40 if s % 2 else 0,
                             top_p=0.9 if s % 3 == 0 else 1.0, repetition_penalty=1.2 if s < 2 else 1.0,
                             frequency_penalty=0.5 if s == 3 else 0.0, logit_bias={11: 2.0} if s == 1 else {})
              for s in range(4)]
    ids = [tok.encode(p) for p in [PROMPTS[0]] * 2 + PROMPTS[1:3]]
    for which in ("ngram", "draft-self"):
        spec = spec_configs(model)[which]
        llm = LLM(model, tok, max_slots=4, speculative_config=spec).generate(ids, sampling_params=params)
        got, metrics, *_ = serve(bard, spec, [GenerationRequest(p, sp) for p, sp in zip(ids, params)], slots=4)
        assert [t[0][0] for t in got] == [r.token_ids for r in llm], which
        assert counter(metrics, "spec_draft_tokens") > 0


def test_grammar_batch_falls_back_and_draft_state_is_rebuilt(bard):
    """While a batch holds a choice under a grammar it decodes without speculation; the draft model's state of the
    other choices is then rebuilt before their next speculative window (with the target as its own draft model
    every draft is accepted again: a stale draft state would propose wrong tokens)."""
    model, tok = bard
    spec = spec_configs(model)["draft-self"]
    ids = [tok.encode(p) for p in PROMPTS[:2]]
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True), SamplingParams(max_new_tokens=40, ignore_eos=True)]
    want = [r.token_ids for r in LLM(model, tok, max_slots=2).generate(ids, sampling_params=params)]
    seen = []
    run = Speculator.run

    def sometimes_plain(self, core):  # iterations 2 and 4 decode plainly (as with a grammar in the batch), after
        if len(seen) in (1, 3):  # speculative windows: the draft state must then follow the plain tokens
            seen.append("plain")
            return False
        seen.append("spec" if run(self, core) else "none")
        return seen[-1] == "spec"

    Speculator.run = sometimes_plain
    try:
        got, metrics, (steps, drafted, accepted), _ = serve(bard, spec, [GenerationRequest(p, sp) for p, sp in
                                                                      zip(ids, params)], slots=2)
    finally:
        Speculator.run = run
    assert [t[0][0] for t in got] == want and seen[:3] == ["spec", "plain", "spec"], seen
    assert drafted > 0 and accepted >= drafted - 3 * 2  # (the last step's drafts run past max_tokens)

    pytest.importorskip("xgrammar")
    from fastxlstm.serving.grammar import Grammars
    from fastxlstm.serving.structured import GrammarSpec

    grammar = Grammars(tok, model.config.vocab_size).compile(GrammarSpec("choice", '["to be", "not to be"]'))
    reqs = [GenerationRequest(ids[0], params[0]),
            GenerationRequest(tok.encode("HAMLET:"), SamplingParams(max_new_tokens=20), grammar=grammar)]
    got, *_ = serve(bard, spec, reqs, slots=2)
    assert got[0][0][0] == want[0]
    assert tok.decode(got[1][0][0], skip_special_tokens=True) in ("to be", "not to be")


def test_ngram_without_drafts_runs_plain_windows(bard, monkeypatch):
    """When no running sequence has an n-gram draft, LLM and the server run plain decode windows (several steps
    per read), never a speculative step without drafts; the tokens stay those of plain decoding."""
    model, tok = bard
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 3, "prompt_lookup_max": 4}
    ids = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=60)  # (the repeats that trigram lookup finds come late)
    want = [r.token_ids for r in LLM(model, tok, max_slots=2).generate(ids, sampling_params=params)]
    llm = LLM(model, tok, max_slots=2, speculative_config=spec)
    eng, calls = llm.engine, {"spec": 0, "empty": 0, "decode": 0}
    spec_step, decode_step = eng.spec_step, eng.decode_step

    def counting_spec(drafts=None, slots=None):
        calls["spec"] += 1
        calls["empty"] += not any(drafts.values())
        return spec_step(drafts, slots)

    def counting_decode(*a, **kw):
        calls["decode"] += 1
        return decode_step(*a, **kw)

    monkeypatch.setattr(eng, "spec_step", counting_spec)
    monkeypatch.setattr(eng, "decode_step", counting_decode)
    out = llm.generate(ids, sampling_params=params)
    assert [r.token_ids for r in out] == want
    assert calls["spec"] > 0 and calls["empty"] == 0 and calls["decode"] > 0, calls
    assert sum(r.num_accepted_tokens for r in out) > 0

    windows = {"spec": 0, "empty": 0, "plain": 0}
    spec_window, decode_window = EngineSlotBackend.spec_window, EngineSlotBackend.decode_window

    def counting_spec_window(self, slots, steps, start, drafts=None):
        windows["spec"] += 1
        windows["empty"] += not any(drafts.values())
        return spec_window(self, slots, steps, start, drafts)

    def counting_decode_window(self, slots, steps, logprobs=False):
        windows["plain"] += steps > 1
        return decode_window(self, slots, steps, logprobs)

    monkeypatch.setattr(EngineSlotBackend, "spec_window", counting_spec_window)
    monkeypatch.setattr(EngineSlotBackend, "decode_window", counting_decode_window)
    got, *_ = serve(bard, spec, [GenerationRequest(p, params) for p in ids], slots=2)
    assert [t[0][0] for t in got] == want
    assert windows["spec"] > 0 and windows["empty"] == 0 and windows["plain"] > 0, windows


def test_turn_end_state_is_cached_exactly(bard):
    """A chat turn's end state goes to the prefix cache under speculation too: the engine stops the slot at
    ``max_tokens`` inside a step, so the state is that of the prompt and the reply (but its last token), as a
    prefill computes it (budgets that end inside accepted drafts among them)."""
    model, tok = bard
    ids = tok.encode(PROMPTS[2])  # (a prompt whose reply repeats itself: drafts accepted)
    budgets = range(8, 22)
    reqs = [GenerationRequest(ids, SamplingParams(max_new_tokens=n, ignore_eos=True), cache_generation_end=True)
            for n in budgets]
    got, metrics, _, sched = serve(bard, NGRAM, reqs, slots=4, prefix_cache_bytes=10**8)
    assert counter(metrics, "spec_accepted_tokens") > 0
    prefill = EngineSlotBackend(model, 1).prefill
    for n, (toks, *_) in zip(budgets, got):
        reply = toks[0]
        assert len(reply) == n
        hit = sched.cache.lookup(ids + reply[:-1], need_logits_at_end=False)
        assert hit is not None and hit.length == len(ids) + n - 1, n
        _, want = prefill(ids + reply[:-1], None)
        for la, lb in zip(hit.state, want):
            for x, y in zip(la, lb):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- over HTTP
def spec_metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics").text
    return {name: float(re.search(rf"^vllm:spec_decode_{name}_total (\S+)$", text, re.M).group(1))
            for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}


@pytest.mark.parametrize("which", ["ngram", "draft-self"])
def test_openai_client_stop_strings_max_tokens_and_metrics(bard, which):
    """Through the openai client: completions (plain, streamed, with a stop string that ends inside a draft) equal
    LLM.generate's text; ``/metrics`` has vLLM's spec_decode counters, equal to the engine's counts (and with
    the draft model, after the first request, to LLM's own counts of that request)."""
    model, tok = bard
    spec = spec_configs(model)[which]
    want = LLM(model, tok, max_slots=4).generate(PROMPTS[0], max_new_tokens=40)[0]
    stop = want.text[17:21]  # a stop string some tokens in
    want_stop = LLM(model, tok, max_slots=4).generate(PROMPTS[0], max_new_tokens=40, stop=[stop])[0]
    assert want_stop.text != want.text
    app = build_app(model, tok, ServeConfig(model_name="bard", max_slots=4, speculative_config=spec))
    backend = app.state.server.backend
    counts, release = [0, 0, 0], backend.release

    def counting_release(slot):
        for j, c in enumerate(backend.engine.spec_counts(slot)):
            counts[j] += c
        release(slot)

    backend.release = counting_release
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="bard", prompt=PROMPTS[0], max_tokens=40, temperature=0)
        assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
        if which != "ngram":
            own = LLM(model, tok, max_slots=1, speculative_config=spec).generate(PROMPTS[0], max_new_tokens=40)[0]
            assert spec_metrics(srv.base_url) == {"num_drafts": own.num_spec_steps, "num_draft_tokens":
                                                  own.num_draft_tokens, "num_accepted_tokens": own.num_accepted_tokens}
        r = client.completions.create(model="bard", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop])
        assert r.choices[0].text == want_stop.text and r.choices[0].finish_reason == "stop"
        s = client.completions.create(model="bard", prompt=PROMPTS[0], max_tokens=13, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in s) == \
            LLM(model, tok, max_slots=1).generate(PROMPTS[0], max_new_tokens=13)[0].text
        value = spec_metrics(srv.base_url)
    assert value["num_draft_tokens"] == counts[1] > 0 and value["num_accepted_tokens"] == counts[2] > 0
    assert 0 < value["num_drafts"] <= counts[0]


def other_tokenizer_dir(tmp_path: Path) -> Path:
    """The embedded model with two of its tokenizer's ids swapped (another vocabulary, the same sizes)."""
    d = tmp_path / "other-tok"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):  # (links: were the tokenizer check gone, the weights would
        (d / name).symlink_to(MODEL_DIR / name)  # not load either, and serve would fail rather than start)
    data = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    (a, i), (b, j) = list(vocab.items())[300:302]
    vocab[a], vocab[b] = j, i
    (d / "tokenizer.json").write_text(json.dumps(data))
    return d


@pytest.mark.parametrize("process", [False, True], ids=["in-process", "scheduler-process"])
def test_cli_serve_rejects_a_bad_speculative_config(tmp_path, process):
    """One-line startup errors (exit 1, no traceback) for a bad --speculative-config: missing or bad fields, an
    unknown method, k < 1, a draft directory that is not there or whose tokenizer differs from the target's."""
    from typer.testing import CliRunner

    from fastxlstm.cli import app

    cases = [('{"method": "ngram"}', "num_speculative_tokens"), ('{"method": "eagle", "num_speculative_tokens": 2}',
                                                                 "method must be one of"),
             ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be an integer"),
             ('{"method": "ngram", "num_speculative_tokens": 2, "k": 3}', "unknown keys"),
             ('{"method": "draft", "num_speculative_tokens": 2, "model": "/nonexistent/x"}', "nonexistent"),
             (json.dumps({"method": "draft", "num_speculative_tokens": 2, "model": str(other_tokenizer_dir(tmp_path))}),
              "different tokenizer")]
    for config, message in cases:
        res = CliRunner().invoke(app, ["serve", str(MODEL_DIR), "--device", "cpu", "--speculative-config", config]
                                 + ["--scheduler-process"] * process)
        assert res.exit_code == 1 and message in res.stderr and "Traceback" not in res.output, (config, res.output)


def test_scheduler_process_speculates(bard):
    """``--scheduler-process``: the worker loads the draft model from its directory and speculates; greedy text
    (plain and streamed) equals LLM's, the worker's ``/metrics`` counters equal LLM's own counts. An in-memory
    draft model is refused there (each worker loads its own)."""
    from fastxlstm.checkpoint import load
    from fastxlstm.serving.worker import WorkerSpec

    model, tok = bard
    spec = {"method": "draft", "num_speculative_tokens": 3, "model": str(MODEL_DIR)}
    with pytest.raises(ValueError, match="worker"):
        build_app(WorkerSpec(load, (str(MODEL_DIR),)), tok, ServeConfig(
            scheduler_process=True, speculative_config={**spec, "model": model}))
    own = LLM(model, tok, max_slots=2, speculative_config={**spec, "model": model}).generate(
        PROMPTS[:2], max_new_tokens=24)
    app = build_app(WorkerSpec(load, (str(MODEL_DIR),), {"weight_mode": "fused"}), tok,
                    ServeConfig(model_name="bard", max_slots=2, scheduler_process=True, speculative_config=spec))
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.completions.create(model="bard", prompt=PROMPTS[0], max_tokens=24, temperature=0)
        assert r.choices[0].text == own[0].text
        s = client.completions.create(model="bard", prompt=PROMPTS[1], max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in s) == own[1].text
        assert spec_metrics(srv.base_url) == {
            "num_drafts": sum(o.num_spec_steps for o in own), "num_draft_tokens": sum(o.num_draft_tokens for o in own),
            "num_accepted_tokens": sum(o.num_accepted_tokens for o in own)} and own[0].num_accepted_tokens > 0


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["ngram", "draft-self"])
def test_gpu_server_speculates_in_cuda_graphs(which):
    """On the GPU (float32, no TF32): the server's warm-up captures the speculative step's graphs, and its greedy
    completions through the openai client (plain and streamed) equal the server's without speculation; the
    counters show accepted drafts."""
    model, tok = load_model_and_tokenizer(MODEL_DIR, device="cuda", dtype=torch.float32, weight_mode="fused")
    spec = spec_configs(model)[which] if which == "ngram" else \
        {"method": "draft", "num_speculative_tokens": 3, "model": model}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    texts = []
    try:
        for config in (None, spec):
            app = build_app(model, tok, ServeConfig(model_name="bard", max_slots=4, speculative_config=config))
            with ServerThread(app) as srv:
                engine = app.state.server.backend.engine
                assert engine.use_cuda_graph and (config is None or any(key[2] for key in engine._graphs))
                client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
                got = [client.completions.create(model="bard", prompt=p, max_tokens=48, temperature=0).choices[0].text
                       for p in PROMPTS]
                s = client.completions.create(model="bard", prompt=PROMPTS[0], max_tokens=48, temperature=0,
                                              stream=True)
                got.append("".join(c.choices[0].text for c in s))
                texts.append(got)
                if config is not None:
                    assert spec_metrics(srv.base_url)["num_accepted_tokens"] > 0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert texts[0] == texts[1]
