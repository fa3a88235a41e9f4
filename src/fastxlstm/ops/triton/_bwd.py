"""Backward kernels of the chunkwise mLSTM.

The stabilisers are treated as constants here (every chunk state is stored divided by
``exp(m_c)``, so they cancel exactly); what ``m`` changes through ``eps`` and the ``exp(-m_t)``
floor is a per-token term ``gm_t`` routed along the argmax of the stabiliser by the gate kernels.
With ``delta_t = dh_t / Den_t`` and the denominator's gradient
``nu_t = -sign(den_t) [|den_t| > exp(-m_t)] (dh_t . h_t) / Den_t``:

* ``dC'_c = exp(g_c + m_c - m_{c+1}) dC'_{c+1} + sum_{t in c} w_t q~_t [delta_t, nu_t]^T`` (reverse
  recurrence over chunks, :func:`bwd_dstates_kernel`), ``w_t = exp(b_t + m_c - m_t)``;
* ``dq~_t = sum_{s<=t} (delta_t.v_s + nu_t) D_ts k_s + w_t (C_c delta_t + nu_t n_c)`` (:func:`bwd_dq_kernel`);
* ``dk_s = sum_{t>=s} (delta_t.v_s + nu_t) D_ts q~_t + e_s (dC_{c+1} v_s + dn_{c+1})`` and
  ``dv_s = sum_{t>=s} (q~_t.k_s) D_ts delta_t + e_s dC_{c+1}^T k_s`` with ``e_s = exp(a_s - m_{c+1})``
  (:func:`bwd_dk_kernel`, :func:`bwd_dv_kernel`: one program per key tile, looping over DV);
* gates: ``d logsigmoid(f_u) = Lambda + sum_{t>=u} (q_t.dq_t - k_t.dk_t)``, ``di_s = k_s.dk_s``
  (``Lambda = <dC_N, C_N> + <dn_N, n_N>``), plus the routed ``gm`` (:func:`bwd_gates_a_kernel`,
  :func:`bwd_gates_b_kernel`, :func:`bwd_gates_c_kernel`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import causal_decay, chunk_rows, dv_part, fast, load_tile, scale_rows, state_dot, store_tile, tuned


@triton.jit
def bwd_prep_kernel(
    DH, H, DEN, MM, INV, NU, GM, S, eps,
    DV: tl.constexpr, DVP: tl.constexpr, BT: tl.constexpr,
):
    """Per token: 1/Den, nu (the denominator's gradient) and gm (the eps/floor term of dm)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_t = pid * BT + tl.arange(0, BT)
    mt = offs_t < S
    offs_v = tl.arange(0, DVP)
    msk = mt[:, None] & (offs_v < DV)[None, :]
    ptr = bh * S * DV + offs_t[:, None] * DV + offs_v[None, :]
    dh = tl.load(DH + ptr, mask=msk, other=0.0).to(tl.float32)
    h = tl.load(H + ptr, mask=msk, other=0.0).to(tl.float32)
    dhh = tl.sum(dh * h, axis=1)
    g = bh * S + offs_t
    den = tl.load(DEN + g, mask=mt, other=1.0)
    floor = tl.exp(-tl.load(MM + g, mask=mt, other=0.0))
    inv = 1.0 / (tl.maximum(tl.abs(den), floor) + eps)
    sgn = tl.where(den > 0, 1.0, tl.where(den < 0, -1.0, 0.0))
    nu = tl.where(tl.abs(den) > floor, -sgn * dhh * inv, 0.0)
    tl.store(INV + g, inv, mask=mt)
    tl.store(NU + g, nu, mask=mt)
    tl.store(GM + g, -dhh * eps * inv, mask=mt)


@triton.jit
def bwd_dstates_kernel(
    Q, DH, INV, NU, BB, MM, MC, GC, DCN, DNN, DCS, DNS, DC0, DN0,
    S, NC, scale,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DFINAL: tl.constexpr, WRITE_DINIT: tl.constexpr, PREC: tl.constexpr, TK, PREFETCH: tl.constexpr = True,
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
    if HAS_DFINAL:
        gc = load_tile(DCN + bh * DQK * DV, offs_k, mk, offs_v, mv, DV)
        gn = tl.load(DNN + bh * DQK + offs_k, mask=mk, other=0.0)
    else:
        gc = tl.zeros([BK, BV], dtype=tl.float32)
        gn = tl.zeros([BK], dtype=tl.float32)
    q_base = Q + bh * S * DQK
    dh_base = DH + bh * S * DV
    g_base = bh * S
    # per-token coefficients of the next chunk (going backwards) are loaded one iteration ahead (PREFETCH)
    t_nx = (NC - 1) * L + offs_l
    mt_nx = t_nx < S
    mc_nx = tl.load(MC + bh * (NC + 1) + NC - 1)
    decay_nx = tl.exp(tl.load(GC + bh * NC + NC - 1) + mc_nx - tl.load(MC + bh * (NC + 1) + NC))
    w_nx = tl.where(mt_nx, tl.exp(tl.load(BB + g_base + t_nx, mask=mt_nx, other=0.0) + mc_nx
                                  - tl.load(MM + g_base + t_nx, mask=mt_nx, other=0.0)), 0.0)
    inv_nx = tl.load(INV + g_base + t_nx, mask=mt_nx, other=0.0)
    nu_nx = tl.load(NU + g_base + t_nx, mask=mt_nx, other=0.0)
    for cc in range(NC):
        ci = NC - 1 - cc
        if PREFETCH:
            decay, w, inv, nu = decay_nx, w_nx * scale, inv_nx, nu_nx
            pv = ci >= 1
            t_nx = (ci - 1) * L + offs_l
            mt_nx = (t_nx < S) & (t_nx >= 0)
            mc_nx = tl.load(MC + bh * (NC + 1) + ci - 1, mask=pv, other=0.0)
            decay_nx = tl.exp(tl.load(GC + bh * NC + ci - 1, mask=pv, other=0.0) + mc_nx
                              - tl.load(MC + bh * (NC + 1) + ci, mask=pv, other=0.0))
            w_nx = tl.where(mt_nx, tl.exp(tl.load(BB + g_base + t_nx, mask=mt_nx, other=0.0) + mc_nx
                                          - tl.load(MM + g_base + t_nx, mask=mt_nx, other=0.0)), 0.0)
            inv_nx = tl.load(INV + g_base + t_nx, mask=mt_nx, other=0.0)
            nu_nx = tl.load(NU + g_base + t_nx, mask=mt_nx, other=0.0)
        else:
            t_c = ci * L + offs_l
            mt_c = t_c < S
            mc_c = tl.load(MC + bh * (NC + 1) + ci)
            decay = tl.exp(tl.load(GC + bh * NC + ci) + mc_c - tl.load(MC + bh * (NC + 1) + ci + 1))
            w = tl.where(mt_c, tl.exp(tl.load(BB + g_base + t_c, mask=mt_c, other=0.0) + mc_c
                                      - tl.load(MM + g_base + t_c, mask=mt_c, other=0.0)), 0.0) * scale
            inv = tl.load(INV + g_base + t_c, mask=mt_c, other=0.0)
            nu = tl.load(NU + g_base + t_c, mask=mt_c, other=0.0)
        s_off = (bh * NC + ci) * DQK
        tl.store(DCS + s_off * DV + offs_k[:, None] * DV + offs_v[None, :], gc.to(DCS.dtype.element_ty),
                 mask=mkv)
        tl.store(DNS + s_off + offs_k, gn, mask=mk & (offs_k * 0 + pid_v == 0))
        t = ci * L + offs_l
        mt = t < S
        qt = tl.load(q_base + t[None, :] * DQK + offs_k[:, None], mask=mt[None, :] & mk[:, None], other=0.0)
        dht = load_tile(dh_base, t, mt, offs_v, mv, DV)
        qw = qt.to(tl.float32) * w[None, :]
        delta = (dht.to(tl.float32) * inv[:, None]).to(qt.dtype)
        gc = decay * gc + tl.dot(qw.to(qt.dtype), delta, input_precision=PREC)
        gn = decay * gn + tl.sum(qw * nu[None, :], axis=1)
    if WRITE_DINIT:
        tl.store(DC0 + bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], gc, mask=mkv)
        tl.store(DN0 + bh * DQK + offs_k, gn, mask=mk & (offs_k * 0 + pid_v == 0))


@triton.jit
def _dv_dots(A, ra, ma, B, rb, mb, ST, rs, mst, inv, pacc, sacc,
             DV: tl.constexpr, BV: tl.constexpr, SCALE_A: tl.constexpr, PREC: tl.constexpr,
             STATE_F32: tl.constexpr):
    """Sums over the DV tiles of ``a`` (rows ``ra`` of A), ``b`` (rows ``rb`` of B) and ``st`` (rows ``rs``
    of the chunk state ST), all row-major with DV columns: ``pacc + a b^T`` and ``sacc + a st^T``, the rows
    of ``a`` (``SCALE_A``) or else of ``b`` multiplied by ``inv``."""
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < DV
        a = load_tile(A, ra, ma, offs_v, mv, DV)
        b = load_tile(B, rb, mb, offs_v, mv, DV)
        st = load_tile(ST, rs, mst, offs_v, mv, DV)
        if SCALE_A:
            a = scale_rows(a, inv)
        else:
            b = scale_rows(b, inv)
        pacc += tl.dot(a, tl.trans(b), input_precision=PREC)
        sacc += state_dot(a, tl.trans(st), PREC, STATE_F32)
    return pacc, sacc


@triton.jit
def bwd_dq_kernel(
    Q, K, V, DH, IG, BB, MM, MC, INV, NU, CS, NS, DQ, QDQ,
    S, NC, scale,
    DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, L: tl.constexpr,
    BLQ: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, STATE_F32: tl.constexpr, TK,
):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    ci, offs_t, mt, offs_s, ms, offs_d, md = chunk_rows(pid_q, S, DQK, DQKP, L, BLQ)  # a query tile, its chunk
    g_base = bh * S
    bt = tl.load(BB + g_base + offs_t, mask=mt, other=0.0)
    m_t = tl.load(MM + g_base + offs_t, mask=mt, other=0.0)
    inv = tl.load(INV + g_base + offs_t, mask=mt, other=0.0)
    nu = tl.load(NU + g_base + offs_t, mask=mt, other=0.0)
    mc = tl.load(MC + bh * (NC + 1) + ci)
    w = tl.where(mt, tl.exp(bt + mc - m_t), 0.0)
    s_off = (bh * NC + ci) * DQK
    dh_base = DH + bh * S * DV
    v_base = V + bh * S * DV
    # over DV: pacc = delta_t . v_s (delta = dh * inv), dqi = C_c delta_t
    pacc, dqi = _dv_dots(dh_base, offs_t, mt, v_base, offs_s, ms, CS + s_off * DV, offs_d, md, inv,
                         tl.zeros([BLQ, L], dtype=tl.float32), tl.zeros([BLQ, DQKP], dtype=tl.float32),
                         DV, BV, True, PREC, STATE_F32)
    i_s = tl.load(IG + g_base + offs_s, mask=ms, other=0.0)
    b_s = tl.load(BB + g_base + offs_s, mask=ms, other=0.0)
    d = causal_decay(offs_t, mt, bt, m_t, offs_s, ms, b_s, i_s, KEYS_ON_ROWS=False)
    p = (pacc + nu[:, None]) * d
    kc = load_tile(K + bh * S * DQK, offs_s, ms, offs_d, md, DQK)
    nst = tl.load(NS + s_off + offs_d, mask=md, other=0.0)
    acc = (dqi + nu[:, None] * nst[None, :]) * w[:, None] + tl.dot(p.to(kc.dtype), kc, input_precision=PREC)
    dq = acc * scale
    ptr = bh * S * DQK + offs_t[:, None] * DQK + offs_d[None, :]
    mtd = mt[:, None] & md[None, :]
    tl.store(DQ + ptr, dq.to(DQ.dtype.element_ty), mask=mtd)
    q = tl.load(Q + ptr, mask=mtd, other=0.0).to(tl.float32)
    tl.store(QDQ + g_base + offs_t, tl.sum(q * dq, axis=1), mask=mt)


@triton.jit
def bwd_dk_kernel(
    Q, K, V, DH, IG, BB, MM, AA, MC, INV, NU, DCS, DNS, DK, KDK,
    S, NC, scale,
    DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, L: tl.constexpr,
    BLK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, STATE_F32: tl.constexpr, TK,
):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    ci, offs_s, ms, offs_t, mt, offs_d, md = chunk_rows(pid_s, S, DQK, DQKP, L, BLK)  # a key tile, its chunk
    g_base = bh * S
    inv = tl.load(INV + g_base + offs_t, mask=mt, other=0.0)
    s_off = (bh * NC + ci) * DQK
    dh_base = DH + bh * S * DV
    v_base = V + bh * S * DV
    # over DV: pacc = v_s . delta_t (delta = dh * inv), dki = dC_{c+1} v_s
    pacc, dki = _dv_dots(v_base, offs_s, ms, dh_base, offs_t, mt, DCS + s_off * DV, offs_d, md, inv,
                         tl.zeros([BLK, L], dtype=tl.float32), tl.zeros([BLK, DQKP], dtype=tl.float32),
                         DV, BV, False, PREC, STATE_F32)
    i_s = tl.load(IG + g_base + offs_s, mask=ms, other=0.0)
    b_s = tl.load(BB + g_base + offs_s, mask=ms, other=0.0)
    e = tl.where(ms, tl.exp(tl.load(AA + g_base + offs_s, mask=ms, other=-float("inf"))
                            - tl.load(MC + bh * (NC + 1) + ci + 1)), 0.0)
    bt = tl.load(BB + g_base + offs_t, mask=mt, other=0.0)
    m_t = tl.load(MM + g_base + offs_t, mask=mt, other=0.0)
    nu = tl.load(NU + g_base + offs_t, mask=mt, other=0.0)
    dT = causal_decay(offs_t, mt, bt, m_t, offs_s, ms, b_s, i_s, KEYS_ON_ROWS=True)
    pt = (pacc + nu[None, :]) * dT * scale
    qc = load_tile(Q + bh * S * DQK, offs_t, mt, offs_d, md, DQK)
    dns = tl.load(DNS + s_off + offs_d, mask=md, other=0.0)
    dk = (dki + dns[None, :]) * e[:, None] + tl.dot(pt.to(qc.dtype), qc, input_precision=PREC)
    ptr = bh * S * DQK + offs_s[:, None] * DQK + offs_d[None, :]
    msd = ms[:, None] & md[None, :]
    tl.store(DK + ptr, dk.to(DK.dtype.element_ty), mask=msd)
    ks = tl.load(K + ptr, mask=msd, other=0.0).to(tl.float32)
    tl.store(KDK + g_base + offs_s, tl.sum(ks * dk, axis=1), mask=ms)


@triton.jit
def bwd_dv_kernel(
    Q, K, DH, IG, BB, MM, AA, MC, INV, DCS, DVO,
    S, NC, scale,
    DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, L: tl.constexpr,
    BLK: tl.constexpr, BV: tl.constexpr, NVP: tl.constexpr,
    PREC: tl.constexpr, STATE_F32: tl.constexpr, TK,
):
    pid_s = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    ci, offs_s, ms, offs_t, mt, offs_d, md = chunk_rows(pid_s, S, DQK, DQKP, L, BLK)  # a key tile, its chunk
    g_base = bh * S
    i_s = tl.load(IG + g_base + offs_s, mask=ms, other=0.0)
    b_s = tl.load(BB + g_base + offs_s, mask=ms, other=0.0)
    e = tl.where(ms, tl.exp(tl.load(AA + g_base + offs_s, mask=ms, other=-float("inf"))
                            - tl.load(MC + bh * (NC + 1) + ci + 1)), 0.0)
    bt = tl.load(BB + g_base + offs_t, mask=mt, other=0.0)
    m_t = tl.load(MM + g_base + offs_t, mask=mt, other=0.0)
    inv = tl.load(INV + g_base + offs_t, mask=mt, other=0.0)
    ks = load_tile(K + bh * S * DQK, offs_s, ms, offs_d, md, DQK)
    qc = load_tile(Q + bh * S * DQK, offs_t, mt, offs_d, md, DQK)
    dT = causal_decay(offs_t, mt, bt, m_t, offs_s, ms, b_s, i_s, KEYS_ON_ROWS=True)
    at = (tl.dot(ks, tl.trans(qc), input_precision=PREC) * scale * dT).to(ks.dtype)
    s_off = (bh * NC + ci) * DQK
    dh_base = DH + bh * S * DV
    v_start, v_end = dv_part(pid_v, DV, NVP)
    for v0 in range(v_start, v_end, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = (offs_v < DV) & (offs_v < v_end)
        dhc = load_tile(dh_base, offs_t, mt, offs_v, mv, DV)
        dcs = load_tile(DCS + s_off * DV, offs_d, md, offs_v, mv, DV)
        deltac = scale_rows(dhc, inv)
        dvt = state_dot(ks, dcs, PREC, STATE_F32) * e[:, None] + tl.dot(at, deltac, input_precision=PREC)
        store_tile(DVO + bh * S * DV, offs_s, ms, offs_v, mv, DV, dvt)


# ----------------------------------------------------------------------------- gate gradients
@triton.jit
def _argmax_combine(v1, i1, v2, i2):
    right = v2 >= v1
    return tl.where(right, v2, v1), tl.where(right, i2, i1)


@triton.jit
def _affine_combine(o1, k1, o2, k2):
    return o2 + k2 * o1, k2 * k1


@triton.jit
def _chunk_argmax(IG, BB, MC, bh, ci, S, NC, L: tl.constexpr):
    """For each token of chunk ``ci``: whether its stabiliser is attained inside the chunk (``win``),
    and then at which local index (``arg``); otherwise by the state entering the chunk."""
    loc = tl.arange(0, L)
    t = ci * L + loc
    mt = t < S
    vv = tl.where(mt, tl.load(IG + bh * S + t, mask=mt, other=0.0) - tl.load(BB + bh * S + t, mask=mt, other=0.0),
                  -float("inf"))
    cm, arg = tl.associative_scan((vv, loc), 0, _argmax_combine)
    win = (cm >= tl.load(MC + bh * (NC + 1) + ci)) & mt
    last = tl.minimum(S - ci * L, L) - 1
    return t, mt, win, arg, loc == last


@triton.jit
def bwd_gates_a_kernel(IG, BB, MC, GM, QDQ, KDK, OWN, WL, QK, S, NC, L: tl.constexpr):
    """Per chunk: the stabiliser gradient that leaves the chunk (``OWN``), whether the chunk's last token
    passes on what arrives from later chunks (``WL`` = 0) and the chunk's sum of q.dq - k.dk."""
    ci = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    t, mt, win, arg, is_last = _chunk_argmax(IG, BB, MC, bh, ci, S, NC, L)
    gm = tl.load(GM + bh * S + t, mask=mt, other=0.0)
    qk = tl.load(QDQ + bh * S + t, mask=mt, other=0.0) - tl.load(KDK + bh * S + t, mask=mt, other=0.0)
    tl.store(OWN + bh * NC + ci, tl.sum(tl.where(win, 0.0, gm), axis=0))
    tl.store(WL + bh * NC + ci, tl.sum(tl.where(is_last & win, 1.0, 0.0), axis=0))
    tl.store(QK + bh * NC + ci, tl.sum(qk, axis=0))


@triton.jit
def bwd_gates_b_kernel(OWN, WL, QK, DMN, LAM, GALL, QALL, DM0, NC, NCP: tl.constexpr, HAS_DMN: tl.constexpr,
                       HAS_LAM: tl.constexpr):
    """Reverse scans over chunks: ``G_c = OWN_c + (1 - WL_c) G_{c+1}`` (``G_NC`` = dm_N - Lambda, each term
    zero where absent) and the suffix sums of q.dq - k.dk; ``G_0`` is the gradient of the initial m through
    the stabiliser."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NCP)
    mj = j < NC
    c = NC - 1 - j
    o = tl.load(OWN + bh * NC + c, mask=mj, other=0.0)
    k = 1.0 - tl.load(WL + bh * NC + c, mask=mj, other=0.0)
    po, pk = tl.associative_scan((o, k), 0, _affine_combine)
    init = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
    if HAS_DMN:
        init += tl.load(DMN + bh)
    if HAS_LAM:
        init -= tl.load(LAM + bh)
    g = po + pk * init
    tl.store(GALL + bh * (NC + 1) + c, g, mask=mj)
    tl.store(GALL + bh * (NC + 1) + NC, init)
    q = tl.cumsum(tl.load(QK + bh * NC + c, mask=mj, other=0.0), axis=0)
    tl.store(QALL + bh * (NC + 1) + c, q, mask=mj)
    tl.store(QALL + bh * (NC + 1) + NC, 0.0)
    tl.store(DM0 + bh, tl.sum(tl.where(c == 0, g, 0.0), axis=0))


@triton.jit
def bwd_gates_c_kernel(IG, F, BB, MC, GM, QDQ, KDK, GALL, QALL, LAM, DI, DF, S, NC, L: tl.constexpr,
                       HAS_LAM: tl.constexpr):
    """di and df of each token of a chunk."""
    ci = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    t, mt, win, arg, is_last = _chunk_argmax(IG, BB, MC, bh, ci, S, NC, L)
    loc = tl.arange(0, L)
    gm = tl.load(GM + bh * S + t, mask=mt, other=0.0)
    gm = gm + tl.where(is_last, tl.load(GALL + bh * (NC + 1) + ci + 1), 0.0)
    kdk = tl.load(KDK + bh * S + t, mask=mt, other=0.0)
    qdq = tl.load(QDQ + bh * S + t, mask=mt, other=0.0)
    routed = (arg[:, None] == loc[None, :]) & win[:, None]  # [token, receiving index]
    e = tl.sum(tl.where(routed, gm[:, None], 0.0), axis=0)
    x = tl.where(mt, qdq - kdk + gm - e, 0.0)
    suffix = tl.sum(x, axis=0) - tl.cumsum(x, axis=0) + x
    dls = suffix + tl.load(QALL + bh * (NC + 1) + ci + 1)
    if HAS_LAM:
        dls += tl.load(LAM + bh)
    f = tl.load(F + bh * S + t, mask=mt, other=0.0)
    tl.store(DI + bh * S + t, kdk + e, mask=mt)
    tl.store(DF + bh * S + t, dls / (1.0 + tl.exp(f)), mask=mt)


bwd_prep = fast(bwd_prep_kernel)
bwd_gates_a = fast(bwd_gates_a_kernel)
bwd_gates_b = fast(bwd_gates_b_kernel)
bwd_gates_c = fast(bwd_gates_c_kernel)

# rows: the constexprs named, then num_warps, num_stages (a single-stage row of an intra-chunk kernel
# is for fp32 inputs only, see ``_common._fits``)
bwd_dstates = tuned(bwd_dstates_kernel, "BK BV PREFETCH", interpret=(16, 16, True), rows=[
    (64, 64, True, 4, 2), (64, 64, False, 8, 3), (64, 64, True, 8, 3), (64, 128, False, 8, 2), (64, 64, False, 4, 1)])
bwd_dq = tuned(bwd_dq_kernel, "BLQ BV", interpret=(16, 16), rows=[
    (64, 32, 8, 3), (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 8, 1)])
bwd_dk = tuned(bwd_dk_kernel, "BLK BV", interpret=(16, 16), rows=[
    (64, 32, 8, 3), (64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 4, 2), (64, 32, 8, 1)])
bwd_dv = tuned(bwd_dv_kernel, "BLK BV NVP", interpret=(16, 16, 2), rows=[
    (64, 32, 1, 8, 2), (64, 32, 2, 8, 2), (64, 64, 1, 8, 2), (64, 64, 2, 8, 2), (64, 32, 1, 8, 1)])
