"""The three reference forms of the mLSTM cell agree with each other, and the op API validates input."""

from __future__ import annotations

import pytest
import torch

from fastxlstm.ops import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent, mlstm_step, zero_state


def make_inputs(b=2, nh=3, s=37, dqk=8, dv=12, gate_scale=3.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, nh, s, dqk, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(b, nh, s, dv, generator=g, dtype=dtype)
    i = torch.randn(b, nh, s, generator=g, dtype=dtype) * gate_scale
    f = torch.randn(b, nh, s, generator=g, dtype=dtype) * gate_scale + 1.0
    return q, k, v, i, f


def random_state(b=2, nh=3, dqk=8, dv=12, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, nh, dqk, dv, generator=g, dtype=dtype), torch.randn(b, nh, dqk, generator=g, dtype=dtype),
            torch.randn(b, nh, generator=g, dtype=dtype))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("seq", [1, 7, 16, 33, 64, 65])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gate_scale", [1.0, 15.0])
def test_three_forms_agree_float64(seq, with_state, gate_scale):
    q, k, v, i, f = make_inputs(s=seq, gate_scale=gate_scale)
    state = random_state() if with_state else None
    h_rec, s_rec = mlstm_recurrent(q, k, v, i, f, state)
    h_par, s_par = mlstm_parallel(q, k, v, i, f, state)
    for chunk in (4, 16, 64):
        h_chk, s_chk = mlstm_chunkwise(q, k, v, i, f, state, chunk_size=chunk, backend="reference")
        assert rel(h_chk, h_rec) < 1e-10
        for a, b in zip(s_chk, s_rec):
            assert rel(a, b) < 1e-10
    assert rel(h_par, h_rec) < 1e-10
    for a, b in zip(s_par, s_rec):
        assert rel(a, b) < 1e-10


def test_float32_matches_float64():
    q, k, v, i, f = make_inputs(s=50, gate_scale=15.0)
    h64, _ = mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend="reference")
    h32, _ = mlstm_chunkwise(*(t.float() for t in (q, k, v, i, f)), chunk_size=16, backend="reference")
    assert h32.dtype == torch.float32
    assert rel(h32.double(), h64) < 1e-5


def test_initial_state_matters_and_zero_state_equals_none():
    q, k, v, i, f = make_inputs(s=9)
    h_none, _ = mlstm_chunkwise(q, k, v, i, f, None, chunk_size=4, backend="reference")
    h_zero, _ = mlstm_chunkwise(q, k, v, i, f, zero_state(2, 3, 8, 12, dtype=torch.float64), chunk_size=4,
                                backend="reference")
    h_rand, _ = mlstm_chunkwise(q, k, v, i, f, random_state(), chunk_size=4, backend="reference")
    assert torch.equal(h_none, h_zero)
    assert rel(h_rand, h_none) > 1e-3


def test_split_sequence_equals_whole():
    """Carrying the state across two calls gives the same outputs and final state as one call."""
    q, k, v, i, f = make_inputs(s=40)
    h, st = mlstm_chunkwise(q, k, v, i, f, chunk_size=8, backend="reference")
    h1, st1 = mlstm_chunkwise(q[:, :, :13], k[:, :, :13], v[:, :, :13], i[..., :13], f[..., :13], chunk_size=8,
                              backend="reference")
    h2, st2 = mlstm_chunkwise(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], i[..., 13:], f[..., 13:], st1,
                              chunk_size=8, backend="reference")
    assert rel(torch.cat([h1, h2], 2), h) < 1e-12
    for a, b in zip(st2, st):
        assert rel(a, b) < 1e-12


def test_step_accepts_seq_axis_of_one():
    q, k, v, i, f = make_inputs(s=1)
    h4, s4 = mlstm_step(q, k, v, i, f, backend="reference")
    h3, s3 = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[..., 0], f[..., 0], backend="reference")
    assert h4.shape == (2, 3, 1, 12) and torch.equal(h4[:, :, 0], h3)


def test_extreme_gates_stay_finite():
    q, k, v, i, f = make_inputs(s=70, gate_scale=1.0)
    i = torch.where(torch.rand_like(i) > 0.5, torch.full_like(i, 15.0), torch.full_like(i, -15.0))
    f = torch.where(torch.rand_like(f) > 0.5, torch.full_like(f, 15.0), torch.full_like(f, -15.0))
    h, st = mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend="reference")
    h_rec, _ = mlstm_recurrent(q, k, v, i, f)
    assert torch.isfinite(h).all() and all(torch.isfinite(t).all() for t in st)
    assert rel(h, h_rec) < 1e-10


def test_gradients_flow_through_chunkwise_reference():
    q, k, v, i, f = (t.float().requires_grad_() for t in make_inputs(s=20, dtype=torch.float32))
    h, _ = mlstm_chunkwise(q, k, v, i, f, chunk_size=8, backend="reference")
    h.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, i, f))


def test_op_api_rejects_bad_shapes():
    q, k, v, i, f = make_inputs(s=5)
    with pytest.raises(ValueError, match="q and k"):
        mlstm_chunkwise(q, k[..., :4], v, i, f, backend="reference")
    with pytest.raises(ValueError, match="gate i"):
        mlstm_chunkwise(q, k, v, i[..., :3], f, backend="reference")
    with pytest.raises(ValueError, match="4 dims"):
        mlstm_chunkwise(q[0], k[0], v[0], i[0], f[0], backend="reference")
    with pytest.raises(ValueError, match="state C"):
        mlstm_chunkwise(q, k, v, i, f, (torch.zeros(1), torch.zeros(1), torch.zeros(1)), backend="reference")
    with pytest.raises(ValueError, match="unknown mLSTM backend"):
        mlstm_chunkwise(q, k, v, i, f, backend="cuda-magic")
    with pytest.raises(ValueError, match="one token"):
        mlstm_step(q, k, v, i, f, backend="reference")
