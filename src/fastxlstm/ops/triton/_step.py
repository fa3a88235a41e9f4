"""Fused mLSTM decode step: one launch updates (C, n, m) of a whole batch and writes h.

One program per (DV tile, batch*head) owns ``C[:, tile]`` and walks it in row chunks of ``BD``
(bounded registers at any tile width). Every program needs the old ``n`` and ``m``; for the
in-place update the program that finishes last for a head (a per-head atomic ticket) writes the
new ``n`` and ``m`` and resets the ticket, so one launch is race-free and capturable in a CUDA
graph. No autotuning: the tile follows from the shape alone (:func:`step_config`).

:func:`launch_fused_step` is the engine's decode cell: it also computes the soft-capped gates from
the fused projection row (``q | k | v | o | i | f``), and the last program of each head applies
the per-head LayerNorm and the output gate, so a block's whole mLSTM cell between its two
projections is one launch. ``C`` may be stored in float32 or bfloat16 (math in float32 either way;
``n`` and ``m`` stay float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, head_norm_ogate, logsigmoid, pow2, tanh


@triton.jit
def _cell_tile(q_row, k_row, v_row, ig, fg, C, N, M, CO, bh, pid_v, scale, eps,
               DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """Update this program's ``C[:, tile]`` (written to CO) and return ``(h tile fp32, n_new, m_new)``.
    ``q_row``/``k_row``/``v_row`` point at this (batch, head)'s vectors."""
    offs_d = tl.arange(0, DQKP)
    md = offs_d < DQK
    offs_v = pid_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    m = tl.load(M + bh)
    lf = logsigmoid(fg) + m
    m_new = tl.maximum(lf, ig)
    fa = tl.exp(lf - m_new)
    ia = tl.exp(ig - m_new)
    q = tl.load(q_row + offs_d, mask=md, other=0.0).to(tl.float32) * scale
    k = tl.load(k_row + offs_d, mask=md, other=0.0).to(tl.float32)
    n = fa * tl.load(N + bh * DQK + offs_d, mask=md, other=0.0) + ia * k
    den = tl.maximum(tl.abs(tl.sum(q * n, axis=0)), tl.exp(-m_new)) + eps
    v = tl.load(v_row + offs_v, mask=mv, other=0.0).to(tl.float32)
    iv = ia * v
    num = tl.zeros([BV], dtype=tl.float32)
    base = bh * DQK * DV
    for d0 in tl.static_range(0, DQKP, BD):
        offs_c = d0 + tl.arange(0, BD)
        mc = offs_c < DQK
        qc = tl.load(q_row + offs_c, mask=mc, other=0.0).to(tl.float32) * scale
        kc = tl.load(k_row + offs_c, mask=mc, other=0.0).to(tl.float32)
        cptr = base + offs_c[:, None] * DV + offs_v[None, :]
        cmask = mc[:, None] & mv[None, :]
        c = tl.load(C + cptr, mask=cmask, other=0.0).to(tl.float32)
        c = fa * c + kc[:, None] * iv[None, :]
        tl.store(CO + cptr, c.to(CO.dtype.element_ty), mask=cmask)
        num += tl.sum(qc[:, None] * c, axis=0)
    return num / den, n, m_new


@triton.jit
def step_kernel(
    Q, K, V, IG, F, C, N, M, H, CO, NO, MO, TICKET, scale, eps, NH,
    sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, si_b, si_h, sf_b, sf_h,
    DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
    NPV: tl.constexpr, INPLACE: tl.constexpr,
):
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bb = bh // NH
    hh = bh % NH
    ig = tl.load(IG + bb * si_b + hh * si_h).to(tl.float32)
    fg = tl.load(F + bb * sf_b + hh * sf_h).to(tl.float32)
    h, n, m_new = _cell_tile(Q + bb * sq_b + hh * sq_h, K + bb * sk_b + hh * sk_h, V + bb * sv_b + hh * sv_h,
                             ig, fg, C, N, M, CO, bh, pid_v, scale, eps, DQK, DV, DQKP, BV, BD)
    offs_v = pid_v * BV + tl.arange(0, BV)
    tl.store(H + bh * DV + offs_v, h.to(H.dtype.element_ty), mask=offs_v < DV)
    offs_d = tl.arange(0, DQKP)
    md = offs_d < DQK
    if INPLACE:
        # Every program has read the old n and m before it takes its ticket (acq_rel).
        tl.debug_barrier()
        ticket = tl.atomic_add(TICKET + bh, 1, sem="acq_rel")
        last = ticket == NPV - 1
        tl.store(NO + bh * DQK + offs_d, n, mask=md & (offs_d * 0 + ticket == NPV - 1))
        tl.store(MO + bh, m_new, mask=last)
        tl.store(TICKET + bh, 0, mask=last)
    else:
        tl.store(NO + bh * DQK + offs_d, n, mask=md & (offs_d * 0 + pid_v == 0))
        tl.store(MO + bh, m_new, mask=pid_v == 0)


