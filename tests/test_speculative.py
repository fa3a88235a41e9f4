"""Speculative decoding (engine/speculative.py, Engine.spec_step, LLM(speculative_config=...)) on the CPU:
the state commit against step-by-step float64, greedy output token-for-token equal to plain greedy with both
drafters, the state after a run, seeded sampling equal to the plain path and a chi-square test of the sampled
distribution against the target's exact one."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastxlstm.checkpoint import load_model_and_tokenizer
from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import LLM
from fastxlstm.engine.speculative import NgramIndex, SpeculativeConfig
from fastxlstm.ops import mlstm_commit_
from fastxlstm.ops.reference import mlstm_step_reference
from fastxlstm.sampling import SamplingParams

from .helpers import perturbed_model

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "xlstm-shakespeare-10m"
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


# ---------------------------------------------------------------------------------------------- the commit op
def test_commit_equals_steps_float64():
    """Applying the first ``lengths[b]`` tokens' terms in closed form equals ``lengths[b]`` mlstm_step calls."""
    g = torch.Generator().manual_seed(0)
    b, nh, t, dqk, dv = 5, 3, 6, 8, 4
    k = torch.randn(b, nh, t, dqk, generator=g, dtype=torch.float64)
    v = torch.randn(b, nh, t, dv, generator=g, dtype=torch.float64)
    i = torch.randn(b, nh, t, generator=g, dtype=torch.float64) * 3
    f = torch.randn(b, nh, t, generator=g, dtype=torch.float64) * 3 + 2
    c0 = torch.randn(b, nh, dqk, dv, generator=g, dtype=torch.float64)
    n0 = torch.randn(b, nh, dqk, generator=g, dtype=torch.float64)
    m0 = torch.randn(b, nh, generator=g, dtype=torch.float64)
    lengths = torch.tensor([0, 1, 3, 6, 2])
    state = (c0.clone(), n0.clone(), m0.clone())
    mlstm_commit_(state, k, v, i, f, lengths)
    q = torch.zeros(b, nh, dqk, dtype=torch.float64)
    for row, n_tok in enumerate(lengths.tolist()):
        st = (c0[row:row + 1], n0[row:row + 1], m0[row:row + 1])
        for s in range(n_tok):
            sl = slice(row, row + 1)
            _, st = mlstm_step_reference(q[sl], k[sl, :, s], v[sl, :, s], i[sl, :, s], f[sl, :, s], st)
        for got, want in zip(state, st):
            torch.testing.assert_close(got[row:row + 1], want, rtol=1e-12, atol=1e-12)


def test_commit_rejects_bad_shapes():
    st = (torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="lengths"):
        mlstm_commit_(st, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3),
                      torch.zeros(1, 2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="state C"):
        mlstm_commit_(st, torch.zeros(1, 2, 3, 5), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3),
                      torch.zeros(1, 2, 3), torch.zeros(1, dtype=torch.long))


# ------------------------------------------------------------------------------------------- config, n-grams
def test_config_parse_and_errors():
    cfg = SpeculativeConfig.parse('{"method": "draft_model", "num_speculative_tokens": 3, "model": "random:x"}')
    assert cfg.method == "draft" and cfg.num_speculative_tokens == 3
    for bad, match in (({"method": "eagle", "num_speculative_tokens": 2}, "method"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
                         "prompt_lookup_max": 2}, "prompt_lookup"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "unknown keys"),
                       ({"method": "draft", "num_speculative_tokens": 2}, "needs 'model'"),
                       ("{not json", "JSON")):
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.parse(bad)


def test_ngram_index_proposes_the_latest_longest_match():
    idx = NgramIndex(1, 3)
    idx.extend([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3])
    assert idx.propose(3) == [7, 5, 2]  # "2 3" last seen before 7 (the 3-gram "5 2 3" never occurred)
    idx.extend([7])
    assert idx.propose(2) == [5, 2]  # "2 3 7" seen once
    assert NgramIndex(2, 2).propose(4) == []
    short = NgramIndex(1, 2)
    short.extend([4, 4])
    assert short.propose(5) == [4]


# ------------------------------------------------------------------------------------------ greedy equality
@pytest.fixture(scope="module")
def shakespeare():
    model, tok = load_model_and_tokenizer(MODEL_DIR, device="cpu", dtype=torch.float32, weight_mode="fused")
    return model, tok


