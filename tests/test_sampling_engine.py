"""The engine's batched sampler: filters equal v0's, the distribution is right, seeds reproduce."""

from __future__ import annotations

import pytest
import torch

from fastxlstm.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    sample,
    sample_rows,
    uniform_from_seed,
)


def _rows(b, **kw):
    d = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    d.update(kw)
    return (torch.full((b,), float(d["temperature"])), torch.full((b,), int(d["top_k"]), dtype=torch.long),
            torch.full((b,), float(d["top_p"])), torch.full((b,), float(d["min_p"])))


def _support(logits, **kw) -> set[int]:
    """Tokens the sampler can return: sweep u over [0, 1)."""
    b = 2048
    t, k, p, mp = _rows(b, **kw)
    u = (torch.arange(b, dtype=torch.float32) + 0.5) / b
    toks = sample_rows(logits.expand(b, -1), t, k, p, mp, u, use_sort=True)
    return set(toks.tolist())


@pytest.mark.parametrize("top_k,top_p", [(20, 1.0), (5, 1.0), (0, 0.6), (8, 0.5), (3, 0.99)])
def test_filters_match_v0(top_k, top_p):
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(1, 64, generator=g)
    want = set(torch.nonzero(filter_logits(logits, top_k, top_p)[0] > float("-inf")).flatten().tolist())
    assert _support(logits, top_k=top_k, top_p=top_p) == want


def test_min_p_keeps_tokens_above_fraction_of_max():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert _support(logits, min_p=0.25) == {0, 1, 2}  # 0.1 < 0.25 * 0.5


def test_distribution_matches_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 12)
    n = 60000
    t, k, p, mp = _rows(n, temperature=0.7)
    u = uniform_from_seed(torch.full((n,), 1234), torch.arange(n))
    toks = sample_rows(logits.expand(n, -1), t, k, p, mp, u, use_sort=False)
    freq = torch.bincount(toks, minlength=12).float() / n
    probs = (logits[0] / 0.7).softmax(-1)
    assert (freq - probs).abs().max() < 0.01


def test_uniform_is_uniform_and_seed_dependent():
    u = uniform_from_seed(torch.full((50000,), 7), torch.arange(50000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    v = uniform_from_seed(torch.full((50000,), 8), torch.arange(50000))
    assert not torch.equal(u, v)
    big = uniform_from_seed(torch.tensor([2**62 + 5, 2**62 + 5]), torch.tensor([3, 3]))
    assert big[0] == big[1]


def test_greedy_rows_and_sort_independence():
    torch.manual_seed(1)
    logits = torch.randn(4, 100)
    t = torch.tensor([0.0, 1.0, 0.0, 0.8])
    k = torch.zeros(4, dtype=torch.long)
    p = torch.ones(4)
    mp = torch.zeros(4)
    u = torch.rand(4)
    a = sample_rows(logits, t, k, p, mp, u, use_sort=False)
    b = sample_rows(logits, t, k, p, mp, u, use_sort=True)
    assert torch.equal(a, b)
    assert a[0] == logits[0].argmax() and a[2] == logits[2].argmax()


def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, torch.tensor([1.0])), logits)


def test_params_validation_and_v0_sample_unchanged():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(stop=[""])
    assert SamplingParams(stop="x").stop == ["x"]
    logits = torch.tensor([[0.1, 3.0, 0.2]])
    assert sample(logits).tolist() == [1]
