"""The server over the engine's bucketed prefill graphs: start-up captures every bucket the scheduler can
use, so that no request meets a capture; the scheduler's prefill groups fit the buckets (rows, budget
counted as the padded bucket) and stay exact; first tokens of greedy requests are read behind the next
decode window, not waited for. On the CPU the buckets run eagerly on their static buffers
(``PrefillGraphs(capture=False)``), which exercises the same padding and bucket logic."""

from __future__ import annotations

from collections import Counter

import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine.backend import EngineSlotBackend
from fastxlstm.engine.prefill_graph import PrefillGraphs
from fastxlstm.sampling import SamplingParams
from fastxlstm.serving.prefix_cache import PrefixCache
from fastxlstm.serving.requests import GenerationRequest
from fastxlstm.serving.scheduler import Scheduler
from fastxlstm.serving.slots import warm_prefill

from .helpers import greedy_reference as generate
from .helpers import perturbed_model
from .test_serving_batching import close_states, prompts, tokens_and_finish
from .test_serving_units import run_requests

CFG = XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused", chunk_size=16)
LENGTHS, BATCHES = (8, 16, 32, 48, 64), (1, 2, 4)


def graphed_backend(model, slots: int) -> EngineSlotBackend:
    be = EngineSlotBackend(model, max_slots=slots)
    runner = be.engine.runner
    runner.prefill_graphs = PrefillGraphs(runner, LENGTHS, BATCHES, capture=False)
    return be


def test_backend_buckets_cost_and_capture():
    be = graphed_backend(perturbed_model(CFG), 2)
    assert be.prefill_max_batch == 4
    assert be.prefill_cost(1, 5) == 8 and be.prefill_cost(3, 17) == 4 * 32 and be.prefill_cost(1, 64) == 64
    assert be.prefill_cost(5, 10) == 50 and be.prefill_cost(1, 100) == 100  # no bucket: what it is
    keys = be.prefill_buckets(64)
    # one prompt (or piece) of up to 64 tokens; groups whose padded bucket costs at most 64
    assert keys == [(1, 8), (1, 16), (1, 32), (1, 48), (1, 64), (2, 8), (2, 16), (2, 32), (4, 8), (4, 16)]
    assert be.prefill_buckets(40) == [(1, 8), (1, 16), (1, 32), (1, 48), (2, 8), (2, 16), (4, 8)]
    assert warm_prefill(be, 64, force=True) == len(keys)  # every length is graphed: no eager warm-up runs
    assert be.engine.runner.prefill_graphs.captured == keys
    assert EngineSlotBackend(perturbed_model(CFG), max_slots=1).prefill_max_batch is None  # CPU: no graphs


def test_failed_capture_falls_back_to_eager_prefill():
    """A prefill-graph capture that fails at start-up leaves the backend prefilling eagerly, not down."""
    model = perturbed_model(CFG)
    be = graphed_backend(model, 2)

    def broken(b: int, n: int) -> None:
        raise RuntimeError("capture failed")

    be.engine.runner.prefill_graphs.capture = broken
    assert be.capture_prefill_graphs(64) == []
    assert be.engine.runner.prefill_graphs is None and be.prefill_max_batch is None
    assert be.prefill_cost(2, 10) == 20  # no buckets: what it is
    p = prompts([9], seed=3)[0]
    logits, _ = be.prefill(p, None)
    want = model(torch.tensor([p]))[0][0, -1]
    assert ((logits - want).norm() / want.norm()).item() < 1e-5


