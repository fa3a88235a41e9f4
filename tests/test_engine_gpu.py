"""GPU: the CUDA-graph decode gives the same greedy tokens as the eager engine step and as the
v0 loop; masked slots keep their state bit for bit; chunked prefill matches the model."""

from __future__ import annotations

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import LLM, Engine

from .helpers import greedy_reference as generate
from .helpers import perturbed_model

pytestmark = pytest.mark.gpu

CFG = XLSTMConfig(vocab_size=1024, embedding_dim=512, num_blocks=2, num_heads=4, weight_mode="fused")


def _model(dtype=torch.bfloat16):
    return perturbed_model(CFG).to("cuda", dtype)


def _run(engine: Engine, prompts, steps: int) -> list[list[int]]:
    slots = [engine.allocate_slot() for _ in prompts]
    logits = engine.prefill_into_slots(slots, prompts)
    first = engine.sample(slots, logits)
    toks = [first.tolist()]
    for _ in range(steps):
        toks.append(engine.decode_step(slots).tokens.tolist())
    for s in slots:
        engine.free_slot(s)
    return [list(t) for t in zip(*toks)]


def test_cuda_graph_equals_eager_bf16():
    prompts = [list(range(3, 40)), [5, 6, 7], list(range(100, 400))]
    graph = _run(Engine(_model(), max_slots=4, use_cuda_graph=True), prompts, 24)
    eager = _run(Engine(_model(), max_slots=4, use_cuda_graph=False), prompts, 24)
    assert graph == eager


def test_engine_greedy_equals_v0_loop_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _model(torch.float32)
    ref = _model(torch.float32)
    ref.set_backend("reference")
    prompts = [list(range(3, 40)), [9, 8, 7, 6]]
    llm = LLM(model, max_slots=4, backend="reference")
    out = llm.generate(prompts, max_new_tokens=16, ignore_eos=True)
    for p, r in zip(prompts, out):
        assert r.token_ids == generate(ref, p, max_new_tokens=16)[0].tolist()


def test_masked_slots_untouched_and_batch_matches_alone():
    eng = Engine(_model(), max_slots=8)
    a, b = eng.allocate_slot(), eng.allocate_slot()
    logits = eng.prefill_into_slots([a, b], [list(range(3, 50)), list(range(7, 20))])
    eng.sample([a, b], logits)
    before = eng.get_slot_state(b)
    for _ in range(5):
        eng.decode_step([a])
    after = eng.get_slot_state(b)
    for x, y in zip(before, after):
        for t0, t1 in zip(x, y):
            assert torch.equal(t0, t1)