@triton.jit
def fused_step_kernel(
    P, GB, ACT, C, N, M, HB, W, Y, TICKET, scale, eps, norm_eps, cap, NH, sp, sy,
    OFF_K, OFF_V, OFF_O, OFF_G,
    DQK: tl.constexpr, DV: tl.constexpr, DQKP: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
    NPV: tl.constexpr, HAS_CAP: tl.constexpr, HAS_ACTIVE: tl.constexpr,
):
    """Gates + in-place step + per-head LayerNorm + output gate of one (batch, head, DV tile)."""
    pid_v = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bb = bh // NH
    hh = bh % NH
    row = P + bb * sp
    # gates: the bias add rounds to the activation dtype (a linear layer's output), then the soft-cap
    ig = (tl.load(row + OFF_G + hh).to(tl.float32) + tl.load(GB + hh)).to(P.dtype.element_ty).to(tl.float32)
    fg = (tl.load(row + OFF_G + NH + hh).to(tl.float32) + tl.load(GB + NH + hh)).to(
        P.dtype.element_ty).to(tl.float32)
    if HAS_CAP:
        ig = cap * tanh(ig / cap)
        fg = cap * tanh(fg / cap)
    if HAS_ACTIVE:
        act = tl.load(ACT + bb) != 0
        ig = tl.where(act, ig, float("-inf"))
        fg = tl.where(act, fg, float("inf"))
    h, n, m_new = _cell_tile(row + hh * DQK, row + OFF_K + hh * DQK, row + OFF_V + hh * DV, ig, fg, C, N, M, C,
                             bh, pid_v, scale, eps, DQK, DV, DQKP, BV, BD)
    offs_v = pid_v * BV + tl.arange(0, BV)
    tl.store(HB + bh * DV + offs_v, h.to(Y.dtype.element_ty), mask=offs_v < DV)
    offs_d = tl.arange(0, DQKP)
    md = offs_d < DQK
    tl.debug_barrier()  # all of this program's reads of n, m and writes of h precede its ticket
    ticket = tl.atomic_add(TICKET + bh, 1, sem="acq_rel")
    last = ticket == NPV - 1
    tl.store(N + bh * DQK + offs_d, n, mask=md & (offs_d * 0 + ticket == NPV - 1))
    tl.store(M + bh, m_new, mask=last)
    if last:
        tl.store(TICKET + bh, 0)
        # the head's whole h row is written: MultiHeadLayerNorm(h) * w * sigmoid(o)
        offs = tl.arange(0, DV)
        hv = tl.load(HB + bh * DV + offs, cache_modifier=".cg").to(tl.float32)
        out = head_norm_ogate(hv, tl.load(W + hh * DV + offs), tl.load(row + OFF_O + hh * DV + offs), norm_eps,
                              DV, Y.dtype.element_ty)
        tl.store(Y + bb * sy + hh * DV + offs, out)


_TICKETS: dict[tuple[torch.device, int], Tensor] = {}
_SCRATCH: dict[tuple[torch.device, torch.dtype, int], Tensor] = {}


def _tickets(device: torch.device, count: int) -> Tensor:
    """Zeroed per-head tickets, allocated once per (device, size) so graph replays reuse them."""
    key = (device, count)
    t = _TICKETS.get(key)
    if t is None:
        t = torch.zeros(count, device=device, dtype=torch.int32)
        _TICKETS[key] = t
    return t


