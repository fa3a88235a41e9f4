"""Forward kernels of the chunkwise mLSTM (two-level tiling as in Tiled Flash Linear Attention).

Notation (per batch*head ``bh``; chunks of ``L`` tokens, the state granularity): ``b_t`` is the
cumulative sum of ``logsigmoid(f)`` inside the chunk, ``g`` its value at the chunk's end, ``m_c`` the
stabiliser of the state entering chunk ``c`` and ``m_t = b_t + max(m_c, max_{s<=t in chunk}(i_s - b_s))``
the per-token stabiliser of the reference. The decay weight between query ``t`` and key ``s`` of one
chunk is ``D_ts = exp((b_t - b_s) + (i_s - m_t))`` (<= 1; written so that no large ``b`` is rounded
before the difference, as in the reference), that of the incoming state ``exp(b_t + m_c - m_t)``.

Kernel 1 (:func:`fwd_states_kernel`) runs the inter-chunk recurrence, one program per
(DQK tile, DV tile, bh), and materialises the state entering every chunk plus ``b``, ``m_t``, ``m_c``.
Kernel 2 (:func:`fwd_out_kernel`) computes the outputs, one program per (query tile, DV tile, bh):
the inter-chunk term from the chunk's state and the intra-chunk causal part over key tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import autotune, logsigmoid, max_fn


@triton.jit
def fwd_states_kernel(
    K, V, IG, F, C0, N0, M0,  # inputs
    CS, NS, MC, BB, MM,  # per-chunk states, per-chunk m, per-token b and m
    CN, NN, MN,  # final state (fp32)
    S, NC,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, WRITE_FINAL: tl.constexpr, WRITE_GATES: tl.constexpr, PREC: tl.constexpr, TK,
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
        c = tl.load(C0 + bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mkv, other=0.0)
        n = tl.load(N0 + bh * DQK + offs_k, mask=mk, other=0.0)
        m = tl.load(M0 + bh)
    else:
        c = tl.zeros([BK, BV], dtype=tl.float32)
        n = tl.zeros([BK], dtype=tl.float32)
        m = tl.sum(tl.zeros([BK], dtype=tl.float32), axis=0)
    k_base = K + bh * S * DQK
    v_base = V + bh * S * DV
    g_base = bh * S
    for ci in range(NC):
        s_off = (bh * NC + ci) * DQK
        tl.store(CS + s_off * DV + offs_k[:, None] * DV + offs_v[None, :], c.to(CS.dtype.element_ty), mask=mkv)
        tl.store(NS + s_off + offs_k, n, mask=mk & (offs_k * 0 + pid_v == 0))
        tl.store(MC + bh * (NC + 1) + ci, m, mask=writer)
        t = ci * L + offs_l
        mt = t < S
        fg = tl.load(F + g_base + t, mask=mt, other=0.0)
        ig = tl.load(IG + g_base + t, mask=mt, other=0.0)
        ls = tl.where(mt, logsigmoid(fg), 0.0)
        b = tl.cumsum(ls, axis=0)
        g = tl.min(tl.where(mt, b, float("inf")), axis=0)  # b at the chunk's last token (b is non-increasing)
        if WRITE_GATES:
            cm = tl.associative_scan(tl.where(mt, ig - b, -float("inf")), 0, max_fn)
            tl.store(BB + g_base + t, b, mask=mt & (t * 0 + pid_k + pid_v == 0))
            tl.store(MM + g_base + t, b + tl.maximum(cm, m), mask=mt & (t * 0 + pid_k + pid_v == 0))
        a = tl.where(mt, (g - b) + ig, -float("inf"))  # log weight of each token at the chunk's end
        m_next = tl.maximum(g + m, tl.max(a, axis=0))
        decay = tl.exp(g + m - m_next)
        e = tl.exp(a - m_next)  # weight of each token in the next state, <= 1
        kt = tl.load(k_base + t[:, None] * DQK + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        vt = tl.load(v_base + t[:, None] * DV + offs_v[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
        ke = kt.to(tl.float32) * e[:, None]
        c = decay * c + tl.dot(tl.trans(ke.to(kt.dtype)), vt, input_precision=PREC)
        n = decay * n + tl.sum(ke, axis=0)
        m = m_next
    tl.store(MC + bh * (NC + 1) + NC, m, mask=writer)
    if WRITE_FINAL:
        tl.store(CN + bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :], c, mask=mkv)
        tl.store(NN + bh * DQK + offs_k, n, mask=mk & (offs_k * 0 + pid_v == 0))
        tl.store(MN + bh, m, mask=writer)


@triton.jit
def fwd_out_kernel(
    Q, K, V, IG, BB, MM, CS, NS, MC, H, DEN,
    S, NC, scale, eps,
    DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, L: tl.constexpr,
    BLQ: tl.constexpr, BLK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, STATE_F32: tl.constexpr, TK,
):
    pid_q = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    q0 = pid_q * BLQ
    ci = q0 // L
    c0 = ci * L
    offs_t = q0 + tl.arange(0, BLQ)
    mt = offs_t < S
    offs_d = tl.arange(0, DQKP)
    md = offs_d < DQK
    offs_v = pid_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    g_base = bh * S
    q = tl.load(Q + bh * S * DQK + offs_t[:, None] * DQK + offs_d[None, :], mask=mt[:, None] & md[None, :],
                other=0.0)
    bt = tl.load(BB + g_base + offs_t, mask=mt, other=0.0)
    mt_ = tl.load(MM + g_base + offs_t, mask=mt, other=0.0)
    mc = tl.load(MC + bh * (NC + 1) + ci)
    w = tl.exp(bt + mc - mt_) * scale
    # inter-chunk part: q C_c and q . n_c
    s_off = (bh * NC + ci) * DQK
    cst = tl.load(CS + s_off * DV + offs_d[:, None] * DV + offs_v[None, :], mask=md[:, None] & mv[None, :],
                  other=0.0)
    if STATE_F32:
        acc = tl.dot(q.to(tl.float32), cst, input_precision=PREC)
    else:
        acc = tl.dot(q, cst.to(q.dtype))
    nst = tl.load(NS + s_off + offs_d, mask=md, other=0.0)
    den = tl.sum(q.to(tl.float32) * nst[None, :], axis=1) * w
    acc = acc * w[:, None]
    # intra-chunk part over key tiles up to the diagonal
    k_base = K + bh * S * DQK
    v_base = V + bh * S * DV
    for j0 in range(c0, q0 + BLQ, BLK):
        offs_s = j0 + tl.arange(0, BLK)
        ms = offs_s < S
        kt = tl.load(k_base + offs_s[:, None] * DQK + offs_d[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        vt = tl.load(v_base + offs_s[:, None] * DV + offs_v[None, :], mask=ms[:, None] & mv[None, :], other=0.0)
        i_s = tl.load(IG + g_base + offs_s, mask=ms, other=0.0)
        b_s = tl.load(BB + g_base + offs_s, mask=ms, other=0.0)
        sc = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
        keep = (offs_s[None, :] <= offs_t[:, None]) & ms[None, :] & mt[:, None]
        d = tl.exp(tl.where(keep, (bt[:, None] - b_s[None, :]) + (i_s[None, :] - mt_[:, None]), -float("inf")))
        sd = sc * d
        den += tl.sum(sd, axis=1)
        acc += tl.dot(sd.to(vt.dtype), vt, input_precision=PREC)
    floor = tl.exp(-mt_)
    dd = tl.maximum(tl.abs(den), floor) + eps
    h = acc / dd[:, None]
    tl.store(H + bh * S * DV + offs_t[:, None] * DV + offs_v[None, :], h.to(H.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])
    tl.store(DEN + g_base + offs_t, den, mask=mt & (offs_t * 0 + pid_v == 0))


def _cfgs(items):
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in items]


# Autotuned launchers. ``TK`` is a bucket of the problem size (the autotune key); it is unused
# inside the kernels.
fwd_states = autotune(
    _cfgs([
        ({"BK": 64, "BV": 128}, 8, 2),
        ({"BK": 128, "BV": 64}, 8, 2),
        ({"BK": 64, "BV": 64}, 8, 2),
        ({"BK": 64, "BV": 64}, 4, 1),
    ]),
    key=["DQK", "DV", "L", "TK"],
    interpret_config=triton.Config({"BK": 16, "BV": 16}),
)(fwd_states_kernel)

fwd_out = autotune(
    _cfgs([
        ({"BLQ": 64, "BLK": 64, "BV": 64}, 8, 2),
        ({"BLQ": 64, "BLK": 64, "BV": 64}, 8, 1),
        ({"BLQ": 64, "BLK": 64, "BV": 128}, 8, 1),
        ({"BLQ": 64, "BLK": 64, "BV": 128}, 8, 2),
    ]),
    key=["DQK", "DV", "L", "TK"],
    interpret_config=triton.Config({"BLQ": 16, "BLK": 16, "BV": 16}),
)(fwd_out_kernel)