def test_chunked_prefill_matches_model_and_memory_flat():
    """Chunked bf16 prefill is as close to a float32 reference as the unchunked bf16 forward, and
    its peak memory does not grow with the prompt (1,500 vs 6,000 tokens, chunks of 256)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(7)
    ids = torch.randint(3, CFG.vocab_size, (1, 1500), device="cuda", generator=g)
    model, unchunked = _model(), _model()
    fp32 = _model(torch.float32)
    fp32.set_backend("reference")
    eng = Engine(model, max_slots=1, prefill_chunk_size=256)
    s = eng.allocate_slot()
    got = eng.prefill_into_slot(s, ids[0])
    with torch.no_grad():
        want = fp32(ids, last_logits_only=True)[0][0, -1]
        bf16 = unchunked(ids, last_logits_only=True)[0][0, -1]
    rel = ((got - want).norm() / want.norm()).item()
    rel_unchunked = ((bf16 - want).norm() / want.norm()).item()
    # measured on the H100 (2026-11-25): 0.0328 against 0.0340 for the unchunked bf16 forward; bf16 through
    # this perturbed model is that far from float32, so the bound is relative to the unchunked forward
    assert rel < 0.1 and rel <= 1.25 * rel_unchunked + 2e-3, (rel, rel_unchunked)

    def peak(n: int) -> int:
        long_ids = torch.randint(3, CFG.vocab_size, (n,), device="cuda", generator=g)
        eng.free_slot(s)
        eng.allocate_slot()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        eng.prefill_into_slot(s, long_ids)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(6000)  # warm the last-chunk length of the long prompt too
    short, long = peak(1500), peak(6000)
    assert long <= short + (1 << 20), (short, long)


def _decode_logits(engine: Engine, prompt, steps: int) -> torch.Tensor:
    s = engine.allocate_slot()
    engine.sample([s], engine.prefill_into_slots([s], [prompt]))
    out = [engine.decode_step([s], return_logits=True).logits[0] for _ in range(steps)]
    engine.free_slot(s)
    return torch.stack(out)


def test_batch1_gemv_path_matches_unfused_kernels():
    """The batch-1 GEMV decode (fused norms / SwiGLU / residual / soft-cap) computes the same
    logits as the cuBLAS + separate-kernel path, and its CUDA graph equals its eager run."""
    prompt = list(range(3, 60))
    fast = Engine(_model(), max_slots=1)
    assert fast.runner.gemv_decode and fast.runner.fused_cell
    slow = Engine(_model(), max_slots=1)
    slow.runner.gemv_decode = slow.runner.fused_cell = False
    a = _decode_logits(fast, prompt, 12)
    b = _decode_logits(slow, prompt, 12)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert ((a - b).norm() / b.norm()).item() < 2e-2
    eager = _run(Engine(_model(), max_slots=1, use_cuda_graph=False), [prompt], 20)
    graph = _run(Engine(_model(), max_slots=1, use_cuda_graph=True), [prompt], 20)
    assert graph == eager


def test_bf16_state_close_to_fp32_state():
    """``state_dtype="bfloat16"`` stores C in bf16 (float32 math): logits stay close to the float32
    state's over a few steps, graph == eager holds, and slot reads come back float32."""
    prompt = list(range(10, 90))
    f32 = Engine(_model(), max_slots=2)
    b16 = Engine(_model(), max_slots=2, state_dtype="bfloat16")
    assert b16.states[0][0].dtype == torch.bfloat16 and b16.states[0][1].dtype == torch.float32
    for eng in (f32, b16):  # batch 2 (fused cell without GEMVs)
        eng.allocate_slot()
    a = _decode_logits(f32, prompt, 8)
    b = _decode_logits(b16, prompt, 8)
    assert ((a - b).norm() / a.norm()).item() < 3e-2
    assert all(t.dtype == torch.float32 for t in b16.get_slot_state(0)[0])
    prompts = [list(range(3, 40)), [5, 6, 7]]
    graph = _run(Engine(_model(), max_slots=2, state_dtype="bfloat16"), prompts, 16)
    eager = _run(Engine(_model(), max_slots=2, state_dtype="bfloat16", use_cuda_graph=False), prompts, 16)
    assert graph == eager


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("c_dtype", [torch.float32, torch.bfloat16])
def test_decode_cell_7b_shapes_vs_reference(batch, c_dtype):
    """The one-launch decode cell at the 7B cell shapes (every tile config the engine picks) against
    the float64 reference composition of gates, step, head norm and output gate."""
    from fastxlstm.ops.triton import mlstm_decode_cell_

    from .helpers import decode_cell_reference

    nh, dqk, dv = 8, 256, 512
    g = torch.Generator(device="cuda").manual_seed(batch)
    proj = torch.randn(batch, 2 * nh * (dqk + dv + 1), device="cuda", generator=g).to(torch.bfloat16)
    gb = torch.randn(2 * nh, device="cuda", generator=g)
    gb[nh:] += 4.0
    act = torch.rand(batch, device="cuda", generator=g) > 0.25
    act[0] = True
    c = torch.randn(batch, nh, dqk, dv, device="cuda", generator=g) * 0.2
    n = torch.randn(batch, nh, dqk, device="cuda", generator=g)
    m = torch.randn(batch, nh, device="cuda", generator=g)
    w = (1 + 0.1 * torch.randn(nh * dv, device="cuda", generator=g)).to(torch.bfloat16)
    want, (c1, n1, m1) = decode_cell_reference(proj, gb, c, n, m, w)  # gates rounded to bf16 (proj's dtype)
    cs, ns, ms = c.to(c_dtype), n.clone(), m.clone()
    c0 = cs.clone()
    y = torch.empty(batch, nh * dv, device="cuda", dtype=torch.bfloat16)
    mlstm_decode_cell_(proj, gb, act, cs, ns, ms, w, y, num_heads=nh, cap=15.0)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    tol = 1e-5 if c_dtype == torch.float32 else 5e-3
    errs = {"y": rel(y[act], want[act]), "C": rel(cs[act], c1[act]), "n": rel(ns[act], n1[act]),
            "m": rel(ms[act], m1[act])}
    assert errs["y"] < 1.5e-2 and errs["C"] < tol and errs["n"] < 1e-5 and errs["m"] < 1e-6, errs
    assert torch.equal(cs[~act], c0[~act]) and torch.equal(ns[~act], n[~act]) and torch.equal(ms[~act], m[~act])


def test_prefill_graph_replay_equals_its_eager_run_and_generation():
    """A captured prefill bucket replays exactly what the same bucket computes eagerly (bitwise: same
    kernels, same shapes), with and without a start state, and greedy generation with prefill graphs
    gives the tokens of the plain chunked prefill."""
    from fastxlstm.engine.prefill_graph import PrefillGraphs

    model = _model()
    eng = Engine(model, max_slots=4)
    runner = eng.runner
    graphs, eager = runner.prefill_graphs, PrefillGraphs(runner, capture=False)
    assert graphs is not None and graphs.capture_graphs
    g = torch.Generator(device="cuda").manual_seed(3)
    ids = torch.randint(3, CFG.vocab_size, (3, 300), device="cuda", generator=g)
    start = runner.forward_tokens(ids[:, :40].contiguous())[1]
    for st in (None, start):
        got = graphs.run(ids, st, [300, 17, 256])
        want = eager.run(ids, st, [300, 17, 256])
        assert torch.equal(got[0], want[0])
        for la, lb in zip(got[1], want[1]):
            assert all(torch.equal(a, b) for a, b in zip(la, lb))
    assert (4, 384) in graphs.captured
    prompts = [list(range(3, 40)), [5, 6, 7], list(range(100, 400))]
    with_graphs = _run(eng, prompts, 24)
    without = _run(Engine(_model(), max_slots=4, prefill_graphs=False), prompts, 24)
    assert with_graphs == without


def test_prefill_sample_decode_never_wait_for_the_gpu():
    """The engine's hot path (prefill into slots through the prefill graphs, first-token sampling, decode
    steps) makes no synchronising CUDA call once its graphs are captured: sync debug mode 'error' raises on
    any (blocking copies, ``.item()``, 0-dim writes of host scalars)."""
    eng = Engine(_model(), max_slots=4)
    slots = [eng.allocate_slot() for _ in range(2)]
    prompts = [list(range(3, 300)), list(range(5, 40))]
    eng.sample(slots, eng.prefill_into_slots(slots, prompts))
    eng.decode_step(slots)
    eng.decode_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eng.sample(slots, eng.prefill_into_slots(slots, prompts))
        eng.decode_step(slots)
        for _ in range(3):
            eng.decode_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
