"""Scheduler batching: batched prefill of equal-length prompts and several decode steps per host read
must give exactly what one-by-one prefill and single steps give, and never emit past a stop."""

from __future__ import annotations

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine.backend import EngineSlotBackend
from fastxlstm.sampling import SamplingParams
from fastxlstm.serving.prefix_cache import PrefixCache
from fastxlstm.serving.requests import FinishEvent, GenerationRequest, TokenEvent
from fastxlstm.serving.scheduler import Scheduler

from .helpers import greedy_reference as generate
from .helpers import perturbed_model
from .test_serving_units import run_requests

CFG = XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused", chunk_size=16)


@pytest.fixture(scope="module")
def model():
    return perturbed_model(CFG)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def close_states(a, b, tol=1e-5):
    return all(torch.allclose(x, y, atol=tol, rtol=tol) for la, lb in zip(a, b) for x, y in zip(la, lb))


def test_prefill_batch_equals_one_by_one(model):
    be = EngineSlotBackend(model, max_slots=4)
    ps = prompts([13, 13, 13])
    starts = [None] * 3
    for with_state in (False, True):
        logits, states = be.prefill_batch(ps, starts)
        assert logits.shape == (3, CFG.vocab_size) and len(states) == 3
        for j, p in enumerate(ps):
            lo, st = be.prefill(p, starts[j])
            assert torch.allclose(logits[j], lo, atol=1e-5, rtol=1e-5)
            assert close_states(states[j], st) and states[j][0][0].shape[0] == 1
        starts = states  # second round: continue from the states (prefix-cache hits)
        assert with_state or all(s is not None for s in starts)
    with pytest.raises(ValueError):  # different lengths are right-padded (tests/test_engine_padded_prefill.py)
        be.prefill_batch([[1, 2], []], [None, None])


@pytest.mark.parametrize("params", [SamplingParams(logprobs=0), SamplingParams(logprobs=3, temperature=0.9, top_p=0.9,
                                    seed=5, presence_penalty=0.5, repetition_penalty=1.2, logit_bias={7: 2.0})])
def test_decode_window_equals_single_steps(model, params):
    """A window of 6 steps equals 6 windows of one step (tokens, logprobs, top alternatives, states), any slot
    order (the scheduler's), greedy and sampled (seeded, penalties, bias: all on the device)."""
    fast, slow = EngineSlotBackend(model, max_slots=4), EngineSlotBackend(model, max_slots=4)
    ps = prompts([5, 9, 17], seed=1)
    firsts = []
    for be in (fast, slow):
        logits = []
        for slot, p in zip((3, 0, 1), ps):
            lg, st = be.prefill(p, None)
            be.load(slot, st, params, p)
            logits.append(lg)
        firsts.append(be.first_tokens([3, 0, 1], torch.stack(logits), logprobs=True))
    assert torch.equal(firsts[0].tokens, firsts[1].tokens)
    got = fast.decode_window([3, 0, 1], 6, logprobs=True)
    steps = [slow.decode_window([3, 0, 1], 1, logprobs=True) for _ in range(6)]
    for name in ("tokens", "logprobs", "top_logprobs", "top_ids"):
        want = torch.cat([getattr(s, name) for s in steps], 1)
        assert torch.allclose(getattr(got, name).double(), want.double(), atol=1e-5), name
    assert close_states(fast.read(3), slow.read(3))
    lsm = torch.log_softmax(torch.stack([fast.prefill(p, None)[0] for p in ps]), -1)
    torch.testing.assert_close(firsts[0].logprobs[:, 0], lsm.gather(1, firsts[0].tokens)[:, 0])


def test_decode_window_longer_than_the_ring(model):
    """A window longer than the sampler's ring buffer (``history``) runs in pieces and equals single steps;
    the engine's ``decode_steps`` gathers the window's tokens once, after its last step."""
    fast, slow = EngineSlotBackend(model, max_slots=2, history=4), EngineSlotBackend(model, max_slots=2)
    ps = prompts([6, 11], seed=7)
    for be in (fast, slow):
        logits = []
        for slot, p in zip((1, 0), ps):
            lg, st = be.prefill(p, None)
            be.load(slot, st, SamplingParams(), p)
            logits.append(lg)
        be.first_tokens([1, 0], torch.stack(logits))
    got = fast.decode_window([1, 0], 10)
    want = torch.cat([slow.decode_window([1, 0], 1).tokens for _ in range(10)], 1)
    assert torch.equal(got.tokens, want) and got.logprobs is None
    with pytest.raises(ValueError, match="steps"):
        fast.engine.decode_steps([0], 5)