PROMPTS = ["ROMEO: To be or not to be, to be or not to be, to be or", "JULIET:\nO Romeo, Romeo", "KING",
           "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\nFirst Citizen:\n"]


def _draft_configs(model):
    tiny = perturbed_model(XLSTMConfig(vocab_size=model.config.vocab_size, embedding_dim=32, num_blocks=1,
                                       num_heads=2, weight_mode="fused"))
    return [NGRAM, {"method": "draft", "num_speculative_tokens": 3, "model": model},  # the target drafting
            {"method": "draft", "num_speculative_tokens": 2, "model": tiny}]  # drafts mostly rejected


@pytest.mark.parametrize("which", [0, 1, 2], ids=["ngram", "draft-self", "draft-tiny"])
def test_greedy_equals_plain_greedy(shakespeare, which):
    """Mixed-length batch (more prompts than slots), prompts with and without repetition, a stop string,
    max_new_tokens that end inside a draft: the same tokens and text as plain greedy."""
    model, tok = shakespeare
    spec_cfg = _draft_configs(model)[which]
    params = [SamplingParams(max_new_tokens=n, stop=stop) for n, stop in ((29, []), (17, ["Romeo"]), (23, []),
                                                                           (31, ["\n\n"]))]
    plain = LLM(model, tok, max_slots=3).generate(PROMPTS, sampling_params=params)
    llm = LLM(model, tok, max_slots=3, speculative_config=spec_cfg)
    spec = llm.generate(PROMPTS, sampling_params=params)
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
    assert sum(r.num_draft_tokens for r in spec) > 0
    accepted = sum(r.num_accepted_tokens for r in spec)
    steps = sum(r.num_spec_steps for r in spec)
    if which < 2:  # (the random tiny draft model's drafts are rejected: the reject path)
        assert accepted > 0 and steps < sum(len(r.token_ids) for r in spec)  # fewer steps than tokens
    if which == 1:  # the target drafting for itself: every draft is accepted
        assert all(r.num_accepted_tokens >= r.num_draft_tokens - 3 for r in spec)


@pytest.mark.parametrize("which", [0, 1], ids=["ngram", "draft-self"])
def test_state_after_speculative_run_equals_plain(shakespeare, which):
    """The committed state (and the pending token, RNG position) after a run equal the plain run's: both within
    float32 rounding of the float64 state after the same tokens (|C| reaches ~25 here)."""
    model, tok = shakespeare
    spec_cfg = _draft_configs(model)[which]
    kw = dict(max_new_tokens=21, return_state=True)
    prompts = PROMPTS[:2]
    plain = LLM(model, tok, max_slots=2).generate(prompts, **kw)
    spec = LLM(model, tok, max_slots=2, speculative_config=spec_cfg).generate(prompts, **kw)
    model64 = copy.deepcopy(model).double()
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids
        assert (a.state.token_ids, a.state.pending_token, a.state.rng_counter) == \
               (b.state.token_ids, b.state.pending_token, b.state.rng_counter)
        with torch.no_grad():
            _, exact = model64(torch.tensor([a.state.token_ids[:-1]]))
        for la, lb, l64 in zip(a.state.layers, b.state.layers, exact):
            for x, y, z in zip(la, lb, l64):
                torch.testing.assert_close(y, x, rtol=1e-4, atol=5e-5)
                torch.testing.assert_close(y.double(), z, rtol=1e-4, atol=5e-5)
    # continuing the speculative state gives the plain continuation
    more = LLM(model, tok, max_slots=2, speculative_config=spec_cfg).generate(spec[0].state, max_new_tokens=9)
    ref = LLM(model, tok, max_slots=2).generate(plain[0].state, max_new_tokens=9)
    assert more[0].token_ids == ref[0].token_ids


# ------------------------------------------------------------------------------------------------- sampling
TINY = XLSTMConfig(vocab_size=5, embedding_dim=32, num_blocks=2, num_heads=2, weight_mode="fused", chunk_size=8)


def _tiny_model():
    return perturbed_model(TINY, seed=3, scale=0.3)  # a spread-out next-token distribution over 5 tokens


