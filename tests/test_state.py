"""The shared recurrent-state helpers (``fastxlstm.state``) against the model's own state and plain tensor ops."""

from __future__ import annotations

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine.state import SequenceState
from fastxlstm.state import (
    FlatState,
    clone_state,
    split_state,
    stack_states,
    state_nbytes,
    state_tensors,
    state_to,
    zero_model_state,
)

from .helpers import perturbed_model

CFG = XLSTMConfig(vocab_size=64, embedding_dim=32, num_blocks=2, num_heads=2)


@pytest.fixture(scope="module")
def model_and_state():
    """The tiny model and the batch-3 state it returns after 5 tokens per row."""
    model = perturbed_model(CFG)
    ids = torch.randint(0, CFG.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, state = model(ids)
    return model, ids, state


def test_zero_model_state_is_what_the_model_means_by_none(model_and_state):
    model, ids, state = model_and_state
    zeros = zero_model_state(CFG, 3)
    assert [[(t.shape, t.dtype) for t in layer] for layer in zeros] == \
        [[(t.shape, t.dtype) for t in layer] for layer in state]
    assert all(float(t.abs().max()) == 0 for t in state_tensors(zeros))
    with torch.no_grad():
        logits_none, _ = model(ids)
        logits_zero, _ = model(ids, zeros)
    torch.testing.assert_close(logits_zero, logits_none, rtol=0, atol=0)


def test_state_nbytes_counts_every_tensor(model_and_state):
    _, _, state = model_and_state
    nh, dqk, dv = CFG.num_heads, CFG.qk_head_dim, CFG.v_head_dim
    assert state_nbytes(state) == CFG.num_blocks * 3 * nh * (dqk * dv + dqk + 1) * 4  # float32
    assert state_nbytes([tuple(t.to(torch.float64) for t in layer) for layer in state]) == 2 * state_nbytes(state)
    assert len(state_tensors(state)) == 3 * CFG.num_blocks


def test_split_then_stack_is_the_identity_and_rows_are_the_sequences_alone(model_and_state):
    model, ids, state = model_and_state
    rows = split_state(state, 3)
    assert all(t.shape[0] == 1 for row in rows for t in state_tensors(row))
    restacked = stack_states(rows, "cpu")
    for a, b in zip(state_tensors(restacked), state_tensors(state)):
        assert torch.equal(a, b)
    with torch.no_grad():  # row j is the state of sequence j run alone
        _, alone = model(ids[1:2])
    for a, b in zip(state_tensors(rows[1]), state_tensors(alone)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_split_copies_or_views(model_and_state):
    _, _, state = model_and_state
    base = clone_state(state)
    copies, views = split_state(base, 3), split_state(base, 3, copy=False)
    base[0][0][2].fill_(7.0)  # row 2 of block 0's C
    assert float(views[2][0][0].min()) == 7.0
    assert torch.equal(copies[2][0][0], state[0][0][2:3])
    assert all(v.data_ptr() != c.data_ptr() for v, c in zip(state_tensors(views[2]), state_tensors(copies[2])))


def test_stack_states_none_and_mixing():
    assert stack_states([None, None], "cpu") is None
    with pytest.raises(ValueError, match="with and without a start state"):
        stack_states([None, zero_model_state(CFG, 1)], "cpu")


@pytest.mark.parametrize("packed", [False, True])
def test_clone_state_shares_no_tensor(model_and_state, packed):
    """Plain and packed copies (packed: views of one buffer per dtype, one multi-tensor copy) equal the state,
    share no memory with it (nor, packed, with each other), and keep each tensor's shape and dtype."""
    _, _, state = model_and_state
    state = [(c.to(torch.bfloat16), n, m) for c, n, m in state]  # two dtypes
    copy = clone_state(state, packed=packed)
    for a, b in zip(state_tensors(copy), state_tensors(state)):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.untyped_storage().data_ptr() != \
            b.untyped_storage().data_ptr()
    storages = {t.untyped_storage().data_ptr() for t in state_tensors(copy)}
    assert len(storages) == (2 if packed else len(state_tensors(copy)))
    before = [t.clone() for t in state_tensors(copy)]
    copy[1][2].add_(1.0)
    assert not torch.equal(copy[1][2], state[1][2])
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(state_tensors(copy), before)) if i != 5)


def test_state_to_same_device_copies_nothing(model_and_state):
    _, _, state = model_and_state
    moved = state_to(state, "cpu")
    assert all(a is b for a, b in zip(state_tensors(moved), state_tensors(state)))
    seq = SequenceState(split_state(state, 3)[0], [1, 2], logits=torch.zeros(CFG.vocab_size))
    assert all(torch.equal(a, b) for a, b in zip(state_tensors(seq.to("cpu").layers), state_tensors(seq.layers)))


def test_flat_state_views_are_one_row_per_sequence(model_and_state):
    _, _, state = model_and_state
    flat = FlatState(3, CFG.num_blocks, CFG.num_heads, CFG.qk_head_dim, CFG.v_head_dim, torch.device("cpu"))
    views = flat.views(flat.buffer)
    torch._foreach_copy_(state_tensors(views), state_tensors(state))
    for a, b in zip(state_tensors(views), state_tensors(state)):
        assert torch.equal(a, b) and a.data_ptr() >= flat.buffer.data_ptr()
    # row j of the buffer is sequence j's whole state, block after block, C then n then m
    row = torch.cat([t[1].reshape(-1) for t in state_tensors(state)])
    assert torch.equal(flat.buffer[1], row)
    assert flat.buffer.shape[1] == state_nbytes(split_state(state, 3)[0]) // 4