def counted(fn, name, log):
    def wrapper(*args, **kwargs):
        log.append(name)
        return fn(*args, **kwargs)
    return wrapper


def tokens_and_finish(events):
    toks = [e.token for e in events if isinstance(e, TokenEvent)]
    fins = [i for i, e in enumerate(events) if isinstance(e, FinishEvent)]
    assert len(fins) == 1 and fins[0] == len(events) - 1  # nothing after the finish
    return toks, events[-1].reason


def test_multi_step_window_stops_exactly(model):
    """k-step windows: max_tokens, stop ids and EOS stop exactly (mid-window), tokens equal single steps."""
    ps = prompts([6, 6, 6, 11, 11, 3], seed=2)
    ref = [generate(model, p, 20)[0].tolist() for p in ps]

    def first_new(r, at):  # a token whose first occurrence is at position `at` (or later)
        i = next(i for i in range(at, len(r)) if r[i] not in r[:i])
        return r[i], i

    stop_tok, stop_at = first_new(ref[1], 2)
    eos_tok, eos_at = first_new(ref[4], 5)
    params = [SamplingParams(max_new_tokens=1, temperature=0), SamplingParams(max_new_tokens=20, temperature=0,
              stop_token_ids=(stop_tok,)), SamplingParams(max_new_tokens=7, temperature=0),
              SamplingParams(max_new_tokens=20, temperature=0), SamplingParams(max_new_tokens=20, temperature=0),
              SamplingParams(max_new_tokens=13, temperature=0, ignore_eos=True)]
    want = [(ref[0][:1], "length"), (ref[1][:stop_at + 1], "stop"), (ref[2][:7], "length")]
    for r in ref[3:5]:
        end = next((i for i, t in enumerate(r) if t == eos_tok), None)
        want.append((r[:end + 1], "stop") if end is not None else (r[:20], "length"))
    want.append((ref[5][:13], "length"))
    assert want[4] == (ref[4][:eos_at + 1], "stop")
    for k in (1, 4, 8):
        be = EngineSlotBackend(model, max_slots=8)
        reads = []
        be.decode_window = counted(be.decode_window, "decode_window", reads)
        sched = Scheduler(be, eos_token_id=eos_tok, decode_steps_per_read=k)
        sched.start()
        try:
            reqs = [GenerationRequest(p, sp) for p, sp in zip(ps, params)]
            events = run_requests(sched, reqs)
            assert [tokens_and_finish(events[r.id]) for r in reqs] == want, k
            assert sched.stats()["slots_free"] == 8
            assert sched.metrics.generation_tokens._value.get() == sum(len(w[0]) for w in want)
            assert sched.steps == 19  # device steps: the longest request's 20 tokens less the prefill's
            assert len(reads) < 19 if k > 1 else len(reads) == 19
        finally:
            sched.shutdown()