def test_seeded_sampling_equals_plain_sampling(shakespeare):
    """Seeded sampled requests (temperature, top-k/p, penalties, bias) give the plain path's exact tokens:
    each position is sampled from the target with the plain path's RNG stream."""
    model, tok = shakespeare
    params = [SamplingParams(max_new_tokens=24, temperature=0.8, seed=s, top_k=40 if s % 2 else 0,
                             top_p=0.9 if s % 3 == 0 else 1.0, repetition_penalty=1.2 if s < 2 else 1.0,
                             frequency_penalty=0.5 if s == 3 else 0.0, logit_bias={11: 2.0} if s == 1 else {})
              for s in range(4)]
    prompts = [PROMPTS[0]] * 2 + PROMPTS[1:3]
    plain = LLM(model, tok, max_slots=4).generate(prompts, sampling_params=params)
    for cfg in _draft_configs(model)[:2]:
        spec = LLM(model, tok, max_slots=4, speculative_config=cfg).generate(prompts, sampling_params=params)
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        assert sum(r.num_accepted_tokens for r in spec) > 0


def _exact_distribution(model, prompt: list[int], n: int, penalty: float, temperature: float) -> dict:
    """Probability of every n-token continuation under the target (float64, the documented sampler rules:
    repetition penalty over prompt + output, then temperature)."""
    probs = {}
    for seq in itertools.product(range(TINY.vocab_size), repeat=n):
        ids = torch.tensor([prompt + list(seq)])
        with torch.no_grad():
            logits, _ = model(ids)
        p_seq = 1.0
        for t in range(n):
            x = logits[0, len(prompt) - 1 + t].double()
            seen = set(prompt) | set(seq[:t])
            for tok_id in seen:
                x[tok_id] = x[tok_id] / penalty if x[tok_id] > 0 else x[tok_id] * penalty
            p_seq *= float(torch.softmax(x / temperature, -1)[seq[t]])
        probs[seq] = p_seq
    return probs


def test_sampled_distribution_chi_square():
    """Many seeds, a 5-token vocabulary, 3 new tokens (the 2nd and 3rd come from speculative steps whose
    drafts are accepted or rejected): the joint distribution of the output passes a chi-square test against
    the target's exact distribution (with penalties, which must see the tokens accepted earlier in a step)."""
    model = _tiny_model()
    prompt, n, penalty, temp = [0, 1, 2, 0, 1, 2, 0, 1], 3, 1.3, 0.9
    exact = _exact_distribution(model, prompt, n, penalty, temp)
    draws = 3000
    params = [SamplingParams(max_new_tokens=n, temperature=temp, repetition_penalty=penalty, seed=s,
                             ignore_eos=True) for s in range(draws)]
    llm = LLM(model, None, max_slots=128, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                              "prompt_lookup_max": 2})
    out = llm.generate([prompt] * draws, sampling_params=params)
    accepted = sum(r.num_accepted_tokens for r in out)
    assert accepted > draws // 10, accepted  # the speculative path was exercised
    counts: dict = {}
    for r in out:
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    # cells with a small expected count are pooled so the chi-square approximation holds
    big = [s for s, p in exact.items() if p * draws >= 5]
    obs = [counts.get(s, 0) for s in big] + [draws - sum(counts.get(s, 0) for s in big)]
    exp = [exact[s] * draws for s in big] + [draws * (1 - sum(exact[s] for s in big))]
    assert math.isclose(sum(exp), draws)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    pvalue = float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64),
                                           torch.tensor(stat / 2, dtype=torch.float64)))  # chi-square sf
    assert pvalue > 1e-3, (stat, pvalue, len(big))


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_generate_with_speculative_config():
    from typer.testing import CliRunner

    from fastxlstm.cli import app

    runner = CliRunner()
    base = ["generate", "--model", str(MODEL_DIR), "--prompt", PROMPTS[0], "--max-new-tokens", "14", "--device", "cpu"]
    plain = runner.invoke(app, base)
    assert plain.exit_code == 0, plain.output
    for cfg in ({"method": "ngram", "num_speculative_tokens": 3},
                {"method": "draft", "num_speculative_tokens": 2, "model": str(MODEL_DIR)}):
        cfg = json.dumps(cfg)
        spec = runner.invoke(app, [*base, "--speculative-config", cfg])
        assert spec.exit_code == 0, spec.output
        assert spec.stdout == plain.stdout and "drafted tokens accepted" in spec.stderr
    bad = runner.invoke(app, [*base, "--speculative-config", '{"method": "ngram"}'])
    assert bad.exit_code == 1 and "num_speculative_tokens" in bad.stderr and "Traceback" not in bad.output


