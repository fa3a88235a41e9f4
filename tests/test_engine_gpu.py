"""GPU: the CUDA-graph decode gives the same greedy tokens as the eager engine step and as the
v0 loop; masked slots keep their state bit for bit; chunked prefill matches the model."""

from __future__ import annotations

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import LLM, Engine
from fastxlstm.generation import generate

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
    model = _model()
    ref = _model()
    eng = Engine(model, max_slots=1, prefill_chunk_size=256)
    ids = torch.randint(3, CFG.vocab_size, (1, 1500), device="cuda")
    s = eng.allocate_slot()
    got = eng.prefill_into_slot(s, ids[0])
    with torch.no_grad():
        want, _ = ref(ids, last_logits_only=True)
    rel = ((got - want[0, -1]).norm() / want[0, -1].norm()).item()
    assert rel < 3e-2, rel