def test_batched_prefill_in_scheduler_and_cache_states_exact(model):
    """A wave of equal-length prompts is prefilled in one call; tokens equal generate(); every cached state
    (prompt ends and chat-turn ends, even when a window ran past a stop) equals a fresh prefill of its key."""
    be = EngineSlotBackend(model, max_slots=8)
    calls = []
    orig = be.prefill_batch
    be.prefill_batch = lambda t, s: (calls.append(len(t)), orig(t, s))[1]
    cache = PrefixCache(10**8)
    sched = Scheduler(be, eos_token_id=None, cache=cache, decode_steps_per_read=4, prefill_pad_ratio=1.0)
    ps = prompts([9, 9, 9, 9, 4, 12], seed=3)
    ref = [generate(model, p, 10)[0].tolist() for p in ps]
    stop_tok = ref[0][1] if ref[0][1] not in ref[0][:1] else ref[0][2]
    sched.start()
    try:
        max_tokens = [10, 10, 10, 10, 10, 7]  # a shorter budget: windows must shrink to land on its end
        params = [SamplingParams(max_new_tokens=m, temperature=0, stop_token_ids=(stop_tok,) if i == 0 else ())
                  for i, m in enumerate(max_tokens)]
        reqs = [GenerationRequest(p, sp, cache_generation_end=True) for p, sp in zip(ps, params)]
        before = sched.metrics.prefill_tokens._value.get()
        events = run_requests(sched, reqs)
        assert sched.metrics.prefill_tokens._value.get() - before == sum(map(len, ps))
        for i, r in enumerate(reqs):
            toks, _ = tokens_and_finish(events[r.id])
            end = ref[i].index(stop_tok) + 1 if i == 0 else max_tokens[i]
            assert toks == ref[i][:end]
            if i > 0:  # a length stop leaves the state of exactly the tokens fed (all but the last): cached
                assert ps[i] + toks[:-1] in cache, i
        assert calls == [4]  # the four 9-token prompts in one call, the others alone
        keys = cache.keys()
        assert len(keys) >= len(ps) + 1  # prompt ends plus turn ends (length stops land on a window end)
        for key in keys:
            _, fresh = be.prefill(key, None)
            hit = cache.lookup(key, need_logits_at_end=False, count=False)
            assert hit.length == len(key) and close_states(hit.state, fresh, tol=1e-4), len(key)
    finally:
        sched.shutdown()


def test_multi_step_window_logprobs_equal_single_steps(model):
    """Logprobs (the chosen token's and top alternatives) and sampled requests ride in windows: tokens and
    logprobs with k=4 equal k=1, and windows are used for every kind of request."""
    ps = prompts([7, 7, 10, 5], seed=4)
    params = [SamplingParams(max_new_tokens=9, temperature=0, logprobs=0),
              SamplingParams(max_new_tokens=9, temperature=0, logprobs=2),
              SamplingParams(max_new_tokens=9, temperature=0),
              SamplingParams(max_new_tokens=9, temperature=1.0, top_k=20, seed=3, logprobs=1)]
    got = {}
    for k in (1, 4):
        be = EngineSlotBackend(model, max_slots=4)
        reads = []
        be.decode_window = counted(be.decode_window, "decode_window", reads)
        sched = Scheduler(be, eos_token_id=None, decode_steps_per_read=k)
        sched.start()
        try:
            reqs = [GenerationRequest(p, sp) for p, sp in zip(ps, params)]
            events = run_requests(sched, reqs)
            got[k] = [[(e.token, e.logprob, e.top_logprobs) for e in events[r.id] if isinstance(e, TokenEvent)]
                      for r in reqs]
            assert len(reads) == (8 if k == 1 else 2)  # 8 steps after the first token: 8 windows of 1, or 4 + 4
        finally:
            sched.shutdown()
    for a, b in zip(got[1], got[4]):
        assert [t for t, _, _ in a] == [t for t, _, _ in b]
        assert all((la is None) == (lb is None) and (la is None or abs(la - lb) < 1e-5)
                   and [i for i, _ in ta or []] == [i for i, _ in tb or []] for (_, la, ta), (_, lb, tb) in zip(a, b))
    assert got[4][0][0][1] is not None and got[4][0][0][2] == [] and got[4][2][0][1] is None
    assert len(got[4][1][0][2]) == 2 and got[4][1][0][2][0][0] == got[4][1][0][0]  # greedy picks the top one
    assert len(got[4][3][0][2]) == 1


def test_engine_backend_windows_past_engine_defaults(model):
    """EngineSlotBackend in the scheduler with windows: greedy tokens equal generate() beyond the engine's
    default max_new_tokens (its own stops are off; the host stops), slots reused across requests."""
    sched = Scheduler(EngineSlotBackend(model, max_slots=2), eos_token_id=None, decode_steps_per_read=4)
    sched.start()
    try:
        ps = prompts([5, 5, 8], seed=5)
        reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
                for p, n in zip(ps, (70, 9, 13))]
        events = run_requests(sched, reqs)
        for p, r in zip(ps, reqs):
            toks, reason = tokens_and_finish(events[r.id])
            assert toks == generate(model, p, r.params.max_new_tokens)[0].tolist() and reason == "length"
    finally:
        sched.shutdown()


