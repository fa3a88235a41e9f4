"""Engine and LLM API on the CPU (float32, tiny random models)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import LLM, Engine, SequenceState
from fastxlstm.engine.runner import Runner, step_inplace_bmm, step_inplace_reference
from fastxlstm.sampling import SamplingParams
from fastxlstm.tokenizer import Tokenizer

from .helpers import greedy_reference as generate
from .helpers import perturbed_model

CFG = XLSTMConfig(vocab_size=259, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused", chunk_size=16)
PROMPTS = [list(range(3, 40)), [7, 8], list(range(50, 61)), [9], list(range(100, 117)), [4, 4, 4, 4]]


@pytest.fixture(scope="module")
def ref():
    return perturbed_model(CFG)


def _llm(max_slots=3, **kw) -> LLM:
    return LLM(perturbed_model(CFG), Tokenizer.byte_level(), max_slots=max_slots, **kw)


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 4096])
def test_chunked_prefill_equals_unchunked_forward(ref, chunk):
    ids = torch.randint(3, CFG.vocab_size, (2, 83), generator=torch.Generator().manual_seed(chunk))
    runner = Runner(perturbed_model(CFG), chunk_size=chunk)
    hidden, state = runner.forward_tokens(ids)
    with torch.no_grad():
        want, want_state = ref(ids)
    got = runner.logits(hidden)
    assert torch.allclose(got, want[:, -1], atol=2e-5, rtol=1e-4), (got - want[:, -1]).abs().max()
    for layer, want_layer in zip(state, want_state):
        for t, w in zip(layer, want_layer):
            assert torch.allclose(t, w, atol=2e-5, rtol=1e-4)


def test_prefill_continues_a_state(ref):
    ids = torch.randint(3, CFG.vocab_size, (1, 50), generator=torch.Generator().manual_seed(1))
    runner = Runner(perturbed_model(CFG), chunk_size=8)
    _, st = runner.forward_tokens(ids[:, :20])
    hidden, _ = runner.forward_tokens(ids[:, 20:], st)
    with torch.no_grad():
        want, _ = ref(ids)
    assert torch.allclose(runner.logits(hidden), want[:, -1], atol=2e-5, rtol=1e-4)


def test_inplace_steps_agree():
    g = torch.Generator().manual_seed(0)
    b, nh, dqk, dv = 3, 2, 8, 16
    q, k = torch.randn(b, nh, dqk, generator=g), torch.randn(b, nh, dqk, generator=g)
    v = torch.randn(b, nh, dv, generator=g)
    i, f = torch.randn(b, nh, generator=g) * 3, torch.randn(b, nh, generator=g) * 3 + 2
    i[1], f[1] = float("-inf"), float("inf")  # a masked row keeps its state
    state = (torch.randn(b, nh, dqk, dv, generator=g), torch.randn(b, nh, dqk, generator=g).abs(),
             torch.randn(b, nh, generator=g))
    s1 = tuple(t.clone() for t in state)
    s2 = tuple(t.clone() for t in state)
    h1 = step_inplace_reference(q, k, v, i, f, *s1, eps=1e-6)
    h2 = step_inplace_bmm(q, k, v, i, f, *s2, eps=1e-6)
    assert torch.allclose(h1, h2, atol=1e-5, rtol=1e-5)
    for a, c, orig in zip(s1, s2, state):
        assert torch.allclose(a, c, atol=1e-5, rtol=1e-5)
        assert torch.equal(a[1], orig[1]) and torch.equal(c[1], orig[1])


def test_batched_mixed_lengths_equal_one_by_one_and_v0(ref):
    llm = _llm(max_slots=3)  # 6 prompts over 3 slots: continuous batching with slot reuse
    batch = llm.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
    alone = _llm(max_slots=1)
    for p, r in zip(PROMPTS, batch):
        assert r.token_ids == alone.generate(p, max_new_tokens=10, ignore_eos=True)[0].token_ids
        assert r.token_ids == generate(ref, p, max_new_tokens=10)[0].tolist()
        assert r.finish_reason == "length" and r.prompt_token_ids == p


def test_seeded_sampling_reproducible_and_batch_independent():
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.2,
              ignore_eos=True)
    llm = _llm(max_slots=4)
    a = [r.token_ids for r in llm.generate(PROMPTS[:4], seed=11, **kw)]
    b = [r.token_ids for r in llm.generate(PROMPTS[:4], seed=11, **kw)]
    c = [r.token_ids for r in llm.generate(PROMPTS[:4], seed=12, **kw)]
    assert a == b and a != c
    assert llm.generate(PROMPTS[2], seed=11, **kw)[0].token_ids == a[2]
    # a greedy neighbour in the batch changes nothing either
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    mixed = llm.generate(PROMPTS[:2], sampling_params=[greedy, SamplingParams(seed=11, **kw)])
    assert mixed[1].token_ids == a[1]


def test_state_save_restore_continue_equals_uninterrupted(tmp_path: Path):
    llm = _llm(max_slots=2)
    for kw in (dict(), dict(temperature=0.8, top_k=30, seed=3)):
        full = llm.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True, **kw)[0].token_ids
        st = llm.prefill(PROMPTS[0])
        st.save(tmp_path / "s0.safetensors")
        st = SequenceState.load(tmp_path / "s0.safetensors")
        part1 = llm.generate(st, max_new_tokens=7, ignore_eos=True, return_state=True, **kw)[0]
        part1.state.save(tmp_path / "s1.safetensors")
        st1 = SequenceState.load(tmp_path / "s1.safetensors")
        assert st1.pending_token == part1.token_ids[-1] and st1.token_ids == PROMPTS[0] + part1.token_ids
        part2 = llm.generate(st1, max_new_tokens=9, ignore_eos=True, **kw)[0]
        assert part1.token_ids + part2.token_ids == full


def test_state_continue_with_more_prompt(ref):
    llm = _llm(max_slots=1)
    st = llm.prefill(PROMPTS[0][:20])
    out = llm.generate(PROMPTS[0][20:], state=st, max_new_tokens=8, ignore_eos=True)[0].token_ids
    assert out == generate(ref, PROMPTS[0], max_new_tokens=8)[0].tolist()


def test_stops_and_stream():
    llm = _llm(max_slots=2)
    base = llm.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True)[0]
    assert len(base.text) >= 6
    stop = base.text[3:5]
    cut = llm.generate(PROMPTS[0], max_new_tokens=24, ignore_eos=True, stop=[stop])[0]
    assert cut.text == base.text[:base.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(llm.stream(PROMPTS[0], max_new_tokens=24, ignore_eos=True, stop=[stop])) == cut.text
    assert "".join(llm.stream(PROMPTS[0], max_new_tokens=24, ignore_eos=True)) == base.text
    tok = base.token_ids[5]
    r = llm.generate(PROMPTS[0], max_new_tokens=24, stop_token_ids=[tok], ignore_eos=True)[0]
    assert r.token_ids == base.token_ids[:base.token_ids.index(tok) + 1] and r.finish_reason == "stop"
    r = llm.generate(PROMPTS[0], max_new_tokens=24)[0]  # EOS (id 2) stops it if it comes
    if 2 in base.token_ids:
        assert r.token_ids == base.token_ids[:base.token_ids.index(2) + 1]
    assert llm.generate(PROMPTS[0], max_new_tokens=0)[0].token_ids == []
    assert llm.generate("hello", max_new_tokens=3, ignore_eos=True)[0].prompt_token_ids == llm.encode("hello")


def test_engine_slot_api_and_errors():
    eng = Engine(perturbed_model(CFG), max_slots=2)
    a = eng.allocate_slot()
    b = eng.allocate_slot()
    with pytest.raises(RuntimeError):
        eng.allocate_slot()
    with pytest.raises(ValueError):
        eng.prefill_into_slot(a, [])
    with pytest.raises(ValueError):
        eng.prefill_into_slot(a, [CFG.vocab_size])
    logits = eng.prefill_into_slots([a, b], [PROMPTS[0], PROMPTS[1]])
    eng.sample([a, b], logits)
    before = eng.get_slot_state(b)
    out = eng.decode_step([a])
    assert out.slots == [a] and out.tokens.shape == (1,)
    for x, y in zip(before, eng.get_slot_state(b)):
        assert all(torch.equal(t0, t1) for t0, t1 in zip(x, y))
    # an unlisted lower slot runs inside the higher one's bucket: its state and next input stay
    tok_a, before_a = eng.tokens[a].clone(), eng.get_slot_state(a)
    eng.decode_step([b])
    assert torch.equal(eng.tokens[a], tok_a)
    for x, y in zip(before_a, eng.get_slot_state(a)):
        assert all(torch.equal(t0, t1) for t0, t1 in zip(x, y))
    eng.free_slot(b)
    with pytest.raises(ValueError):
        eng.free_slot(b)
    assert eng.allocate_slot() == b
    with pytest.raises(ValueError):
        eng.set_slot_state(a, [before[0]])


def test_triton_kernels_in_interpreter():
    """The fused Triton kernels and the Triton step (interpreted on the CPU) compute the model's function."""
    code = r"""
import torch
from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import Engine
from tests.helpers import perturbed_model
cfg = XLSTMConfig(vocab_size=300, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused")
ref = perturbed_model(cfg)
eng = Engine(perturbed_model(cfg), max_slots=2, backend="triton")
assert eng.runner.step_name == "triton", eng.runner.step_name
ids = [list(range(3, 20)), [7, 8, 9]]
logits = eng.prefill_into_slots([eng.allocate_slot(), eng.allocate_slot()], ids)
first = eng.sample([0, 1], logits)
out = None
for _ in range(3):
    out = eng.decode_step(return_logits=True)
with torch.no_grad():
    for j in range(2):
        lg, st = ref(torch.tensor([ids[j]]))
        t = lg[0, -1].argmax()
        assert t == first[j]
        for _ in range(3):
            lg, st = ref(t.view(1, 1), st)
            t = lg[0, -1].argmax()
        assert torch.allclose(lg[0, -1], out.logits[j], atol=1e-4), (lg[0, -1] - out.logits[j]).abs().max()
print("ok")
"""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_slot_backend_window_equals_reference_model(ref):
    """The serving backend (prefill, load, first tokens, multi-step windows with logprobs) against the
    reference model: greedy tokens equal the reference loop, logprobs its log-softmax, rows in the
    caller's order whatever the slot order."""
    from fastxlstm.engine.backend import EngineSlotBackend

    be = EngineSlotBackend(perturbed_model(CFG), max_slots=3)
    prompts = {2: PROMPTS[0], 0: PROMPTS[2]}
    logits = []
    for slot, p in prompts.items():
        lg, st = be.prefill(p, None)
        be.load(slot, st, SamplingParams(logprobs=2), p)
        logits.append(lg)
    first = be.first_tokens([2, 0], torch.stack(logits), logprobs=True)
    win = be.decode_window([2, 0], 5, logprobs=True)
    toks = torch.cat([first.tokens, win.tokens], 1)
    lps = torch.cat([first.logprobs, win.logprobs], 1)
    for row, p in enumerate(prompts.values()):
        want = generate(ref, p, max_new_tokens=6)[0]
        assert toks[row].tolist() == want.tolist()
        with torch.no_grad():
            full, _ = ref(torch.tensor([p + want.tolist()]))
        lsm = torch.log_softmax(full[0, len(p) - 1:-1].double(), -1)
        torch.testing.assert_close(lps[row].double(), lsm.gather(1, want[:, None])[:, 0], atol=2e-4, rtol=0)
    lf, _ = be.prefill(PROMPTS[1], be.read(0))
    with torch.no_grad():
        want_logits = ref(torch.tensor([PROMPTS[2] + toks[1, :5].tolist() + PROMPTS[1]]))[0][0, -1]
    assert torch.allclose(lf, want_logits, atol=2e-4, rtol=1e-4)


