"""Forward kernels of the chunkwise mLSTM (two-level tiling as in Tiled Flash Linear Attention).

Notation (per batch*head ``bh``; chunks of ``L`` tokens, the state granularity): ``b_t`` is the
cumulative sum of ``logsigmoid(f)`` inside the chunk, ``g`` its value at the chunk's end,
``a_s = (g - b_s) + i_s`` the log weight of token ``s`` in the next chunk state, ``m_c`` the
stabiliser of the state entering chunk ``c`` (``m_{c+1} = max(g + m_c, max_s a_s)``, as in the
reference) and ``m_t = b_t + max(m_c, max_{s<=t in chunk}(i_s - b_s))`` the per-token stabiliser.
The decay weight between query ``t`` and key ``s`` of one chunk is
``D_ts = exp((b_t - b_s) + (i_s - m_t))`` (<= 1; written so that no large ``b`` is rounded before
the difference, as in the reference), that of the incoming state ``exp(b_t + m_c - m_t)``.

1. :func:`fwd_gates_kernel` -- per chunk, in parallel: ``b``, ``a``, the running max of ``i - b``,
   ``g`` and ``max a``.
2. :func:`fwd_states_kernel` -- the inter-chunk recurrence, one program per (DQK tile, DV tile, bh);
   everything it loads is independent of the carried state, so the loads pipeline. Writes the state
   entering every chunk, ``m_c`` and the final state.
3. :func:`fwd_out_kernel` -- outputs, one program per (query tile, bh[, DV part]): the scores of the
   query tile against its whole chunk are computed once, then reused for every DV tile together with
   the chunk state.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    causal_decay,
    chunk_rows,
    dv_part,
    fast,
    load_tile,
    logsigmoid,
    max_fn,
    state_dot,
    store_tile,
    tuned,
)


@triton.jit
def fwd_gates_kernel(IG, F, BB, AA, CM, GC, AC, S, NC, L: tl.constexpr):
    ci = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    t = ci * L + tl.arange(0, L)
    mt = t < S
    fg = tl.load(F + bh * S + t, mask=mt, other=0.0)
    ig = tl.load(IG + bh * S + t, mask=mt, other=0.0)
    ls = tl.where(mt, logsigmoid(fg), 0.0)
    b = tl.cumsum(ls, axis=0)
    g = tl.min(tl.where(mt, b, float("inf")), axis=0)  # b at the chunk's last token (b is non-increasing)
    a = tl.where(mt, (g - b) + ig, -float("inf"))
    cm = tl.associative_scan(tl.where(mt, ig - b, -float("inf")), 0, max_fn)
    tl.store(BB + bh * S + t, b, mask=mt)
    tl.store(AA + bh * S + t, a, mask=mt)
    tl.store(CM + bh * S + t, cm, mask=mt)
    tl.store(GC + bh * NC + ci, g)
    tl.store(AC + bh * NC + ci, tl.max(a, axis=0))


@triton.jit
def fwd_states_kernel(
    K, V, AA, GC, AC, C0, N0, M0,  # inputs
    CS, NS, MC,  # per-chunk states (entering each chunk) and stabilisers m_c (NC + 1 of them)
    CN, NN, MN,  # final state (fp32)
    S, NC, NH, SKB, SKH, SKT, SVB, SVH, SVT,  # heads per batch row; batch, head and token strides of K, V
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, WRITE_FINAL: tl.constexpr, PREC: tl.constexpr, TK,
):
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < DQK
    mv = offs_v < DV
    mkv = mk[:, None] & mv[None, :]
    offs_l = tl.arange(0, L)
    writer = (pid_k == 0) & (pid_v == 0)
    if HAS_INIT:
        c = load_tile(C0 + bh * DQK * DV, offs_k, mk, offs_v, mv, DV)
        n = tl.load(N0 + bh * DQK + offs_k, mask=mk, other=0.0)
        m = tl.load(M0 + bh)
    else:
        c = tl.zeros([BK, BV], dtype=tl.float32)
        n = tl.zeros([BK], dtype=tl.float32)
        m = tl.sum(tl.zeros([BK], dtype=tl.float32), axis=0)
    k_base = K + (bh // NH) * SKB + (bh % NH) * SKH
    v_base = V + (bh // NH) * SVB + (bh % NH) * SVH
    # the gate values of the next chunk are loaded one iteration ahead (they gate the dot)
    a_nx = tl.load(AA + bh * S + offs_l, mask=offs_l < S, other=-float("inf"))
    g_nx = tl.load(GC + bh * NC)
    am_nx = tl.load(AC + bh * NC)
    for ci in range(NC):
        a, g, amax = a_nx, g_nx, am_nx
        nxt = ci + 1 < NC
        t_nx = (ci + 1) * L + offs_l
        a_nx = tl.load(AA + bh * S + t_nx, mask=t_nx < S, other=-float("inf"))  # t_nx >= S past the end
        g_nx = tl.load(GC + bh * NC + ci + 1, mask=nxt, other=0.0)
        am_nx = tl.load(AC + bh * NC + ci + 1, mask=nxt, other=0.0)
        s_off = (bh * NC + ci) * DQK
        tl.store(CS + s_off * DV + offs_k[:, None] * DV + offs_v[None, :], c.to(CS.dtype.element_ty), mask=mkv)
        tl.store(NS + s_off + offs_k, n, mask=mk & (offs_k * 0 + pid_v == 0))
        tl.store(MC + bh * (NC + 1) + ci, m, mask=writer)
        t0 = tl.cast(ci * L, tl.int64)  # the chunk's first token: int64 row offsets, int32 ones inside the tile
        mt = offs_l < S - ci * L
        kt = tl.load(k_base + t0 * SKT + offs_l[None, :] * SKT + offs_k[:, None], mask=mt[None, :] & mk[:, None],
                     other=0.0)
        vt = load_tile(v_base + t0 * SVT, offs_l, mt, offs_v, mv, SVT)
        m_next = tl.maximum(g + m, amax)
        decay = tl.exp(g + m - m_next)
        e = tl.exp(a - m_next)  # weight of each token in the next state, <= 1
        ve = (vt.to(tl.float32) * e[:, None]).to(vt.dtype)
        c = decay * c + tl.dot(kt, ve, input_precision=PREC)
        n = decay * n + tl.sum(kt.to(tl.float32) * e[None, :], axis=1)
        m = m_next
    tl.store(MC + bh * (NC + 1) + NC, m, mask=writer)
    if WRITE_FINAL:
        tl.store(MN + bh, m, mask=writer)
        tl.store(CN + bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], c, mask=mkv)
        tl.store(NN + bh * DQK + offs_k, n, mask=mk & (offs_k * 0 + pid_v == 0))


@triton.jit
def fwd_out_kernel(
    Q, K, V, IG, BB, CM, CS, NS, MC, H, MM, DEN,
    S, NC, NH, SQB, SQH, SQT, SKB, SKH, SKT, SVB, SVH, SVT,  # heads per batch row; strides of Q, K, V
    scale, eps,
    DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, L: tl.constexpr,
    BLQ: tl.constexpr, BV: tl.constexpr, NVP: tl.constexpr,
    PREC: tl.constexpr, STATE_F32: tl.constexpr, TK,
):
    pid_q = tl.program_id(0)
    pid_v = tl.program_id(1)  # which of the NVP parts of DV this program writes
    bh = tl.program_id(2).to(tl.int64)
    ci, offs_t, mt, offs_s, ms, offs_d, md = chunk_rows(pid_q, S, DQK, DQKP, L, BLQ)  # a query tile, its chunk
    g_base = bh * S
    # q rows from the tile's first token, k and v rows from the chunk's (int64 bases, int32 offsets in the tile)
    bi = bh // NH
    hi = bh % NH
    lt = tl.arange(0, BLQ)
    ls = tl.arange(0, L)
    q_base = Q + bi * SQB + hi * SQH + tl.cast(pid_q * BLQ, tl.int64) * SQT
    k_base = K + bi * SKB + hi * SKH + tl.cast(ci * L, tl.int64) * SKT
    v_base = V + bi * SVB + hi * SVH + tl.cast(ci * L, tl.int64) * SVT
    q = load_tile(q_base, lt, mt, offs_d, md, SQT)
    bt = tl.load(BB + g_base + offs_t, mask=mt, other=0.0)
    mc = tl.load(MC + bh * (NC + 1) + ci)
    m_t = bt + tl.maximum(tl.load(CM + g_base + offs_t, mask=mt, other=0.0), mc)
    w = tl.exp(bt + mc - m_t) * scale
    # scores of the query tile against the whole chunk (keys after the query are masked)
    kc = load_tile(k_base, ls, ms, offs_d, md, SKT)
    i_s = tl.load(IG + g_base + offs_s, mask=ms, other=0.0)
    b_s = tl.load(BB + g_base + offs_s, mask=ms, other=0.0)
    d = causal_decay(offs_t, mt, bt, m_t, offs_s, ms, b_s, i_s, KEYS_ON_ROWS=False)
    sd = tl.dot(q, tl.trans(kc), input_precision=PREC) * scale * d
    s_off = (bh * NC + ci) * DQK
    qn = tl.zeros([BLQ], dtype=tl.float32)
    for d0 in tl.static_range(0, DQKP, 64):  # q . n_c in fp32, a slice at a time (few registers)
        offs_e = d0 + tl.arange(0, 64)
        me = offs_e < DQK
        qs = load_tile(q_base, lt, mt, offs_e, me, SQT)
        qn += tl.sum(qs.to(tl.float32) * tl.load(NS + s_off + offs_e, mask=me, other=0.0)[None, :], axis=1)
    den = tl.sum(sd, axis=1) + qn * w
    dd = tl.maximum(tl.abs(den), tl.exp(-m_t)) + eps
    sdq = sd.to(q.dtype)
    h_base = H + bh * S * DV
    v_start, v_end = dv_part(pid_v, DV, NVP)
    for v0 in range(v_start, v_end, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = (offs_v < DV) & (offs_v < v_end)
        cst = load_tile(CS + s_off * DV, offs_d, md, offs_v, mv, DV)
        vt = load_tile(v_base, ls, ms, offs_v, mv, SVT)
        acc = state_dot(q, cst, PREC, STATE_F32) * w[:, None] + tl.dot(sdq, vt, input_precision=PREC)
        store_tile(h_base, offs_t, mt, offs_v, mv, DV, acc / dd[:, None])
    first = offs_t * 0 + pid_v == 0
    tl.store(MM + g_base + offs_t, m_t, mask=mt & first)
    tl.store(DEN + g_base + offs_t, den, mask=mt & first)


# Launchers (the tuned ones keyed by :data:`TUNE_KEY`).
fwd_gates = fast(fwd_gates_kernel)

STATES_KEYS = ("BK", "BV")
OUT_KEYS = ("BLQ", "BV", "NVP")
# rows: the constexprs named, then num_warps, num_stages (a single-stage row of an intra-chunk kernel
# is for fp32 inputs only, see ``_common._fits``). The last two state rows (the first one's loop pipelined 3 and
# 4 deep) and the last output row (128-row query tiles, DV in two parts) were added for the latency-bound
# small-S forward (``benchmarks/kernel_bench.py --sweep``, H100 2026-11-25, kernels_NOTES.md v5); they change only
# pipelining and work split, not the arithmetic of an output element.
fwd_states = tuned(fwd_states_kernel, " ".join(STATES_KEYS), interpret=(16, 16), rows=[
    (64, 64, 4, 2), (64, 64, 8, 3), (64, 128, 8, 2), (64, 64, 4, 1), (64, 64, 4, 3), (64, 64, 4, 4)])
fwd_out = tuned(fwd_out_kernel, " ".join(OUT_KEYS), interpret=(16, 16, 2), rows=[
    (64, 32, 1, 8, 2), (64, 64, 1, 8, 2), (64, 32, 2, 8, 2), (128, 64, 1, 8, 2), (64, 32, 1, 8, 1),
    (128, 64, 2, 8, 2)])