def test_overlapped_windows_equal_serial_and_generate(model):
    """With overlap a window is queued behind one whose tokens were not read yet (its inputs stay on the
    device); with ``early_launch`` also before the iteration's prefill (which then runs with two windows
    unread); tokens, finish reasons, cached turn-end states and slot accounting equal the serial scheduler's
    and generate(), with length, stop-token and EOS stops inside windows."""
    from fastxlstm.engine.backend import EngineSlotBackend

    ps = prompts([6, 6, 11, 4, 9, 14, 7], seed=6)
    ref = [generate(model, p, 23)[0].tolist() for p in ps]
    stop_tok = next(t for i, t in enumerate(ref[1]) if i >= 3 and t not in ref[1][:i])
    eos_tok = next(t for i, t in enumerate(ref[4]) if i >= 6 and t not in ref[4][:i])
    budgets = [23, 23, 5, 17, 23, 2, 11]
    results = {}
    for mode in ("serial", "overlap", "early"):
        be = EngineSlotBackend(model, max_slots=4)
        launches, bad, at_prefill = [], [], []  # (an assertion inside the scheduler thread would only trigger
        cache = PrefixCache(10**8)  # its fallback)
        sched = Scheduler(be, eos_token_id=eos_tok, cache=cache, decode_steps_per_read=4, overlap=mode != "serial",
                          early_launch=mode == "early")

        def unread(_sched=sched) -> int:
            return sum(w.phase == "decode" for w in _sched.inflight.unread)

        for name in ("prefill", "prefill_batch"):  # decode windows unread while a prefill is queued
            setattr(be, name, lambda *a, _orig=getattr(be, name), _seen=at_prefill, _unread=unread: (
                _seen.append(_unread()), _orig(*a))[1])

        def counted(slots, steps, logprobs=False, _orig=be.decode_window, _sched=sched, _launches=launches,
                    _bad=bad):
            _launches.append(unread() > 0)  # a window still unread when this one is queued
            live = {c.slot: c for r in _sched.running for c in r.choices if not c.done}
            # no sequence is relaunched once the inputs handed to the device (fed) cover its budget
            if not all(live[s].fed + 1 < live[s].params.max_new_tokens for s in slots):
                _bad.append(("budget spent", slots))
            return _orig(slots, steps, logprobs)

        be.decode_window = counted
        sched.start()
        try:
            params = [SamplingParams(max_new_tokens=m, temperature=0, logprobs=0 if i % 2 else None,
                                     stop_token_ids=[stop_tok] if i == 1 else [], ignore_eos=i == 6)
                      for i, m in enumerate(budgets)]
            reqs = [GenerationRequest(p, sp, cache_generation_end=i < 4) for i, (p, sp) in enumerate(zip(ps, params))]
            events = run_requests(sched, reqs)
            results[mode] = [[(e.token, e.logprob) for e in events[r.id] if isinstance(e, TokenEvent)]
                             + [e.reason for e in events[r.id] if isinstance(e, FinishEvent)] for r in reqs]
            assert sched.stats()["slots_free"] == 4 and not sched.inflight
            assert any(launches) == (mode != "serial") and not bad, bad
            assert max(at_prefill) == (2 if mode == "early" else 1 if mode == "overlap" else 0), at_prefill
            for i in range(len(reqs)):
                toks = [t for t, _ in results[mode][i][:-1]]
                stops = [j + 1 for j, t in enumerate(ref[i]) if t == stop_tok and i == 1]
                stops += [j + 1 for j, t in enumerate(ref[i]) if t == eos_tok and i != 6]
                assert toks == ref[i][:min([budgets[i], *stops])], (mode, i)
                if i < 4 and results[mode][i][-1] == "length":  # a turn that ended on its budget is cached:
                    assert ps[i] + toks[:-1] in cache, (mode, i)  # no window ran past it
            for key in cache.keys():  # every cached state is the state of its key
                hit = cache.lookup(key, need_logits_at_end=False, count=False)
                _, fresh = be.prefill(key, None)
                assert hit.length == len(key) and close_states(hit.state, fresh, tol=1e-4), (mode, len(key))
        finally:
            sched.shutdown()
    for mode in ("overlap", "early"):
        assert [[t for t, _ in r[:-1]] + r[-1:] for r in results[mode]] == \
            [[t for t, _ in r[:-1]] + r[-1:] for r in results["serial"]], mode
        for a, b in zip(results[mode], results["serial"]):
            assert all((la is None) == (lb is None) and (la is None or abs(la - lb) < 1e-5)
                       for (_, la), (_, lb) in zip(a[:-1], b[:-1]))


