"""The packed state (``fastxlstm.state.PackedState``: a prefill graph's rows of one flat buffer) and the one-op
paths that take it -- slot loads, prefix-cache inserts and hits -- against the per-tensor paths they replace,
bitwise; and the sampler's packed slot configuration against the one fill per field it replaces."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import Engine
from fastxlstm.engine.backend import EngineSlotBackend
from fastxlstm.engine.prefill_graph import PrefillGraphs
from fastxlstm.engine.sampler import SlotSampler
from fastxlstm.sampling import MAX_STOP_TOKEN_IDS, SamplingParams
from fastxlstm.serving.prefix_cache import PrefixCache, entry_nbytes
from fastxlstm.state import FlatState, PackedState, clone_state, split_state, stack_states, state_nbytes, state_tensors

from .helpers import perturbed_model

CFG = XLSTMConfig(vocab_size=259, embedding_dim=64, num_blocks=3, num_heads=2, weight_mode="fused", chunk_size=16)


def _packed(batch: int, seed: int = 0) -> PackedState:
    layout = FlatState(batch, CFG.num_blocks, CFG.num_heads, CFG.qk_head_dim, CFG.v_head_dim, torch.device("cpu"))
    flat = torch.randn(layout.buffer.shape, generator=torch.Generator().manual_seed(seed))
    return layout.packed(flat)


def _plain(state) -> list:
    """The same values as separate tensors (what the per-tensor paths took)."""
    return [tuple(t.clone() for t in layer) for layer in state]


def _same(a, b) -> bool:
    ta, tb = state_tensors(a), state_tensors(b)
    return len(ta) == len(tb) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
                                      for x, y in zip(ta, tb))


def test_packed_state_reads_as_its_views_and_copies_with_one_op():
    p = _packed(3)
    assert len(p) == CFG.num_blocks and p.batch == 3
    assert _same(p, p.layout.views(p.flat)) and p[1] is p.views()[1]
    # the flat layout: block after block, C then n then m, each flattened
    assert torch.equal(p.flat[2], torch.cat([t[2].reshape(-1) for t in state_tensors(p)]))
    rows, copies = split_state(p, 3, copy=False), split_state(p, 3)
    assert all(isinstance(r, PackedState) and r.batch == 1 for r in rows + copies)
    for j in range(3):
        assert _same(rows[j], [tuple(t[j:j + 1] for t in layer) for layer in p])
        assert _same(copies[j], rows[j])
        assert rows[j].flat.data_ptr() == p.flat[j].data_ptr() and copies[j].flat.data_ptr() != p.flat[j].data_ptr()
    c = clone_state(rows[1], packed=True)
    assert isinstance(c, PackedState) and _same(c, rows[1])
    c.flat.add_(1.0)
    assert not torch.equal(c.flat, rows[1].flat)
    plain = clone_state(rows[1])
    assert isinstance(plain, list) and _same(plain, rows[1]) and len({t.data_ptr() for t in state_tensors(plain)}) == 9
    assert state_nbytes(rows[0]) == state_nbytes(_plain(rows[0]))
    stacked = stack_states([rows[2], rows[0]], "cpu")
    assert isinstance(stacked, PackedState) and _same(stacked, stack_states([_plain(rows[2]), _plain(rows[0])], "cpu"))
    with pytest.raises(ValueError, match="float32"):
        PackedState(p.flat[:, :5], p.layout)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_a_packed_slot_load_equals_the_per_tensor_load(state_dtype):
    """Loading a packed row (one split, one multi-tensor copy into the slot's row views) leaves every slot state
    bitwise as loading the same values tensor by tensor does (C rounded to the storage dtype alike); the other
    slots keep theirs."""
    model = perturbed_model(CFG)
    a, b = (Engine(model, max_slots=4, state_dtype=state_dtype) for _ in range(2))
    for eng in (a, b):
        for _ in range(4):
            eng.allocate_slot()
    base = _packed(4, seed=1)
    for s, row in enumerate(split_state(base, 4)):  # every slot holds something first
        a.set_slot_state(s, _plain(row))
        b.set_slot_state(s, _plain(row))
    for slot, row in ((2, 3), (0, 1), (3, 3)):
        new = _packed(4, seed=10 + slot).row(row)
        a.set_slot_state(slot, new)
        b.set_slot_state(slot, _plain(new))
        assert _same(a.states, b.states)
        assert _same(a.get_slot_state(slot), new) == (state_dtype == "float32")
    with pytest.raises(ValueError, match="layers"):
        a.set_slot_state(0, FlatState(1, 1, 1, 1, 1, torch.device("cpu")).packed(torch.zeros(1, 3)))
    other = FlatState(1, CFG.num_blocks, 1, CFG.qk_head_dim, CFG.v_head_dim, torch.device("cpu"))  # other heads
    with pytest.raises(ValueError, match="shape"):
        a.set_slot_state(0, other.packed(other.buffer))


def test_backend_prefill_rows_load_and_cache_as_the_per_tensor_paths():
    """A batched prefill through the (emulated) prefill graphs returns packed rows; the prefix cache stores and
    returns them (same byte count as the tensors) and the slot loads them, all equal to the plain path."""
    model = perturbed_model(CFG)
    be = EngineSlotBackend(model, 4)
    be.engine.runner.prefill_graphs = PrefillGraphs(be.engine.runner, capture=False)
    prompts = [list(range(3, 40)), [7, 8, 9], list(range(50, 61))]
    logits, states = be.prefill_batch(prompts, [None] * 3)
    assert all(isinstance(s, PackedState) for s in states)
    cache = PrefixCache(1 << 30)
    for p, s, lg in zip(prompts, states, logits):
        assert entry_nbytes(s, lg, len(p)) == entry_nbytes(_plain(s), lg, len(p))
        assert cache.insert(p, s, lg)
    assert cache.bytes == sum(entry_nbytes(_plain(s), lg, len(p)) for p, s, lg in zip(prompts, states, logits))
    hit = cache.lookup(prompts[0] + [5, 6])
    assert hit.length == len(prompts[0]) and isinstance(hit.state, PackedState) and _same(hit.state, states[0])
    for slot, s in enumerate(states):
        be.load(slot, s)
    for slot, s in enumerate(states):
        assert _same(be.read(slot), s)
    # continuing a packed state (a cache hit): the start buffer is copied whole, the result is the plain one's
    _, cont = be.prefill([5, 6], hit.state)
    _, want = be.prefill([5, 6], _plain(hit.state))
    assert _same(cont, want)


def _configure_by_fields(s: SlotSampler, slot: int, params: SamplingParams, history, counter: int, seed: int):
    """The per-field configuration the packed one replaced (one fill or copy per field)."""
    one = slice(slot, slot + 1)
    s.params[slot] = params
    for name, value in (("temperature", params.temperature), ("top_p", params.top_p), ("min_p", params.min_p),
                        ("repetition", params.repetition_penalty), ("presence", params.presence_penalty),
                        ("frequency", params.frequency_penalty)):
        getattr(s, name)[one].fill_(float(value))
    s.top_k[one].fill_(int(params.top_k))
    s.seed[one].fill_(int(seed) & ((1 << 63) - 1))
    s.counter[one].fill_(int(counter))
    s.remaining[one].fill_(int(params.max_new_tokens))
    stops = list(params.stop_token_ids) + ([] if params.ignore_eos or s.eos_token_id is None else [s.eos_token_id])
    s.stop_ids[one] = torch.tensor(stops + [-1] * (MAX_STOP_TOKEN_IDS - len(stops)))[None]
    s.bias_ids[one].zero_()
    s.bias_values[one].zero_()
    if params.logit_bias:
        k = len(params.logit_bias)
        s.bias_ids[slot, :k] = torch.tensor(list(params.logit_bias))
        s.bias_values[slot, :k] = torch.tensor(list(params.logit_bias.values()))
    s.seen[one] = False
    s.counts[one].zero_()
    if len(history):
        s.seen[slot].index_fill_(0, torch.as_tensor(list(history)), True)
    s.pos[one].zero_()
    s._read_pos[slot] = 0
    s.allow[one].fill_(-1)
    s.masked[slot] = False


def test_packed_sampler_configure_equals_one_fill_per_field():
    n, vocab = 5, 300
    a, b = (SlotSampler(n, vocab, torch.device("cpu"), history=8, eos_token_id=2) for _ in range(2))
    g = torch.Generator().manual_seed(0)
    for name, t in vars(a).items():  # both start from the same garbage everywhere
        if isinstance(t, torch.Tensor) and not name.startswith("_"):
            junk = (torch.rand(t.shape, generator=g) * 7).to(t.dtype)
            t.copy_(junk)
            getattr(b, name).copy_(junk)
    cases = [
        (1, SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                           presence_penalty=0.3, frequency_penalty=-0.2, seed=1 << 62, max_new_tokens=9,
                           stop_token_ids=[4, 7], logit_bias={3: 2.5, 11: -1.0}), [5, 6, 6, 299], 3),
        (4, SamplingParams(max_new_tokens=1 << 40, ignore_eos=True), (), 0),
        (0, SamplingParams(temperature=1.3, top_p=1 / 3, stop_token_ids=list(range(10, 10 + MAX_STOP_TOKEN_IDS - 1))),
         torch.tensor([1, 2]), 7),
        (1, SamplingParams(), [9], 0),  # a reused slot: nothing of its previous parameters stays
    ]
    for slot, params, history, counter in cases:
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        a.configure(slot, dataclasses.replace(params, seed=seed), history, counter)
        _configure_by_fields(b, slot, dataclasses.replace(params, seed=seed), history, counter, seed)
        for name, t in vars(a).items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, getattr(b, name)), name
        assert a._read_pos == b._read_pos and a.masked == b.masked
