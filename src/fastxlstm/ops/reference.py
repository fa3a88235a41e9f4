"""The stabilised mLSTM cell in plain PyTorch, three ways that compute the same function.

Notation (per batch element and head): gates are preactivations ``i_t`` and ``f_t``;
``b_t = sum_{s<=t} logsigmoid(f_s)``. The memory is ``C_t = f_t C_{t-1} + i_t k_t v_t^T``,
the normaliser ``n_t = f_t n_{t-1} + i_t k_t``, both kept divided by ``exp(m_t)`` where the
stabiliser ``m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)`` is the running max of the log
weights. The output is ``h_t = C_t^T q~_t / (max(|n_t . q~_t|, exp(-m_t)) + eps)`` with
``q~ = q / sqrt(DQK)``. A missing initial state means zeros (``m_0 = 0``), as in the
official code and transformers.

All three forms compute in float32, or float64 when given float64 inputs (used as the
high-precision reference for the kernels), and return ``h`` in the input dtype and the
state ``(C [B,NH,DQK,DV], n [B,NH,DQK], m [B,NH])`` in the compute dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..state import State, zero_state


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _state_or_zeros(state: State | None, q: Tensor, v: Tensor, dtype: torch.dtype) -> State:
    if state is None:
        return zero_state(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], q.device, dtype)
    c, n, m = state
    return c.to(dtype), n.to(dtype), m.to(dtype)


def mlstm_step_reference(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State | None = None, eps: float = 1e-6
) -> tuple[Tensor, State]:
    """One recurrent step. q,k ``[B,NH,DQK]``, v ``[B,NH,DV]``, i,f ``[B,NH]``."""
    dt = _compute_dtype(q)
    c, n, m = _state_or_zeros(state, q, v, dt)
    qf, kf, vf, i, f = q.to(dt), k.to(dt), v.to(dt), i.to(dt), f.to(dt)
    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m, i)
    f_act = torch.exp(log_f + m - m_new)
    i_act = torch.exp(i - m_new)
    c_new = f_act[..., None, None] * c + i_act[..., None, None] * (kf[..., :, None] * vf[..., None, :])
    n_new = f_act[..., None] * n + i_act[..., None] * kf
    q_scaled = qf * (q.shape[-1] ** -0.5)
    num = torch.einsum("bhd,bhdv->bhv", q_scaled, c_new)
    qn = (q_scaled * n_new).sum(-1)
    den = torch.maximum(qn.abs(), torch.exp(-m_new)) + eps
    h = num / den[..., None]
    return h.to(q.dtype), (c_new, n_new, m_new)


def mlstm_recurrent_reference(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, initial_state: State | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """Loop of :func:`mlstm_step_reference` over the sequence. q,k ``[B,NH,S,DQK]``."""
    state = initial_state
    hs = []
    for t in range(q.shape[2]):
        h, state = mlstm_step_reference(
            q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state, eps
        )
        hs.append(h)
    if state is None:  # empty sequence
        state = _state_or_zeros(None, q, v, _compute_dtype(q))
    return torch.stack(hs, dim=2) if hs else v.new_zeros(v.shape), state


def mlstm_parallel_reference(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, initial_state: State | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """Fully parallel (quadratic in S) form, with the initial state as an extra term."""
    dt = _compute_dtype(q)
    c0, n0, m0 = _state_or_zeros(initial_state, q, v, dt)
    qf, kf, vf, i, f = q.to(dt), k.to(dt), v.to(dt), i.to(dt), f.to(dt)
    seq = q.shape[2]
    b = torch.cumsum(F.logsigmoid(f), dim=-1)  # [B,NH,S]
    log_d = b[..., :, None] - b[..., None, :] + i[..., None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    log_d = torch.where(causal, log_d, torch.full_like(log_d, -math.inf))
    log_init = b + m0[..., None]
    m = torch.maximum(log_init, log_d.amax(dim=-1))
    q_scaled = qf * (q.shape[-1] ** -0.5)
    scores = (q_scaled @ kf.transpose(-1, -2)) * torch.exp(log_d - m[..., None])
    w_init = torch.exp(log_init - m)
    num = scores @ vf + w_init[..., None] * (q_scaled @ c0)
    den = scores.sum(-1) + w_init * (q_scaled @ n0[..., None]).squeeze(-1)
    h = num / (torch.maximum(den.abs(), torch.exp(-m)) + eps)[..., None]
    # Final state: decay every contribution to the last position.
    b_last = b[..., -1]
    log_w = b_last[..., None] - b + i
    m_last = torch.maximum(b_last + m0, log_w.amax(dim=-1))
    k_w = kf * torch.exp(log_w - m_last[..., None])[..., None]
    w0 = torch.exp(b_last + m0 - m_last)
    c = w0[..., None, None] * c0 + k_w.transpose(-1, -2) @ vf
    n = w0[..., None] * n0 + k_w.sum(dim=2)
    return h.to(q.dtype), (c, n, m_last)


def _chunk_states(
    k: Tensor, v: Tensor, i: Tensor, b: Tensor, state: State
) -> tuple[Tensor, Tensor, Tensor, State]:
    """Phase 1 (inter-chunk recurrence). Inputs are chunked: k ``[B,NH,NC,L,DQK]``,
    b (within-chunk cumsum of log f) ``[B,NH,NC,L]``. Returns the states entering each chunk
    (``[B,NH,NC,...]``) and the final state."""
    c, n, m = state
    g = b[..., -1]  # total log forget per chunk  [B,NH,NC]
    a = g[..., None] - b + i  # log weight of each token at the chunk end
    a_max = a.amax(dim=-1)
    cs, ns, ms = [], [], []
    for kc in range(k.shape[2]):
        cs.append(c)
        ns.append(n)
        ms.append(m)
        m_next = torch.maximum(g[..., kc] + m, a_max[..., kc])
        k_w = k[:, :, kc] * torch.exp(a[:, :, kc] - m_next[..., None])[..., None]
        decay = torch.exp(g[..., kc] + m - m_next)
        c = decay[..., None, None] * c + k_w.transpose(-1, -2) @ v[:, :, kc]
        n = decay[..., None] * n + k_w.sum(dim=-2)
        m = m_next
    return torch.stack(cs, 2), torch.stack(ns, 2), torch.stack(ms, 2), (c, n, m)


def _chunk_outputs(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, b: Tensor, cs: Tensor, ns: Tensor, ms: Tensor, eps: float
) -> Tensor:
    """Phase 2 (intra-chunk parallel part plus the inter-chunk term), all chunks at once."""
    seq = q.shape[3]
    log_d = b[..., :, None] - b[..., None, :] + i[..., None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    log_d = torch.where(causal, log_d, torch.full_like(log_d, -math.inf))
    m_inter = b + ms[..., None]
    m = torch.maximum(m_inter, log_d.amax(dim=-1))
    q_scaled = q * (q.shape[-1] ** -0.5)
    scores = (q_scaled @ k.transpose(-1, -2)) * torch.exp(log_d - m[..., None])
    w_inter = torch.exp(m_inter - m)
    num = scores @ v + w_inter[..., None] * (q_scaled @ cs)
    den = scores.sum(-1) + w_inter * (q_scaled @ ns[..., None]).squeeze(-1)
    return num / (torch.maximum(den.abs(), torch.exp(-m)) + eps)[..., None]


def _chunkwise_full_chunks(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State, chunk: int, eps: float
) -> tuple[Tensor, State]:
    bsz, nh, seq, dqk = q.shape
    nc = seq // chunk
    qc = q.reshape(bsz, nh, nc, chunk, dqk)
    kc = k.reshape(bsz, nh, nc, chunk, dqk)
    vc = v.reshape(bsz, nh, nc, chunk, v.shape[-1])
    ic = i.reshape(bsz, nh, nc, chunk)
    bc = torch.cumsum(F.logsigmoid(f.reshape(bsz, nh, nc, chunk)), dim=-1)
    cs, ns, ms, final = _chunk_states(kc, vc, ic, bc, state)
    h = _chunk_outputs(qc, kc, vc, ic, bc, cs, ns, ms, eps)
    return h.reshape(bsz, nh, seq, v.shape[-1]), final


def mlstm_chunkwise_reference(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, initial_state: State | None = None,
    chunk_size: int = 64, eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """Chunkwise form (the one the Triton kernels implement), any sequence length.

    Full chunks are processed in two phases (chunk states, then outputs); a trailing
    partial chunk is processed as one shorter chunk starting from the carried state.
    """
    dt = _compute_dtype(q)
    state = _state_or_zeros(initial_state, q, v, dt)
    qf, kf, vf, i, f = q.to(dt), k.to(dt), v.to(dt), i.to(dt), f.to(dt)
    seq = q.shape[2]
    full = (seq // chunk_size) * chunk_size
    outs = []
    if full:
        h, state = _chunkwise_full_chunks(
            qf[:, :, :full], kf[:, :, :full], vf[:, :, :full], i[..., :full], f[..., :full], state,
            chunk_size, eps,
        )
        outs.append(h)
    if seq > full:
        rest = seq - full
        h, state = _chunkwise_full_chunks(
            qf[:, :, full:], kf[:, :, full:], vf[:, :, full:], i[..., full:], f[..., full:], state, rest, eps
        )
        outs.append(h)
    h = torch.cat(outs, dim=2) if outs else vf.new_zeros(vf.shape)
    return h.to(q.dtype), state


def commit_weights(i: Tensor, f: Tensor, m: Tensor, lengths: Tensor, dtype: torch.dtype = torch.float32
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The scalars of the commit of the first ``lengths [B]`` tokens of gates ``i, f [B,NH,T]`` from the
    stabiliser ``m [B,NH]``: ``(m' [B,NH], decay [B,NH], w [B,NH,T])`` in ``dtype``, with
    ``C' = decay * C + sum_t w_t k_t v_t^T`` (see :func:`mlstm_commit_reference_`). Tokens past a row's length
    get ``w = 0`` (neutral gates: ``log f = 0``, ``i = -inf``), a row of length 0 ``decay = 1``."""
    steps = i.shape[-1]
    keep = torch.arange(steps, device=i.device)[None, None, :] < lengths.to(i.device)[:, None, None]  # [B,1,T]
    log_f = torch.where(keep, F.logsigmoid(f.to(dtype)), 0.0)
    g = log_f.sum(-1)  # [B,NH]
    a = g[..., None] - torch.cumsum(log_f, -1) + torch.where(keep, i.to(dtype), -math.inf)  # log weight at the end
    m0 = m.to(dtype)
    m_new = torch.maximum(g + m0, a.amax(-1))
    return m_new, torch.exp(g + m0 - m_new), torch.exp(a - m_new[..., None])