def test_scheduler_meets_only_captured_buckets_and_stays_exact():
    """A wave of mixed-length prompts (some longer than the budget: prefilled in pieces) through the
    scheduler after the start-up capture: no new bucket is captured, every forward holds at most the
    largest graph batch, each iteration's prefills cost at most the budget, tokens equal generate(), cached
    states are exact."""
    model = perturbed_model(CFG)
    be = graphed_backend(model, 12)
    budget = 64
    keys = be.capture_prefill_graphs(budget)
    graphs = be.engine.runner.prefill_graphs
    calls, spent = [], []  # spent: the device cost of each scheduler iteration's prefills

    def record(lens: list[int]) -> None:
        calls.append(lens)
        spent[-1] += be.prefill_cost(len(lens), max(lens))

    orig_batch, orig_one = be.prefill_batch, be.prefill
    be.prefill_batch = lambda t, s: (record([len(x) for x in t]), orig_batch(t, s))[1]
    be.prefill = lambda t, s: (record([len(t)]), orig_one(t, s))[1]
    cache = PrefixCache(10**8)
    sched = Scheduler(be, eos_token_id=None, cache=cache, decode_steps_per_read=4, prefill_chunk=budget)
    orig_phase = sched._prefill
    sched._prefill = lambda: (spent.append(0), orig_phase())[1]
    lengths = [20, 22, 9, 10, 11, 40, 3, 21, 60, 12, 1, 150]
    ps = prompts(lengths, seed=11)
    ref = [generate(model, p, 6)[0].tolist() for p in ps]
    sched.start()
    try:
        reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True,
                                                    logprobs=0 if i % 2 else None)) for i, p in enumerate(ps)]
        events = run_requests(sched, reqs)
        for i, r in enumerate(reqs):
            assert tokens_and_finish(events[r.id]) == (ref[i], "length"), i
        assert sched.stats()["slots_free"] == 12
    finally:
        sched.shutdown()
    assert graphs.captured == keys  # nothing was captured inside a request
    assert any(len(c) > 1 for c in calls) and any(len(set(c)) > 1 for c in calls), calls
    for c in calls:
        assert len(c) <= 4 and be.prefill_cost(len(c), max(c)) <= budget, c
    assert max(spent) <= budget, spent  # the budget holds per iteration (pieces cut to what is left of it)
    assert [64] in calls  # the 150-token prompt went in pieces of the whole budget
    rows = Counter(n for c in calls for n in c)
    assert all(rows[n] >= k for n, k in Counter(n for n in lengths if n <= budget).items()), rows  # never split
    for p in ps:
        _, fresh = model(torch.tensor([p]))
        assert close_states(cache.lookup(p, need_logits_at_end=False, count=False).state, fresh, tol=1e-4), len(p)


def test_first_tokens_are_not_waited_for():
    """A request's first token, greedy or sampled, is sampled on the device from the prefill logits and read
    behind the next window (no host sampling, no wait): every first-token block is read while a decode window
    launched after it is in flight; tokens equal the reference (greedy) and LLM.generate (seeded)."""
    from fastxlstm.engine import LLM

    model = perturbed_model(CFG)
    be = EngineSlotBackend(model, max_slots=4)
    sched = Scheduler(be, eos_token_id=None, decode_steps_per_read=4)
    behind = []
    orig = sched._finish_window
    sched._finish_window = lambda w: (behind.append(any(x.phase == "decode" for x in sched.inflight.unread))
                                      if w.phase == "prefill" else None, orig(w))[1]
    ps = prompts([7, 7, 12], seed=12)
    sched.start()
    try:
        reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
                for p, n in zip(ps, (2, 9, 5))]
        events = run_requests(sched, reqs)
        for p, r in zip(ps, reqs):
            assert tokens_and_finish(events[r.id])[0] == generate(model, p, r.params.max_new_tokens)[0].tolist()
        assert behind and all(behind) and sched.steps == 8 and not sched.inflight
        behind.clear()
        sp = SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9, seed=1, ignore_eos=True)
        sampled = GenerationRequest(ps[0], sp)
        toks = tokens_and_finish(run_requests(sched, [sampled])[sampled.id])[0]
        assert behind == [True]
        assert toks == LLM(model).generate(ps[0], sampling_params=sp)[0].token_ids
    finally:
        sched.shutdown()