def test_mixed_length_prefill_buckets_exact(model):
    """The engine backend prefills prompts of different lengths together (right-padded, padded tokens at most
    ``prefill_pad_ratio`` x real and at most the prefill budget per forward); tokens equal generate(), every
    cached prompt-end state equals a fresh prefill of its key, and no slot leaks."""
    from fastxlstm.engine.backend import EngineSlotBackend

    be = EngineSlotBackend(model, max_slots=12)
    calls = []
    orig = be.prefill_batch
    be.prefill_batch = lambda t, s: (calls.append([len(x) for x in t]), orig(t, s))[1]
    cache = PrefixCache(10**8)
    sched = Scheduler(be, eos_token_id=None, cache=cache, decode_steps_per_read=4, prefill_chunk=64,
                      prefill_pad_ratio=1.3)
    lengths = [20, 22, 9, 10, 11, 40, 3, 21, 60, 12, 1, 2]
    ps = prompts(lengths, seed=8)
    ref = [generate(model, p, 6)[0].tolist() for p in ps]
    sched.start()
    try:
        reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)) for p in ps]
        events = run_requests(sched, reqs)
        for i, r in enumerate(reqs):
            assert tokens_and_finish(events[r.id]) == (ref[i], "length"), i
        assert sched.stats()["slots_free"] == 12
        assert any(len(set(c)) > 1 for c in calls), calls  # different lengths shared a forward
        for c in calls:
            assert len(c) > 1 and max(c) * len(c) <= 64 and max(c) * len(c) <= 1.3 * sum(c) + 1e-9, c
        batched = sum(len(c) for c in calls)
        assert batched >= 8, calls  # most of the wave went through batched forwards
        for p in ps:
            _, fresh = be.prefill(p, None)
            assert close_states(cache.lookup(p, need_logits_at_end=False, count=False).state, fresh, tol=1e-4), len(p)
    finally:
        sched.shutdown()


def test_bucket_plan_bounds():
    """The plan itself: the group holds the first-come request, respects the budget and the padding ratio,
    never mixes start-state kinds, and a backend without padding gets equal lengths only."""
    class Stub:
        max_slots, vocab_size, device = 64, 10, torch.device("cpu")
        prefill_padded = True

        def prefill_batch(self, tokens, states):
            raise AssertionError("not called")

    sched = Scheduler(Stub(), eos_token_id=None, prefill_chunk=1000, prefill_pad_ratio=1.3)
    g = torch.Generator().manual_seed(0)
    reqs = []
    for j, n in enumerate(torch.randint(1, 300, (40,), generator=g).tolist()):
        r = GenerationRequest([1] * n, SamplingParams(max_new_tokens=1))
        if j % 7 == 3:
            r.state = object()  # a prefix-cache hit: may not share a forward with cold prompts
        reqs.append(r)
    sched.prefilling = reqs
    for budget in (1000, 300, 2000):
        for head in reqs[:10]:
            group = sched.plan.bucket(head, sched.prefilling, budget, set())
            lens = [len(r.prompt) for r in group]
            assert head in group and len({r.state is None for r in group}) == 1
            assert max(lens) * len(lens) <= budget or len(group) == 1
            assert max(lens) * len(lens) <= 1.3 * sum(lens) + 1e-9
    Stub.prefill_padded = False
    for head in reqs[:10]:
        assert len({len(r.prompt) for r in sched.plan.bucket(head, sched.prefilling, 1000, set())}) == 1