def _scratch(device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
    """A reused buffer for the fused step's h rows (read back by each head's last program)."""
    key = (device, dtype, numel)
    t = _SCRATCH.get(key)
    if t is None:
        t = torch.empty(numel, device=device, dtype=dtype)
        _SCRATCH[key] = t
    return t


#: explicit (BV, BD, num_warps) for the next launches (benchmark sweeps); None: :func:`step_config`
STEP_CONFIG: tuple[int, int, int] | None = None


def step_config(bh: int, dqk: int, dv: int) -> tuple[int, int, int]:
    """(DV tile width, row chunk, warps): enough programs to fill the GPU at small batch, wider
    tiles (fewer redundant n/q/k loads) at large batch; the row chunk bounds registers."""
    if STEP_CONFIG is not None:
        bv, bd, warps = STEP_CONFIG
        return min(bv, pow2(dv)), min(bd, pow2(dqk)), warps
    dvp = pow2(dv)
    if INTERPRET:  # small shapes: several tiles and chunks
        return min(16, dvp), min(16, pow2(dqk)), 1
    # H100 sweep (7B cell, 2026-11-24, decode_profile.json): 64-wide tiles of 64-row chunks, 4 warps were
    # the fastest or within 3% at B 8/32/128 (float32 and bf16 C); at B1 narrower full-height tiles
    # (more programs) win.
    bv = 64
    while bv > 16 and bh * triton.cdiv(dv, bv) < 512:
        bv //= 2
    bv = min(bv, dvp)
    bd = max(16, min(pow2(dqk), 4096 // bv))
    return bv, bd, 4


def launch_step(q, k, v, i, f, c, n, m, h, c_out, n_out, m_out, eps: float) -> None:
    """q,k ``[B,NH,DQK]``, v ``[B,NH,DV]`` (last dim contiguous), i,f ``[B,NH]`` (any strides);
    C ``[B*NH,DQK,DV]``, n, m and h contiguous; the outputs may alias the state (in place)."""
    bsz, nh, dqk = q.shape
    dv = v.shape[-1]
    bh = bsz * nh
    bv, bd, warps = step_config(bh, dqk, dv)
    npv = triton.cdiv(dv, bv)
    inplace = c_out.data_ptr() == c.data_ptr()
    tickets = _tickets(q.device, bh) if inplace else m_out
    step_kernel[(npv, bh)](
        q, k, v, i, f, c, n, m, h, c_out, n_out, m_out, tickets, dqk ** -0.5, eps, nh,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        i.stride(0), i.stride(1), f.stride(0), f.stride(1),
        DQK=dqk, DV=dv, DQKP=pow2(dqk), BV=bv, BD=bd, NPV=npv, INPLACE=inplace, num_warps=warps,
    )


def launch_fused_step(proj: Tensor, gate_bias: Tensor, active: Tensor | None, c: Tensor, n: Tensor, m: Tensor,
                      norm_weight: Tensor, y: Tensor, num_heads: int, qk_dim: int, v_dim: int, cap: float | None,
                      eps: float, norm_eps: float) -> None:
    """The engine's decode cell, in place: ``proj [B, 2qk+2v+2NH]`` (rows ``q|k|v|o|i|f``, last dim
    contiguous), float32 ``gate_bias [2NH]``, ``active [B]`` bool or None, state ``C [B,NH,DQK,DV]``
    (float32 or bf16), ``n``, ``m`` float32 (contiguous), ``norm_weight [v]``; writes
    ``y [B, v] = sigmoid(o) * MultiHeadLayerNorm(h)`` in y's dtype."""
    bsz = proj.shape[0]
    dqk, dv = qk_dim // num_heads, v_dim // num_heads
    if dv != pow2(dv, 1):
        raise ValueError(f"the fused step needs a power-of-two head dim DV, got {dv}")
    bh = bsz * num_heads
    bv, bd, warps = step_config(bh, dqk, dv)
    npv = triton.cdiv(dv, bv)
    hb = _scratch(proj.device, y.dtype, bh * dv)
    tickets = _tickets(proj.device, bh)
    act = active if active is not None else tickets
    fused_step_kernel[(npv, bh)](
        proj, gate_bias, act, c, n, m, hb, norm_weight, y, tickets, dqk ** -0.5, eps, norm_eps,
        float(cap or 1.0), num_heads, proj.stride(0), y.stride(0),
        qk_dim, 2 * qk_dim, 2 * qk_dim + v_dim, 2 * qk_dim + 2 * v_dim,
        DQK=dqk, DV=dv, DQKP=pow2(dqk), BV=bv, BD=bd, NPV=npv, HAS_CAP=cap is not None,
        HAS_ACTIVE=active is not None, num_warps=warps,
    )
