"""Fused mLSTM decode step: one launch updates (C, n, m) of a whole batch and writes h.

One program per (DV tile, batch*head) owns ``C[:, tile]``. Every program needs the old ``n`` and
``m``; for the in-place update the program that finishes last for a head (a per-head atomic
ticket) writes the new ``n`` and ``m`` and resets the ticket, so one launch is race-free and
capturable in a CUDA graph. No autotuning: the tile width follows from the shape alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import logsigmoid, pow2


@triton.jit
def step_kernel(
    Q, K, V, IG, F, C, N, M, H, CO, NO, MO, TICKET, scale, eps, NH,
    sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, si_b, si_h, sf_b, sf_h,
    DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, BV: tl.constexpr, NPV: tl.constexpr,
    INPLACE: tl.constexpr,
):
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bb = bh // NH
    hh = bh % NH
    offs_d = tl.arange(0, DQKP)
    md = offs_d < DQK
    offs_v = pid_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    q = tl.load(Q + bb * sq_b + hh * sq_h + offs_d, mask=md, other=0.0).to(tl.float32) * scale
    k = tl.load(K + bb * sk_b + hh * sk_h + offs_d, mask=md, other=0.0).to(tl.float32)
    v = tl.load(V + bb * sv_b + hh * sv_h + offs_v, mask=mv, other=0.0).to(tl.float32)
    ig = tl.load(IG + bb * si_b + hh * si_h).to(tl.float32)
    fg = tl.load(F + bb * sf_b + hh * sf_h).to(tl.float32)
    m = tl.load(M + bh)
    n = tl.load(N + bh * DQK + offs_d, mask=md, other=0.0)
    cptr = bh * DQK * DV + offs_d[:, None] * DV + offs_v[None, :]
    cmask = md[:, None] & mv[None, :]
    c = tl.load(C + cptr, mask=cmask, other=0.0)
    lf = logsigmoid(fg) + m
    m_new = tl.maximum(lf, ig)
    fa = tl.exp(lf - m_new)
    ia = tl.exp(ig - m_new)
    c = fa * c + ia * (k[:, None] * v[None, :])
    n = fa * n + ia * k
    num = tl.sum(q[:, None] * c, axis=0)
    den = tl.maximum(tl.abs(tl.sum(q * n, axis=0)), tl.exp(-m_new)) + eps
    tl.store(H + bh * DV + offs_v, (num / den).to(H.dtype.element_ty), mask=mv)
    tl.store(CO + cptr, c, mask=cmask)
    if INPLACE:
        # Every program has read the old n and m before it takes its ticket (acq_rel).
        ticket = tl.atomic_add(TICKET + bh, 1, sem="acq_rel")
        last = ticket == NPV - 1
        tl.store(NO + bh * DQK + offs_d, n, mask=md & (offs_d * 0 + ticket == NPV - 1))
        tl.store(MO + bh, m_new, mask=last)
        tl.store(TICKET + bh, 0, mask=last)
    else:
        tl.store(NO + bh * DQK + offs_d, n, mask=md & (offs_d * 0 + pid_v == 0))
        tl.store(MO + bh, m_new, mask=pid_v == 0)


_TICKETS: dict[tuple[torch.device, int], Tensor] = {}


def _tickets(device: torch.device, count: int) -> Tensor:
    """Zeroed per-head tickets, allocated once per (device, size) so graph replays reuse them."""
    key = (device, count)
    t = _TICKETS.get(key)
    if t is None:
        t = torch.zeros(count, device=device, dtype=torch.int32)
        _TICKETS[key] = t
    return t


def _tile(bh: int, dqk: int, dv: int) -> tuple[int, int]:
    """DV tile width and warps: enough programs to occupy the GPU at batch 1, wide tiles at large batch."""
    dvp = pow2(dv)
    bv = 128
    while bv > 16 and bh * triton.cdiv(dv, bv) < 512:
        bv //= 2
    bv = min(bv, dvp)
    warps = 4 if pow2(dqk) * bv <= 8192 else 8
    return bv, warps


def launch_step(q, k, v, i, f, c, n, m, h, c_out, n_out, m_out, eps: float) -> None:
    """q,k ``[B,NH,DQK]``, v ``[B,NH,DV]`` (last dim contiguous), i,f ``[B,NH]`` (any strides);
    C ``[B*NH,DQK,DV]``, n, m and h contiguous; the outputs may alias the state (in place)."""
    bsz, nh, dqk = q.shape
    dv = v.shape[-1]
    bh = bsz * nh
    bv, warps = _tile(bh, dqk, dv)
    npv = triton.cdiv(dv, bv)
    inplace = c_out.data_ptr() == c.data_ptr()
    tickets = _tickets(q.device, bh) if inplace else m_out
    step_kernel[(npv, bh)](
        q, k, v, i, f, c, n, m, h, c_out, n_out, m_out, tickets, dqk ** -0.5, eps, nh,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        i.stride(0), i.stride(1), f.stride(0), f.stride(1),
        DQK=dqk, DV=dv, DQKP=pow2(dqk), BV=bv, NPV=npv, INPLACE=inplace, num_warps=warps,
    )