def test_bucket_plan_with_graph_costs():
    """The plan against a backend with graph buckets: at most ``prefill_max_batch`` rows, the padded
    bucket's cost within the budget and within the ratio x the prompts' costs alone, the first-come request
    in its group, the cheapest and tightest run of its size; groups fill whole batch buckets when the ratio
    allows no padded rows; a long prompt's piece is the longest whose (bucket) cost fits what is left of
    the budget."""
    class Stub:
        max_slots, vocab_size, device = 64, 10, torch.device("cpu")
        prefill_padded, prefill_max_batch = True, 8
        lengths, batches = (16, 32, 64, 128, 192, 256, 384, 512), (1, 2, 4, 8)

        def prefill_cost(self, b, n):
            bb = next((x for x in self.batches if x >= b), None)
            bl = next((x for x in self.lengths if x >= n), None)
            return bb * bl if bb and bl else b * n

        def prefill_batch(self, tokens, states):
            raise AssertionError("not called")

    stub = Stub()
    g = torch.Generator().manual_seed(1)
    reqs = [GenerationRequest([1] * n, SamplingParams(max_new_tokens=1))
            for n in torch.randint(1, 300, (48,), generator=g).tolist()]
    for ratio in (1.0, 1.3):
        sched = Scheduler(stub, eos_token_id=None, prefill_chunk=2048, prefill_pad_ratio=ratio)
        sched.prefilling = reqs
        sizes = set()
        for budget in (2048, 700, 100):
            for head in reqs[:16]:
                group = sched.plan.bucket(head, sched.prefilling, budget, set())
                lens = [len(r.prompt) for r in group]
                cost = stub.prefill_cost(len(group), max(lens))
                assert head in group and len(group) <= 8
                assert len(group) == 1 or cost <= budget
                assert len(group) == 1 or cost <= ratio * sum(stub.prefill_cost(1, n) for n in lens) + 1e-9
                sizes.add(len(group))
        assert sizes - {1} and (ratio > 1 or sizes <= {1, 2, 4, 8}), sizes
    # of the runs of one size that may share a forward, the cheapest, then the tightest in length
    for ratio, lengths, want in ((1.9, (12, 16, 20), [12, 16]), (1.3, (9, 16, 16), [16, 16]),
                                 (1.3, (10, 10, 16), [10, 10])):
        sched = Scheduler(stub, eos_token_id=None, prefill_chunk=2048, prefill_pad_ratio=ratio)
        sched.prefilling = [GenerationRequest([1] * n, SamplingParams(max_new_tokens=1)) for n in lengths]
        head = sched.prefilling[1]
        group = sched.plan.bucket(head, sched.prefilling, 2048, set())
        assert sorted(len(r.prompt) for r in group) == want, (ratio, lengths)
    # pieces of a long prompt: the longest whose cost fits what is left of the budget (None: none fits)
    sched = Scheduler(stub, eos_token_id=None, prefill_chunk=2048)
    long = GenerationRequest([1] * 3000, SamplingParams(max_new_tokens=1))
    for left in (2048, 700, 200, 100, 40, 10):
        end = sched.plan.piece_end(long, left)
        if end is None:
            assert stub.prefill_cost(1, 1) > left
            continue
        assert stub.prefill_cost(1, end) <= left < stub.prefill_cost(1, end + 1), (left, end)


def test_burst_is_prefilled_in_one_call_under_the_server_budget():
    """A burst of waiting prompts whose padded bucket fits the server's default token budget
    (``--max-num-batched-tokens``) is prefilled by one engine call in the first iteration, and the first
    decode window runs every row; tokens equal generate(). (At the old budget of 2048 tokens per iteration
    this burst took two iterations, each with its own call.)"""
    from fastxlstm.serving.metrics import Metrics
    from fastxlstm.serving.runtime import ServeConfig, make_scheduler

    model = perturbed_model(XLSTMConfig(vocab_size=320, embedding_dim=32, num_blocks=1, num_heads=2,
                                        weight_mode="fused", chunk_size=64))  # long prompts, little compute
    be = EngineSlotBackend(model, max_slots=8)
    runner = be.engine.runner
    runner.prefill_graphs = PrefillGraphs(runner, (16, 64, 256, 512), (1, 2, 4, 8), capture=False)
    calls, windows = [], []
    orig_batch, orig_one, orig_window = be.prefill_batch, be.prefill, be.decode_window
    be.prefill_batch = lambda t, s: (calls.append(len(t)), orig_batch(t, s))[1]
    be.prefill = lambda t, s: (calls.append(1), orig_one(t, s))[1]
    be.decode_window = lambda slots, *a, **k: (windows.append(len(slots)), orig_window(slots, *a, **k))[1]
    config = ServeConfig(max_slots=8)
    assert config.prefill_chunk >= 8 * 512  # the default budget holds the burst's bucket
    sched = make_scheduler(be, None, config, Metrics())
    ps = prompts([300, 500, 380, 460, 310, 420, 390, 480], seed=13)
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)) for p in ps]
    sched.waiting.extend(reqs)
    sched.step()
    assert calls == [8] and windows == [8]
    while sched.has_work():
        sched.step()
    for p, r in zip(ps, reqs):
        assert r.choices[0].generated == generate(model, p, 5)[0].tolist()
    assert calls == [8]