# ------------------------------------------------------------------------------- Triton (CPU interpreter)
def test_triton_commit_and_speculative_engine_in_interpreter():
    """The Triton commit (float32 and bf16 ``C``, strided k/v views of a projection, idle rows, full rows) equals
    the reference commit; an engine on the Triton backend (chunkwise verification, Triton commit) gives plain
    greedy's tokens with the n-gram drafter."""
    code = r"""
import torch
from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import LLM
from fastxlstm.ops import mlstm_commit_
from fastxlstm.ops.reference import mlstm_commit_reference_
from fastxlstm.ops.triton import mlstm_commit_ as triton_commit
from tests.helpers import perturbed_model
g = torch.Generator().manual_seed(0)
for b, nh, t, dqk, dv, cdt in ((3, 2, 5, 16, 48, torch.float32), (2, 3, 3, 8, 32, torch.bfloat16)):
    proj = torch.randn(b, t, nh * (dqk + dv) + 7, generator=g)
    k = proj[..., :nh * dqk].view(b, t, nh, dqk).transpose(1, 2)
    v = proj[..., nh * dqk:nh * (dqk + dv)].view(b, t, nh, dv).transpose(1, 2)
    i, f = torch.randn(b, nh, t, generator=g) * 3, torch.randn(b, nh, t, generator=g) * 3 + 2
    st = (torch.randn(b, nh, dqk, dv, generator=g).to(cdt), torch.randn(b, nh, dqk, generator=g),
          torch.randn(b, nh, generator=g))
    lengths = torch.tensor([0, t, 2][:b])
    ref, got = [tuple(x.clone() for x in st) for _ in range(2)]
    mlstm_commit_reference_(ref, k, v, i, f, lengths)
    triton_commit(got, k, v, i, f, lengths)
    for x, y in zip(got, ref):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-2 if cdt == torch.bfloat16 else 1e-5, atol=1e-4)
    assert torch.equal(got[0][0], st[0][0]) and torch.equal(got[1][0], st[1][0])  # an idle row is untouched
cfg = XLSTMConfig(vocab_size=64, embedding_dim=32, num_blocks=1, num_heads=2, weight_mode="fused", chunk_size=16)
prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11]]
want = [r.token_ids for r in LLM(perturbed_model(cfg), None, max_slots=2).generate(prompts, max_new_tokens=7)]
llm = LLM(perturbed_model(cfg), None, max_slots=2, backend="triton",
          speculative_config={"method": "ngram", "num_speculative_tokens": 3})
assert llm.engine.runner.step_name == "triton"
out = llm.generate(prompts, max_new_tokens=7)
assert [r.token_ids for r in out] == want, ([r.token_ids for r in out], want)
print("ok", sum(r.num_accepted_tokens for r in out))
"""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_gpu_speculative_greedy_equals_plain_in_cuda_graphs(method):
    """On the GPU (float32 weights: the verification and the decode step then agree to rounding): CUDA-graph
    speculative steps (Triton chunkwise verification, Triton commit) give plain greedy's tokens and state.
    The embedded (trained) model on the repetitive prompts: its greedy text repeats, so prompt lookup finds
    drafts that are accepted (a random model's output does not repeat within 40 tokens: nothing to find)."""
    model, tok = load_model_and_tokenizer(MODEL_DIR, device="cuda", dtype=torch.float32, weight_mode="fused")
    spec = dict(NGRAM) if method == "ngram" else {"method": "draft", "num_speculative_tokens": 3, "model": model}
    kw = dict(max_new_tokens=40, return_state=True, ignore_eos=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 matmuls in both paths
    try:
        plain = LLM(model, tok, max_slots=4).generate(PROMPTS, **kw)
        llm = LLM(model, tok, max_slots=4, speculative_config=spec)
        assert llm.engine.use_cuda_graph
        out = llm.generate(PROMPTS, **kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert [r.token_ids for r in out] == [r.token_ids for r in plain]
    assert sum(r.num_draft_tokens for r in out) > 0
    accepted = sum(r.num_accepted_tokens for r in out)
    assert accepted > 0 and sum(r.num_spec_steps for r in out) < sum(len(r.token_ids) for r in out)
    for a, b in zip(plain, out):
        for la, lb in zip(a.state.layers, b.state.layers):
            for x, y in zip(la, lb):
                torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-4)
