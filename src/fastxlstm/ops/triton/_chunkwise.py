"""Chunkwise mLSTM on Triton: launchers, the autograd Function and the gate gradients."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from ._bwd import bwd_dk, bwd_dq, bwd_dstates, bwd_dv, bwd_prep_kernel
from ._common import INTERPRET, dot_settings, pow2, state_dtype
from ._fwd import fwd_out, fwd_states

State = tuple[Tensor, Tensor, Tensor]

#: Chunk (state) granularity used inside the kernels; the tiles of the intra-chunk part are smaller.
#: Must be a multiple of the largest tile (128) on the GPU; results do not depend on it beyond rounding.
DEFAULT_KERNEL_CHUNK = 32 if INTERPRET else int(os.environ.get("FASTXLSTM_TRITON_CHUNK", "128"))


def _tune_key(bh: int, s: int) -> int:
    return pow2(bh, 1) * 1_000_000 + pow2(s, 1)


def kernel_chunk_for(seq: int, requested: int | None) -> int:
    if requested is not None:
        if requested < 16 or requested & (requested - 1) or (not INTERPRET and requested % 128):
            raise ValueError(f"kernel_chunk must be a power of two >= 16 (a multiple of 128 on the GPU), "
                             f"got {requested}")
        return requested
    return DEFAULT_KERNEL_CHUNK


def forward(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, c0: Tensor | None, n0: Tensor | None,
    m0: Tensor | None, eps: float, chunk: int, write_gates_only: bool = False,
) -> dict[str, Tensor]:
    """Run both forward kernels on ``[BH,S,D]`` inputs; returns every buffer by name."""
    bh, seq, dqk = q.shape
    dv = v.shape[-1]
    nc = triton.cdiv(seq, chunk)
    prec, state_f32 = dot_settings(q.dtype)
    dev = q.device
    f32 = torch.float32
    out = {
        "cs": torch.empty(bh, nc, dqk, dv, device=dev, dtype=state_dtype(q.dtype)),
        "ns": torch.empty(bh, nc, dqk, device=dev, dtype=f32),
        "mc": torch.empty(bh, nc + 1, device=dev, dtype=f32),
        "b": torch.empty(bh, seq, device=dev, dtype=f32),
        "M": torch.empty(bh, seq, device=dev, dtype=f32),  # per-token stabiliser m_t
        "cn": torch.empty(bh, dqk, dv, device=dev, dtype=f32),
        "nn": torch.empty(bh, dqk, device=dev, dtype=f32),
        "mn": torch.empty(bh, device=dev, dtype=f32),
    }
    has_init = c0 is not None
    dummy = out["mc"]
    tk = _tune_key(bh, seq)
    fwd_states[lambda meta: (triton.cdiv(dqk, meta["BK"]), triton.cdiv(dv, meta["BV"]), bh)](
        k, v, i, f, c0 if has_init else dummy, n0 if has_init else dummy, m0 if has_init else dummy,
        out["cs"], out["ns"], out["mc"], out["b"], out["M"], out["cn"], out["nn"], out["mn"], seq, nc,
        DQK=dqk, DV=dv, L=chunk, HAS_INIT=has_init, WRITE_FINAL=True, WRITE_GATES=True, PREC=prec, TK=tk,
    )
    if write_gates_only:
        return out
    out["h"] = torch.empty(bh, seq, dv, device=dev, dtype=q.dtype)
    out["den"] = torch.empty(bh, seq, device=dev, dtype=f32)
    fwd_out[lambda meta: (triton.cdiv(seq, meta["BLQ"]), triton.cdiv(dv, meta["BV"]), bh)](
        q, k, v, i, out["b"], out["M"], out["cs"], out["ns"], out["mc"], out["h"], out["den"],
        seq, nc, dqk ** -0.5, eps,
        DQK=dqk, DV=dv, DQKP=pow2(dqk), L=chunk, PREC=prec, STATE_F32=state_f32, TK=tk,
    )
    return out


def recompute_states(k, v, i, f, c0, n0, m0, saved_b, saved_m, chunk) -> tuple[Tensor, Tensor]:
    """Chunk states again for the backward pass (not kept between the passes to save memory)."""
    bh, seq, dqk = k.shape
    dv = v.shape[-1]
    nc = triton.cdiv(seq, chunk)
    prec, _ = dot_settings(k.dtype)
    cs = torch.empty(bh, nc, dqk, dv, device=k.device, dtype=state_dtype(k.dtype))
    ns = torch.empty(bh, nc, dqk, device=k.device, dtype=torch.float32)
    mc = torch.empty(bh, nc + 1, device=k.device, dtype=torch.float32)
    has_init = c0 is not None
    fwd_states[lambda meta: (triton.cdiv(dqk, meta["BK"]), triton.cdiv(dv, meta["BV"]), bh)](
        k, v, i, f, c0 if has_init else mc, n0 if has_init else mc, m0 if has_init else mc,
        cs, ns, mc, saved_b, saved_m, mc, mc, mc, seq, nc,
        DQK=dqk, DV=dv, L=chunk, HAS_INIT=has_init, WRITE_FINAL=False, WRITE_GATES=False, PREC=prec,
        TK=_tune_key(bh, seq),
    )
    return cs, ns


def backward_kernels(
    q, k, v, i, h, dh, b, M, den, mc, cs, ns, dcn, dnn, need_dinit: bool, eps: float, chunk: int,
) -> dict[str, Tensor]:
    bh, seq, dqk = q.shape
    dv = v.shape[-1]
    nc = triton.cdiv(seq, chunk)
    prec, state_f32 = dot_settings(q.dtype)
    dev = q.device
    f32 = torch.float32
    scale = dqk ** -0.5
    tk = _tune_key(bh, seq)
    inv = torch.empty(bh, seq, device=dev, dtype=f32)
    nu = torch.empty_like(inv)
    gm = torch.empty_like(inv)
    bt = 16 if dv <= 512 else 8
    bwd_prep_kernel[(triton.cdiv(seq, bt), bh)](
        dh, h, den, b, M, inv, nu, gm, seq, eps, DV=dv, DVP=pow2(dv), BT=bt, num_warps=4,
    )
    dcs = torch.empty(bh, nc, dqk, dv, device=dev, dtype=state_dtype(q.dtype))
    dns = torch.empty(bh, nc, dqk, device=dev, dtype=f32)
    dc0 = torch.empty(bh, dqk, dv, device=dev, dtype=f32) if need_dinit else inv
    dn0 = torch.empty(bh, dqk, device=dev, dtype=f32) if need_dinit else inv
    has_df = dcn is not None
    bwd_dstates[lambda meta: (triton.cdiv(dqk, meta["BK"]), triton.cdiv(dv, meta["BV"]), bh)](
        q, dh, inv, nu, b, M, mc, dcn if has_df else inv, dnn if has_df else inv, dcs, dns, dc0, dn0,
        seq, nc, scale,
        DQK=dqk, DV=dv, L=chunk, HAS_DFINAL=has_df, WRITE_DINIT=need_dinit, PREC=prec, TK=tk,
    )
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dvv = torch.empty_like(v)
    qdq = torch.empty(bh, seq, device=dev, dtype=f32)
    kdk = torch.empty_like(qdq)
    common = dict(DQK=dqk, DV=dv, DQKP=pow2(dqk), L=chunk, PREC=prec, STATE_F32=state_f32, TK=tk)
    bwd_dq[lambda meta: (triton.cdiv(seq, meta["BLQ"]), bh)](
        q, k, v, dh, i, b, M, mc, inv, nu, cs, ns, dq, qdq, seq, nc, scale, **common,
    )
    bwd_dk[lambda meta: (triton.cdiv(seq, meta["BLK"]), bh)](
        q, k, v, dh, i, b, M, mc, inv, nu, dcs, dns, dk, kdk, seq, nc, scale, **common,
    )
    bwd_dv[lambda meta: (triton.cdiv(seq, meta["BLK"]), triton.cdiv(dv, meta["BV"]), bh)](
        q, k, dh, i, b, M, mc, inv, dcs, dvv, seq, nc, scale, **common,
    )
    out = {"dq": dq, "dk": dk, "dv": dvv, "qdq": qdq, "kdk": kdk, "gm": gm}
    if need_dinit:
        out["dc0"], out["dn0"] = dc0, dn0
    return out


def stabiliser_argmax(i: Tensor, b: Tensor, mc: Tensor, chunk: int) -> Tensor:
    """Index of the term that attains each token's stabiliser ``m_t`` (-1: the initial ``m0``).

    ``m_t = b_t + max(m_c, max_{s<=t in chunk}(i_s - b_s))`` and ``m_c`` itself is attained by the
    argmax of the last token of the previous chunk."""
    bh, seq = i.shape
    nc = mc.shape[1] - 1
    dev = i.device
    vv = F.pad(i - b, (0, nc * chunk - seq), value=-float("inf")).view(bh, nc, chunk)
    cm, ci = torch.cummax(vv, dim=-1)
    starts = torch.arange(nc, device=dev) * chunk
    win = cm >= mc[:, :nc, None]
    gidx = ci + starts[:, None]
    last = (torch.clamp(seq - starts, max=chunk) - 1).expand(bh, nc)[..., None]
    win_last = win.gather(-1, last)[..., 0]
    cand = gidx.gather(-1, last)[..., 0]
    chunk_ids = torch.where(win_last, torch.arange(nc, device=dev).expand(bh, nc), -1)
    last_win = torch.cummax(chunk_ids, dim=-1).values
    star_next = torch.where(last_win >= 0, cand.gather(-1, last_win.clamp(min=0)), -1)
    star_in = torch.cat([torch.full((bh, 1), -1, device=dev, dtype=star_next.dtype), star_next[:, :-1]], dim=1)
    return torch.where(win, gidx, star_in[..., None]).reshape(bh, nc * chunk)[:, :seq]


def gate_grads(
    i: Tensor, f: Tensor, b: Tensor, mc: Tensor, qdq: Tensor, kdk: Tensor, gm: Tensor, lam: Tensor | None,
    dmn: Tensor | None, chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of i, f and the initial m from the per-token dot products.

    ``d logsigmoid(f_u) = Lambda + sum_{t>=u} (q_t.dq_t - k_t.dk_t)`` with ``Lambda = <dC_N, C_N>``
    (+ ``<dn_N, n_N>``), ``di_s = k_s.dk_s``; the stabiliser's own gradient ``gm`` (eps and floor, plus
    ``dm_N - Lambda`` at the last token) flows to the term that attains each ``m_t``."""
    bh, seq = i.shape
    gm = gm.clone()
    if lam is not None:
        gm[:, -1] -= lam
    if dmn is not None:
        gm[:, -1] += dmn
    star = stabiliser_argmax(i, b, mc, chunk)
    e = torch.zeros(bh, seq + 1, device=i.device, dtype=torch.float32).scatter_add_(1, star + 1, gm)
    di = kdk + e[:, 1:]
    inner = (qdq - kdk + gm - e[:, 1:]).double()
    dls = inner.flip(-1).cumsum(-1).flip(-1)
    if lam is not None:
        dls = dls + lam.double()[:, None]
    df = (dls * torch.sigmoid(-f.double())).float()
    return di, df, e[:, 0]