def _slot_run(eng: Engine, params: SamplingParams):
    """Prefill PROMPTS[0] into a slot, decode until ``max_new_tokens`` and read what the device produced."""
    s = eng.allocate_slot()
    eng.sample([s], eng.prefill_into_slot(s, PROMPTS[0], params=params)[None])
    for _ in range(params.max_new_tokens):
        eng.decode_step(return_outputs=False)
    (rd,) = eng.read_tokens([s])
    eng.free_slot(s)
    return rd


def test_engine_stops_on_device():
    """Stop tokens end a sequence on the device (the LLM layer checks them again on the host)."""
    eng = Engine(perturbed_model(CFG), max_slots=1)
    base = _slot_run(eng, SamplingParams(max_new_tokens=24, ignore_eos=True))
    assert len(base.new_tokens) == 24 and base.finished
    tok = base.new_tokens[5]
    cut = _slot_run(eng, SamplingParams(max_new_tokens=24, ignore_eos=True, stop_token_ids=[tok]))
    assert cut.finished and cut.new_tokens == base.new_tokens[:base.new_tokens.index(tok) + 1]


@pytest.mark.parametrize("prompt", [PROMPTS[4], PROMPTS[5]])  # 4: prompt tokens come back; 5: output repeats
def test_repetition_penalty_matches_transformers(ref, prompt):
    """Greedy with a repetition penalty equals a loop over the reference model with transformers'
    ``RepetitionPenaltyLogitsProcessor`` (prompt and generated tokens both penalised)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    proc, n = RepetitionPenaltyLogitsProcessor(1.5), 12
    seq = torch.tensor([prompt])
    with torch.no_grad():
        logits, state = ref(seq)
        for _ in range(n):
            nxt = proc(seq, logits[:, -1]).argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits, state = ref(nxt, state)
    want = seq[0, len(prompt):].tolist()
    assert want != generate(ref, prompt, max_new_tokens=n)[0].tolist()  # the penalty matters here
    got = _llm().generate(prompt, max_new_tokens=n, repetition_penalty=1.5, ignore_eos=True)[0].token_ids
    assert got == want
