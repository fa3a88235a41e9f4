"""The one sampler (``fastxlstm.sampling`` + the engine's ``SlotSampler``) against references written
here or by transformers: filters, their order, penalties, logit bias, logprobs, seeds."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fastxlstm.engine.sampler import SlotSampler
from fastxlstm.sampling import (
    MAX_LOGPROBS,
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    batch_mode,
    sample_rows,
    token_logprobs,
    uniform_from_seed,
)

V = 64


def hf_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """transformers' warpers in transformers' order (temperature, top-k, top-p, min-p), then softmax."""
    x = logits.clone()
    ids = torch.zeros(x.shape[0], 1, dtype=torch.long)
    x = TemperatureLogitsWarper(temperature)(ids, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(ids, x)
    if min_p:
        x = MinPLogitsWarper(min_p)(ids, x)
    return x.softmax(-1)


def sampler_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, n=1 << 16):
    """The distribution ``sample_rows`` draws from: inverse CDF over a fine uniform grid of u."""
    b = n
    row = lambda v, dt=torch.float32: torch.full((b,), v, dtype=dt)
    u = (torch.arange(b, dtype=torch.float32) + 0.5) / b
    toks = sample_rows(logits.expand(b, -1), row(temperature), row(top_k, torch.long), row(top_p), row(min_p), u)
    return torch.bincount(toks, minlength=logits.shape[-1]).float() / b


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.6), dict(min_p=0.2),
                                dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05),
                                dict(temperature=0.5, top_k=3, top_p=0.99), dict(top_p=0.5, min_p=0.3)])
def test_distribution_equals_transformers_warpers(kw):
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(len(str(kw)))) * 2
    want = hf_probs(logits, **kw)[0]
    got = sampler_probs(logits, **kw)
    assert not (got[want == 0] > 0).any() and (got[want > 1e-4] > 0).all()  # the same support
    assert (got - want).abs().max() < 2e-4  # and the same masses (grid resolution 1.5e-5)


def test_greedy_rows_and_sort_independence():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    t, k, p, mp = torch.tensor([0.0, 1.0, 0.0, 0.8]), torch.zeros(4, dtype=torch.long), torch.ones(4), torch.zeros(4)
    u = torch.rand(4, generator=torch.Generator().manual_seed(2))
    a = sample_rows(logits, t, k, p, mp, u, use_sort=False)
    assert torch.equal(a, sample_rows(logits, t, k, p, mp, u, use_sort=True))
    assert a[0] == logits[0].argmax() and a[2] == logits[2].argmax()


def test_penalties_equal_references():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, V, generator=g) * 3
    prompt = [[1, 2, 5], [7], []]
    out = [[5, 5, 9], [], [4, 4, 4, 8]]
    seen = torch.zeros(3, V, dtype=torch.bool)
    counts = torch.zeros(3, V)
    for r in range(3):
        seen[r, prompt[r] + out[r]] = True
        for t in out[r]:
            counts[r, t] += 1
    rep, pres, freq = torch.tensor([1.3, 1.0, 0.7]), torch.tensor([0.5, -1.0, 0.0]), torch.tensor([0.25, 0.0, 1.5])
    got = apply_penalties(logits, seen, counts, rep, pres, freq)
    for r in range(3):
        ids = torch.tensor([prompt[r] + out[r]]) if prompt[r] + out[r] else torch.zeros(1, 0, dtype=torch.long)
        want = RepetitionPenaltyLogitsProcessor(float(rep[r]))(ids, logits[r:r + 1].clone())[0]
        for t in set(out[r]):  # OpenAI: logit - count * frequency - (count > 0) * presence
            want[t] -= out[r].count(t) * freq[r] + pres[r]
        torch.testing.assert_close(got[r], want)


def test_logit_bias_and_logprobs():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[3, 10, 0, 0], [63, 0, 0, 0]])
    vals = torch.tensor([[5.0, -100.0, 0.0, 0.0], [2.5, 0.0, 0.0, 0.0]])
    want = logits.clone()
    want[0, 3] += 5
    want[0, 10] -= 100
    want[1, 63] += 2.5
    torch.testing.assert_close(apply_logit_bias(logits, ids, vals), want)
    tokens = torch.tensor([7, 63])
    chosen, top_v, top_i = token_logprobs(logits, tokens, k=5)
    ref = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(chosen.double(), ref[[0, 1], tokens], atol=1e-6, rtol=0)
    torch.testing.assert_close(top_v.double(), ref.topk(5, -1).values, atol=1e-6, rtol=0)
    assert torch.equal(top_i, ref.topk(5, -1).indices)


def test_params_validation():
    for bad in (dict(top_p=0.0), dict(temperature=-1), dict(stop=[""]), dict(min_p=2), dict(presence_penalty=3),
                dict(frequency_penalty=-2.5), dict(logprobs=MAX_LOGPROBS + 1), dict(logit_bias={1: float("nan")}),
                dict(repetition_penalty=0), dict(max_new_tokens=-1), dict(stop_token_ids=list(range(8)))):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="logit_bias token ids must be in"):
        SamplingParams(logit_bias={V: 1.0}).check_vocab(V)
    assert SamplingParams(stop="x").stop == ["x"]
    assert batch_mode([SamplingParams(), None]) == "greedy"
    assert batch_mode([SamplingParams(presence_penalty=0.5)]) == "sample"
    assert batch_mode([SamplingParams(temperature=1), SamplingParams(top_k=3, temperature=1, logprobs=0)]) == \
        "sorted+lp"


def test_uniform_is_uniform_and_seed_dependent():
    u = uniform_from_seed(torch.full((50000,), 7), torch.arange(50000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u, uniform_from_seed(torch.full((50000,), 8), torch.arange(50000)))
    big = uniform_from_seed(torch.tensor([2**62 + 5, 2**62 + 5]), torch.tensor([3, 3]))
    assert big[0] == big[1]


def reference_step(logits, p: SamplingParams, history: list[int], generated: list[int], seed: int, counter: int):
    """One token by the documented order, written out for one row with plain PyTorch."""
    x = logits.clone().double()
    for t in set(history + generated):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(generated):
        x[t] -= generated.count(t) * p.frequency_penalty + p.presence_penalty
    for t, b in p.logit_bias.items():
        x[t] += b
    if p.temperature == 0:
        return int(x.argmax())
    probs = hf_probs(x[None].float(), p.temperature, p.top_k, p.top_p, p.min_p)[0].double()
    u = float(uniform_from_seed(torch.tensor([seed]), torch.tensor([counter]))[0])
    cdf = probs.cumsum(0)
    return int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True)[0])


def test_slot_sampler_equals_reference_over_steps():
    """Mixed rows in one batch, several steps (the penalties see what was sampled): every token equals the
    reference's, and each row's stream does not depend on its batch-mates."""
    rows = [SamplingParams(temperature=0.9, top_k=12, seed=11),
            SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0, seed=12),
            SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05, frequency_penalty=1.0, seed=13,
                           logit_bias={5: 4.0, 6: -50.0}),
            SamplingParams(temperature=0.7, logprobs=3, seed=14)]
    hist = [[1, 2, 3], [4, 4], [9], []]
    g = torch.Generator().manual_seed(5)
    steps = [torch.randn(4, V, generator=g) * 2 for _ in range(6)]
    s = SlotSampler(4, V, torch.device("cpu"), history=16)
    for j, p in enumerate(rows):
        s.configure(j, p, hist[j])
    act = torch.ones(4, dtype=torch.bool)
    mode = s.mode(range(4))
    assert mode == "sorted+lp"
    gen = [[] for _ in rows]
    for t, logits in enumerate(steps):
        got = s.advance(slice(0, 4), logits, mode, act).tolist()
        for j, p in enumerate(rows):
            assert got[j] == reference_step(logits[j], p, hist[j], gen[j], p.seed, t), (t, j)
            gen[j].append(got[j])
    reads = s.read([0, 3])
    assert [r.new_tokens for r in reads] == [gen[0], gen[3]]
    lsm = [torch.log_softmax(x[3], -1) for x in steps]
    assert reads[0].logprobs is None and reads[1].logprobs == pytest.approx(
        [float(lsm[t][gen[3][t]]) for t in range(6)], abs=1e-6)
    assert [[i for i, _ in top] for top in reads[1].top_logprobs] == [lsm[t].topk(3).indices.tolist()
                                                                       for t in range(6)]
    # row 2 alone (index path, a batch of one) draws the same stream
    s2 = SlotSampler(2, V, torch.device("cpu"), history=16)
    s2.configure(1, rows[2], hist[2])
    one = torch.tensor([1])
    alone = [int(s2.advance(one, x[2:3], s2.mode([1]), act[:1])[0]) for x in steps]
    assert alone == gen[2]


def test_grammar_bitmask_in_the_slot_sampler():
    """Rows under a grammar's bitmask (structured output) sample what the reference samples from the logits
    with the disallowed tokens at -inf, only allowed tokens, with the model's own logprobs; the unpacking
    equals xgrammar's; rows without a mask in the same batch are unaffected; configure clears a mask."""
    xgr = pytest.importorskip("xgrammar")
    from fastxlstm.sampling import apply_token_mask

    g = torch.Generator().manual_seed(9)
    allowed = torch.rand(4, V, generator=g) < 0.3
    allowed[:, 7] = True
    words = torch.zeros(4, (V + 31) // 32, dtype=torch.int64)
    for t in range(V):
        words[:, t // 32] |= allowed[:, t].long() << (t % 32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement int32 words
    logits = torch.randn(4, V, generator=g)
    ref = logits.clone()
    xgr.apply_token_bitmask_inplace(ref, words)
    vocab = torch.arange(V)
    assert torch.equal(apply_token_mask(logits, words, vocab // 32, (vocab % 32).to(torch.int32)), ref)

    rows = [SamplingParams(temperature=0.9, top_k=12, seed=21), SamplingParams(temperature=0.0, seed=22),
            SamplingParams(temperature=1.1, top_p=0.9, repetition_penalty=1.3, logprobs=2, seed=23),
            SamplingParams(temperature=1.0, seed=24)]
    s = SlotSampler(4, V, torch.device("cpu"), history=16)
    for j, p in enumerate(rows):
        s.configure(j, p)
    s.set_masks([0, 1, 2], words[:3])  # row 3 follows no grammar
    mode = s.mode(range(4))
    assert mode == "sorted+gm+lp" and s.mode([3]) == "sample"
    act = torch.ones(4, dtype=torch.bool)
    steps = [torch.randn(4, V, generator=g) * 3 for _ in range(5)]
    gen = [[] for _ in rows]
    for t, x in enumerate(steps):
        got = s.advance(slice(0, 4), x, mode, act).tolist()
        for j, p in enumerate(rows):
            xm = x[j].masked_fill(~allowed[j], float("-inf")) if j < 3 else x[j]
            assert got[j] == reference_step(xm, p, [], gen[j], p.seed, t), (t, j)
            assert j == 3 or allowed[j, got[j]]
            gen[j].append(got[j])
    (read,) = s.read([2])
    assert read.logprobs == pytest.approx([float(torch.log_softmax(x[2], -1)[gen[2][t]]) for t, x in
                                           enumerate(steps)], abs=1e-6)
    s.configure(0, rows[0])
    assert s.mode([0]) == "sorted" and bool((s.allow[0] == -1).all())
