"""Backward kernels of the chunkwise mLSTM.

The stabilisers are treated as constants here (every chunk state is stored divided by
``exp(m_c)``, so they cancel exactly); what ``m`` changes through ``eps`` and the
``exp(-m_t)`` floor is added in :mod:`._chunkwise` as a per-token term routed along the argmax of
the stabiliser. With ``delta_t = dh_t / Den_t`` and the denominator's gradient
``nu_t = -sign(den_t) [|den_t| > exp(-m_t)] (dh_t . h_t) / Den_t``:

* ``dC'_c = exp(g_c + m_c - m_{c+1}) dC'_{c+1} + sum_{t in c} w_t q~_t [delta_t, nu_t]^T`` (reverse
  recurrence over chunks, :func:`bwd_dstates_kernel`), ``w_t = exp(b_t + m_c - m_t)``;
* ``dq~_t = sum_{s<=t} (delta_t.v_s + nu_t) D_ts k_s + w_t (C_c delta_t + nu_t n_c)``;
* ``dk_s = sum_{t>=s} (delta_t.v_s + nu_t) D_ts q~_t + e_s (dC_{c+1} v_s + dn_{c+1})``;
* ``dv_s = sum_{t>=s} (q~_t.k_s) D_ts delta_t + e_s dC_{c+1}^T k_s``, ``e_s = exp((g_c - b_s) + i_s - m_{c+1})``.

The gate gradients follow from ``q.dq`` and ``k.dk`` per token, which the dQ and dK kernels write.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import autotune


@triton.jit
def bwd_prep_kernel(
    DH, H, DEN, BB, MM, INV, NU, GM, S, eps,
    DV: tl.constexpr, DVP: tl.constexpr, BT: tl.constexpr,
):
    """Per token: 1/Den, nu (the denominator's gradient) and the eps/floor term of dm."""
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
    dd = tl.maximum(tl.abs(den), floor) + eps
    inv = 1.0 / dd
    sgn = tl.where(den > 0, 1.0, tl.where(den < 0, -1.0, 0.0))
    nu = tl.where(tl.abs(den) > floor, -sgn * dhh * inv, 0.0)
    tl.store(INV + g, inv, mask=mt)
    tl.store(NU + g, nu, mask=mt)
    tl.store(GM + g, -dhh * eps * inv, mask=mt)


@triton.jit
def bwd_dstates_kernel(
    Q, DH, INV, NU, BB, MM, MC, DCN, DNN, DCS, DNS, DC0, DN0,
    S, NC, scale,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DFINAL: tl.constexpr, WRITE_DINIT: tl.constexpr, PREC: tl.constexpr, TK,
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
        gc = tl.load(DCN + bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mkv, other=0.0)
        gn = tl.load(DNN + bh * DQK + offs_k, mask=mk, other=0.0)
    else:
        gc = tl.zeros([BK, BV], dtype=tl.float32)
        gn = tl.zeros([BK], dtype=tl.float32)
    q_base = Q + bh * S * DQK
    dh_base = DH + bh * S * DV
    g_base = bh * S
    for cc in range(NC):
        ci = NC - 1 - cc
        s_off = (bh * NC + ci) * DQK
        tl.store(DCS + s_off * DV + offs_k[:, None] * DV + offs_v[None, :], gc.to(DCS.dtype.element_ty),
                 mask=mkv)
        tl.store(DNS + s_off + offs_k, gn, mask=mk & (offs_k * 0 + pid_v == 0))
        t = ci * L + offs_l
        mt = t < S
        mc = tl.load(MC + bh * (NC + 1) + ci)
        g = tl.load(BB + g_base + tl.minimum(ci * L + L, S) - 1)
        decay = tl.exp(g + mc - tl.load(MC + bh * (NC + 1) + ci + 1))
        bt = tl.load(BB + g_base + t, mask=mt, other=0.0)
        mt_ = tl.load(MM + g_base + t, mask=mt, other=0.0)
        w = tl.where(mt, tl.exp(bt + mc - mt_), 0.0) * scale
        inv = tl.load(INV + g_base + t, mask=mt, other=0.0)
        nu = tl.load(NU + g_base + t, mask=mt, other=0.0)
        qt = tl.load(q_base + t[:, None] * DQK + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        dht = tl.load(dh_base + t[:, None] * DV + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
        qw = qt.to(tl.float32) * w[:, None]
        delta = (dht.to(tl.float32) * inv[:, None]).to(qt.dtype)
        gc = decay * gc + tl.dot(tl.trans(qw.to(qt.dtype)), delta, input_precision=PREC)
        gn = decay * gn + tl.sum(qw * nu[:, None], axis=0)
    if WRITE_DINIT:
        tl.store(DC0 + bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], gc, mask=mkv)
        tl.store(DN0 + bh * DQK + offs_k, gn, mask=mk & (offs_k * 0 + pid_v == 0))


@triton.jit
def bwd_dq_kernel(
    Q, K, V, DH, IG, BB, MM, MC, INV, NU, CS, NS, DQ, QDQ,
    S, NC, scale,
    DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, L: tl.constexpr,
    BLQ: tl.constexpr, BLK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, STATE_F32: tl.constexpr, TK,
):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    q0 = pid_q * BLQ
    ci = q0 // L
    c0 = ci * L
    offs_t = q0 + tl.arange(0, BLQ)
    mt = offs_t < S
    offs_d = tl.arange(0, DQKP)
    md = offs_d < DQK
    g_base = bh * S
    dh_base = DH + bh * S * DV
    bt = tl.load(BB + g_base + offs_t, mask=mt, other=0.0)
    mt_ = tl.load(MM + g_base + offs_t, mask=mt, other=0.0)
    inv = tl.load(INV + g_base + offs_t, mask=mt, other=0.0)
    nu = tl.load(NU + g_base + offs_t, mask=mt, other=0.0)
    mc = tl.load(MC + bh * (NC + 1) + ci)
    w = tl.where(mt, tl.exp(bt + mc - mt_), 0.0)
    s_off = (bh * NC + ci) * DQK
    acc = tl.zeros([BLQ, DQKP], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < DV
        dht = tl.load(dh_base + offs_t[:, None] * DV + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
        delta = dht.to(tl.float32) * inv[:, None]
        cst = tl.load(CS + s_off * DV + offs_d[:, None] * DV + offs_v[None, :], mask=md[:, None] & mv[None, :],
                      other=0.0)
        if STATE_F32:
            acc += tl.dot(delta, tl.trans(cst), input_precision=PREC)
        else:
            acc += tl.dot(delta.to(dht.dtype), tl.trans(cst))
    nst = tl.load(NS + s_off + offs_d, mask=md, other=0.0)
    acc = (acc + nu[:, None] * nst[None, :]) * w[:, None]
    k_base = K + bh * S * DQK
    v_base = V + bh * S * DV
    for j0 in range(c0, q0 + BLQ, BLK):
        offs_s = j0 + tl.arange(0, BLK)
        ms = offs_s < S
        i_s = tl.load(IG + g_base + offs_s, mask=ms, other=0.0)
        b_s = tl.load(BB + g_base + offs_s, mask=ms, other=0.0)
        sdv = tl.zeros([BLQ, BLK], dtype=tl.float32)
        for v0 in range(0, DV, BV):
            offs_v = v0 + tl.arange(0, BV)
            mv = offs_v < DV
            dht = tl.load(dh_base + offs_t[:, None] * DV + offs_v[None, :], mask=mt[:, None] & mv[None, :],
                          other=0.0)
            delta = (dht.to(tl.float32) * inv[:, None]).to(dht.dtype)
            vt = tl.load(v_base + offs_s[:, None] * DV + offs_v[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
            sdv += tl.dot(delta, tl.trans(vt), input_precision=PREC)
        keep = (offs_s[None, :] <= offs_t[:, None]) & ms[None, :] & mt[:, None]
        d = tl.exp(tl.where(keep, (bt[:, None] - b_s[None, :]) + (i_s[None, :] - mt_[:, None]), -float("inf")))
        p = (sdv + nu[:, None]) * d
        kt = tl.load(k_base + offs_s[:, None] * DQK + offs_d[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        acc += tl.dot(p.to(kt.dtype), kt, input_precision=PREC)
    dq = acc * scale
    ptr = bh * S * DQK + offs_t[:, None] * DQK + offs_d[None, :]
    mtd = mt[:, None] & md[None, :]
    tl.store(DQ + ptr, dq.to(DQ.dtype.element_ty), mask=mtd)
    q = tl.load(Q + ptr, mask=mtd, other=0.0).to(tl.float32)
    tl.store(QDQ + g_base + offs_t, tl.sum(q * dq, axis=1), mask=mt)


@triton.jit
def bwd_dk_kernel(
    Q, K, V, DH, IG, BB, MM, MC, INV, NU, DCS, DNS, DK, KDK,
    S, NC, scale,
    DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, L: tl.constexpr,
    BLQ: tl.constexpr, BLK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, STATE_F32: tl.constexpr, TK,
):
    pid_s = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    j0 = pid_s * BLK
    ci = j0 // L
    c_end = tl.minimum(ci * L + L, S)
    offs_s = j0 + tl.arange(0, BLK)
    ms = offs_s < S
    offs_d = tl.arange(0, DQKP)
    md = offs_d < DQK
    g_base = bh * S
    dh_base = DH + bh * S * DV
    v_base = V + bh * S * DV
    q_base = Q + bh * S * DQK
    i_s = tl.load(IG + g_base + offs_s, mask=ms, other=0.0)
    b_s = tl.load(BB + g_base + offs_s, mask=ms, other=0.0)
    g = tl.load(BB + g_base + c_end - 1)
    e = tl.where(ms, tl.exp((g - b_s) + i_s - tl.load(MC + bh * (NC + 1) + ci + 1)), 0.0)
    s_off = (bh * NC + ci) * DQK
    acc = tl.zeros([BLK, DQKP], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < DV
        vt = tl.load(v_base + offs_s[:, None] * DV + offs_v[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
        dcs = tl.load(DCS + s_off * DV + offs_d[:, None] * DV + offs_v[None, :], mask=md[:, None] & mv[None, :],
                      other=0.0)
        if STATE_F32:
            acc += tl.dot(vt.to(tl.float32), tl.trans(dcs), input_precision=PREC)
        else:
            acc += tl.dot(vt, tl.trans(dcs.to(vt.dtype)))
    dns = tl.load(DNS + s_off + offs_d, mask=md, other=0.0)
    acc = (acc + dns[None, :]) * e[:, None]
    for t0 in range(j0, c_end, BLQ):
        offs_t = t0 + tl.arange(0, BLQ)
        mt = offs_t < S
        bt = tl.load(BB + g_base + offs_t, mask=mt, other=0.0)
        mt_ = tl.load(MM + g_base + offs_t, mask=mt, other=0.0)
        inv = tl.load(INV + g_base + offs_t, mask=mt, other=0.0)
        nu = tl.load(NU + g_base + offs_t, mask=mt, other=0.0)
        svd = tl.zeros([BLK, BLQ], dtype=tl.float32)
        for v0 in range(0, DV, BV):
            offs_v = v0 + tl.arange(0, BV)
            mv = offs_v < DV
            vt = tl.load(v_base + offs_s[:, None] * DV + offs_v[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
            dht = tl.load(dh_base + offs_t[:, None] * DV + offs_v[None, :], mask=mt[:, None] & mv[None, :],
                          other=0.0)
            delta = (dht.to(tl.float32) * inv[:, None]).to(dht.dtype)
            svd += tl.dot(vt, tl.trans(delta), input_precision=PREC)
        keep = (offs_s[:, None] <= offs_t[None, :]) & ms[:, None] & mt[None, :]
        d = tl.exp(tl.where(keep, (bt[None, :] - b_s[:, None]) + (i_s[:, None] - mt_[None, :]), -float("inf")))
        p = (svd + nu[None, :]) * d * scale
        qt = tl.load(q_base + offs_t[:, None] * DQK + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0)
        acc += tl.dot(p.to(qt.dtype), qt, input_precision=PREC)
    dk = acc
    ptr = bh * S * DQK + offs_s[:, None] * DQK + offs_d[None, :]
    msd = ms[:, None] & md[None, :]
    tl.store(DK + ptr, dk.to(DK.dtype.element_ty), mask=msd)
    k = tl.load(K + ptr, mask=msd, other=0.0).to(tl.float32)
    tl.store(KDK + g_base + offs_s, tl.sum(k * dk, axis=1), mask=ms)


@triton.jit
def bwd_dv_kernel(
    Q, K, DH, IG, BB, MM, MC, INV, DCS, DV_OUT,
    S, NC, scale,
    DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, L: tl.constexpr,
    BLQ: tl.constexpr, BLK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, STATE_F32: tl.constexpr, TK,
):
    pid_s = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    j0 = pid_s * BLK
    ci = j0 // L
    c_end = tl.minimum(ci * L + L, S)
    offs_s = j0 + tl.arange(0, BLK)
    ms = offs_s < S
    offs_d = tl.arange(0, DQKP)
    md = offs_d < DQK
    offs_v = pid_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    g_base = bh * S
    i_s = tl.load(IG + g_base + offs_s, mask=ms, other=0.0)
    b_s = tl.load(BB + g_base + offs_s, mask=ms, other=0.0)
    g = tl.load(BB + g_base + c_end - 1)
    e = tl.where(ms, tl.exp((g - b_s) + i_s - tl.load(MC + bh * (NC + 1) + ci + 1)), 0.0)
    kt = tl.load(K + bh * S * DQK + offs_s[:, None] * DQK + offs_d[None, :], mask=ms[:, None] & md[None, :],
                 other=0.0)
    s_off = (bh * NC + ci) * DQK
    dcs = tl.load(DCS + s_off * DV + offs_d[:, None] * DV + offs_v[None, :], mask=md[:, None] & mv[None, :],
                  other=0.0)
    if STATE_F32:
        acc = tl.dot(kt.to(tl.float32), dcs, input_precision=PREC)
    else:
        acc = tl.dot(kt, dcs.to(kt.dtype))
    acc = acc * e[:, None]
    q_base = Q + bh * S * DQK
    dh_base = DH + bh * S * DV
    for t0 in range(j0, c_end, BLQ):
        offs_t = t0 + tl.arange(0, BLQ)
        mt = offs_t < S
        bt = tl.load(BB + g_base + offs_t, mask=mt, other=0.0)
        mt_ = tl.load(MM + g_base + offs_t, mask=mt, other=0.0)
        inv = tl.load(INV + g_base + offs_t, mask=mt, other=0.0)
        qt = tl.load(q_base + offs_t[:, None] * DQK + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0)
        sc = tl.dot(kt, tl.trans(qt), input_precision=PREC) * scale
        keep = (offs_s[:, None] <= offs_t[None, :]) & ms[:, None] & mt[None, :]
        d = tl.exp(tl.where(keep, (bt[None, :] - b_s[:, None]) + (i_s[:, None] - mt_[None, :]), -float("inf")))
        a = sc * d
        dht = tl.load(dh_base + offs_t[:, None] * DV + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
        delta = (dht.to(tl.float32) * inv[:, None]).to(dht.dtype)
        acc += tl.dot(a.to(dht.dtype), delta, input_precision=PREC)
    tl.store(DV_OUT + bh * S * DV + offs_s[:, None] * DV + offs_v[None, :], acc.to(DV_OUT.dtype.element_ty),
             mask=ms[:, None] & mv[None, :])


def _cfgs(items):
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in items]


bwd_dstates = autotune(
    _cfgs([
        ({"BK": 64, "BV": 128}, 8, 2),
        ({"BK": 64, "BV": 64}, 8, 2),
        ({"BK": 128, "BV": 64}, 8, 2),
        ({"BK": 64, "BV": 64}, 4, 1),
    ]),
    key=["DQK", "DV", "L", "TK"],
    interpret_config=triton.Config({"BK": 16, "BV": 16}),
)(bwd_dstates_kernel)

_PAR = _cfgs([
    ({"BLQ": 64, "BLK": 64, "BV": 64}, 8, 2),
    ({"BLQ": 64, "BLK": 64, "BV": 64}, 8, 1),
    ({"BLQ": 64, "BLK": 64, "BV": 128}, 8, 2),
    ({"BLQ": 32, "BLK": 64, "BV": 128}, 4, 2),
])
_PAR_INTERP = triton.Config({"BLQ": 16, "BLK": 16, "BV": 16})

bwd_dq = autotune(_PAR, key=["DQK", "DV", "L", "TK"], interpret_config=_PAR_INTERP)(bwd_dq_kernel)
bwd_dk = autotune(_PAR, key=["DQK", "DV", "L", "TK"], interpret_config=_PAR_INTERP)(bwd_dk_kernel)
bwd_dv = autotune(_PAR, key=["DQK", "DV", "L", "TK"], interpret_config=_PAR_INTERP)(bwd_dv_kernel)
