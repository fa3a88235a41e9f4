"""Bucketed prefill graphs (``fastxlstm.engine.prefill_graph``): a prompt batch padded to its (batch,
length) bucket and run on static buffers computes what the plain chunked forward computes, row by row,
with or without a start state; buffers are reused across calls without leaking into results. On the CPU
the buckets run eagerly on the same static buffers (``capture=False``); the GPU test replays real graphs."""

from __future__ import annotations

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import LLM, Engine
from fastxlstm.engine.prefill_graph import PrefillGraphs
from fastxlstm.engine.runner import Runner

from .helpers import perturbed_model

CFG = XLSTMConfig(vocab_size=259, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused", chunk_size=16)
LENGTHS, BATCHES = (8, 16, 48), (1, 2, 4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _ids(b: int, s: int, seed: int) -> torch.Tensor:
    return torch.randint(3, CFG.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def _worst(a, b) -> float:
    (ha, sa), (hb, sb) = a, b
    worst = _rel(ha, hb)
    for la, lb in zip(sa, sb):
        for x, y in zip(la, lb):
            assert x.shape == y.shape
            worst = max(worst, _rel(x, y))
    return worst


@pytest.fixture(scope="module")
def runners():
    model = perturbed_model(CFG)
    plain = Runner(model, backend="reference", chunk_size=48)
    graphed = Runner(model, backend="reference", chunk_size=48)
    graphed.prefill_graphs = PrefillGraphs(graphed, LENGTHS, BATCHES, capture=False)
    return plain, graphed


@pytest.mark.parametrize("lengths", [[5], [8], [3, 16], [40, 9, 17], [30, 30, 30]])
@pytest.mark.parametrize("with_state", [False, True])
def test_bucketed_prefill_equals_plain_forward(runners, lengths, with_state):
    plain, graphed = runners
    b, s = len(lengths), max(lengths)
    ids = _ids(b, s, seed=s + b)
    start = None
    if with_state:
        start = plain.forward_tokens(_ids(b, 11, seed=99))[1]
    lens = lengths if min(lengths) < s else None
    want = plain.forward_tokens(ids, start, lens)
    got = graphed.forward_tokens(ids, start, lens)
    assert graphed.prefill_graphs.bucket(b, s) in graphed.prefill_graphs.captured
    assert _worst(got, want) < 1e-5  # float32: the padded positions only change summation order


def test_buffers_reused_without_leaks(runners):
    """A second call through the same bucket (fewer rows, shorter prompt) is unaffected by the first's
    leftovers in the static buffers, and does not overwrite what the first call returned."""
    plain, graphed = runners
    big = _ids(4, 48, seed=1)
    first = graphed.forward_tokens(big, None, [48, 47, 46, 45])
    kept = (first[0].clone(), [tuple(t.clone() for t in layer) for layer in first[1]])
    small = _ids(3, 33, seed=2)
    got = graphed.forward_tokens(small)
    assert _worst(got, plain.forward_tokens(small)) < 1e-5
    assert _worst(first, kept) == 0.0


def test_prompts_outside_the_buckets_take_the_chunked_path(runners):
    plain, graphed = runners
    before = list(graphed.prefill_graphs.captured)
    ids = _ids(5, 20, seed=3)  # batch 5 > 4
    assert _worst(graphed.forward_tokens(ids), plain.forward_tokens(ids)) < 1e-6
    long = _ids(1, 100, seed=4)  # 100 > one chunk of 48
    assert _worst(graphed.forward_tokens(long), plain.forward_tokens(long)) < 1e-6
    assert graphed.prefill_graphs.captured == before


def test_bucket_choice_and_errors():
    runner = Runner(perturbed_model(CFG), backend="reference", chunk_size=32)
    graphs = PrefillGraphs(runner, LENGTHS, BATCHES, capture=False)
    assert graphs.lengths == [8, 16]  # buckets longer than one prefill chunk are dropped
    assert graphs.bucket(1, 1) == (1, 8) and graphs.bucket(3, 9) == (4, 16)
    assert graphs.bucket(5, 8) is None and graphs.bucket(1, 17) is None
    with pytest.raises(ValueError, match="no prefill graph bucket"):
        graphs.capture(8, 8)
    with pytest.raises(ValueError, match="CUDA"):
        Engine(perturbed_model(CFG), max_slots=2, prefill_graphs=True)


def test_engine_greedy_generation_unchanged_by_buckets():
    prompts = [list(range(3, 40)), [9, 8, 7], list(range(50, 60))]
    plain = LLM(perturbed_model(CFG), max_slots=4, backend="reference")
    graphed = LLM(perturbed_model(CFG), max_slots=4, backend="reference")
    runner = graphed.engine.runner
    runner.prefill_graphs = PrefillGraphs(runner, LENGTHS, BATCHES, capture=False)
    want = plain.generate(prompts, max_new_tokens=12, ignore_eos=True)
    got = graphed.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert runner.prefill_graphs.captured  # the prompts went through the buckets