def mlstm_commit_reference_(
    state: State, k: Tensor, v: Tensor, i: Tensor, f: Tensor, lengths: Tensor
) -> None:
    """Advance ``state`` in place over the first ``lengths[b]`` tokens of each row (speculative decoding's
    commit of an accepted prefix). k ``[B,NH,T,DQK]``, v ``[B,NH,T,DV]``, i,f ``[B,NH,T]`` (soft-capped gate
    preactivations), ``lengths [B]`` integers in ``[0, T]`` (0 leaves the row as it is); ``state`` is
    ``(C, n, m)`` as everywhere (``C`` may be stored in a narrower dtype: math in float32, or float64 for
    float64 inputs).

    The same function as ``lengths[b]`` calls of :func:`mlstm_step_reference` (outputs not needed), in
    closed form: with ``g = sum_t log f_t`` and ``a_t = sum_{s>t} log f_s + i_t`` over the accepted tokens,
    ``m' = max(g + m, max_t a_t)`` (the unrolled max recurrence of the step), ``C' = e^{g+m-m'} C +
    sum_t e^{a_t-m'} k_t v_t^T`` and ``n'`` alike: one read and one write of ``C`` for all the tokens."""
    c, n, m = state
    dt = _compute_dtype(k)
    m_new, decay, w = commit_weights(i, f, m, lengths, dt)
    k_w = k.to(dt) * w[..., None]  # [B,NH,T,DQK]
    c.copy_(decay[..., None, None] * c.to(dt) + k_w.transpose(-1, -2) @ v.to(dt))
    n.copy_(decay[..., None] * n.to(dt) + k_w.sum(-2))
    m.copy_(m_new)