class MLSTMChunkwiseFn(torch.autograd.Function):
    """Differentiable chunkwise mLSTM on ``[BH,S,D]`` inputs (gates ``[BH,S]`` float32)."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, c0, n0, m0, eps: float, chunk: int):
        out = forward(q, k, v, i, f, c0, n0, m0, eps, chunk)
        ctx.set_materialize_grads(False)
        ctx.eps, ctx.chunk = eps, chunk
        ctx.save_for_backward(q, k, v, i, f, out["h"], out["b"], out["M"], out["den"], out["mc"], c0, n0, m0,
                              out["cn"], out["nn"])
        return out["h"], out["cn"], out["nn"], out["mn"]

    @staticmethod
    def backward(ctx, dh, dcn, dnn, dmn):
        q, k, v, i, f, h, b, M, den, mc, c0, n0, m0, cn, nn = ctx.saved_tensors
        eps, chunk = ctx.eps, ctx.chunk
        if dh is None:
            dh = torch.zeros_like(h)
        dh = dh.contiguous()
        has_df = dcn is not None or dnn is not None
        if has_df:
            dcn = torch.zeros_like(cn) if dcn is None else dcn.float().contiguous()
            dnn = torch.zeros_like(nn) if dnn is None else dnn.float().contiguous()
        cs, ns = recompute_states(k, v, i, f, c0, n0, m0, b, M, chunk)
        need_dinit = c0 is not None
        g = backward_kernels(q, k, v, i, h, dh, b, M, den, mc, cs, ns, dcn if has_df else None,
                             dnn if has_df else None, need_dinit, eps, chunk)
        lam = ((dcn * cn).sum((-1, -2)) + (dnn * nn).sum(-1)) if has_df else None
        di, df, dm0_path = gate_grads(i, f, b, mc, g["qdq"], g["kdk"], g["gm"], lam,
                                      None if dmn is None else dmn.float(), chunk)
        dc0 = dn0 = dm0 = None
        if need_dinit:
            dc0, dn0 = g["dc0"], g["dn0"]
            dm0 = (dc0 * c0).sum((-1, -2)) + (dn0 * n0).sum(-1) + dm0_path
        return g["dq"], g["dk"], g["dv"], di, df, dc0, dn0, dm0, None, None
