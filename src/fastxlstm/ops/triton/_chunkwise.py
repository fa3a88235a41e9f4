"""Chunkwise mLSTM on Triton: launchers, the autograd Function and the gate gradients."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ._bwd import bwd_dk, bwd_dq, bwd_dstates, bwd_dv, bwd_gates_a, bwd_gates_b, bwd_gates_c, bwd_prep
from ._common import INTERPRET, dot_settings, fast, pow2, state_dtype
from ._fwd import OUT_KEYS, STATES_KEYS, fwd_gates, fwd_out, fwd_out_kernel, fwd_states, fwd_states_kernel

#: Chunk (state) granularity used inside the kernels; the tiles of the intra-chunk part are smaller.
#: A power of two in [64, 256] on the GPU; results do not depend on it beyond rounding.
DEFAULT_KERNEL_CHUNK = 32 if INTERPRET else int(os.environ.get("FASTXLSTM_TRITON_CHUNK", "128"))


@dataclass(frozen=True)
class Plan:
    """Explicit launch configs of the forward's state and output kernels (instead of autotuning them; for
    sweeps), rows as in their autotune lists: ``states = (BK, BV, num_warps, num_stages)``,
    ``out = (BLQ, BV, NVP, num_warps, num_stages)``."""

    states: tuple
    out: tuple

    def states_meta(self) -> dict:
        return _meta(STATES_KEYS, self.states)

    def out_meta(self) -> dict:
        return _meta(OUT_KEYS, self.out)


def _meta(keys: tuple[str, ...], row: tuple) -> dict:
    return dict(zip(keys, row[:-2], strict=True), num_warps=row[-2], num_stages=row[-1])


# the kernels launched with a :class:`Plan`'s configs (direct launch path, no autotuner)
_states_fixed = fast(fwd_states_kernel)
_out_fixed = fast(fwd_out_kernel)


def _tune_key(bh: int, s: int) -> int:
    return pow2(bh, 1) * 1_000_000 + pow2(s, 1)


def kernel_chunk_for(seq: int, requested: int | None, dtype: torch.dtype = torch.bfloat16) -> int:
    if requested is not None:
        if requested < 16 or requested & (requested - 1) or requested > 256 or (not INTERPRET and requested < 64):
            raise ValueError(f"kernel_chunk must be a power of two in [64, 256] ([16, 256] in the interpreter), "
                             f"got {requested}")
        return requested
    if dtype == torch.float32 and not INTERPRET:
        return 64  # fp32 tiles of a 128-token chunk do not fit in shared memory at DQK 256
    return DEFAULT_KERNEL_CHUNK


def layout(t: Tensor) -> tuple[int, int, int, int]:
    """``(heads, batch stride, head stride, token stride)`` of a ``[BH,S,D]`` (one head per row) or
    ``[B,NH,S,D]`` input of the forward kernels, whose last dim must be contiguous (other strides are
    free: q, k, v may be views into a fused projection)."""
    if t.stride(-1) != 1:
        raise ValueError("the forward kernels need q, k, v with a contiguous last dim")
    if t.ndim == 3:
        return 1, t.stride(0), t.stride(0), t.stride(1)
    if t.ndim == 4:
        return t.shape[1], t.stride(0), t.stride(1), t.stride(2)
    raise ValueError(f"q, k, v must be [BH,S,D] or [B,NH,S,D], got {tuple(t.shape)}")


def forward(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, c0: Tensor | None, n0: Tensor | None,
    m0: Tensor | None, eps: float, chunk: int, plan: Plan | None = None, final: bool = True,
) -> dict[str, Tensor]:
    """Run the forward kernels on ``[BH,S,D]`` or ``[B,NH,S,D]`` inputs (any strides but a contiguous last
    dim, see :func:`layout`; gates ``[BH,S]`` contiguous float32); returns every buffer by name (``h``
    ``[BH,S,DV]`` contiguous; the final state ``cn, nn, mn`` unless ``final=False``). ``plan``: launch configs
    of the state and output kernels (default: autotuned)."""
    if not q.ndim == k.ndim == v.ndim:
        raise ValueError("q, k, v must all be [BH,S,D] or all [B,NH,S,D]")
    bh, seq = i.shape
    nc = triton.cdiv(seq, chunk)
    dev = q.device
    f32 = torch.float32
    out = {name: torch.empty(bh, seq, device=dev, dtype=f32) for name in ("b", "a", "cm")}
    out["gc"] = torch.empty(bh, nc, device=dev, dtype=f32)
    out["ac"] = torch.empty(bh, nc, device=dev, dtype=f32)
    fwd_gates[(nc, bh)](i, f, out["b"], out["a"], out["cm"], out["gc"], out["ac"], seq, nc, L=chunk,
                               num_warps=4)
    out["cs"], out["ns"], out["mc"] = _states(k, v, out, c0, n0, m0, chunk, out if final else None, plan)
    outputs(q, k, v, i, out, eps, chunk, plan)
    return out


def outputs(q: Tensor, k: Tensor, v: Tensor, i: Tensor, out: dict, eps: float, chunk: int,
            plan: Plan | None = None) -> None:
    """The output kernel: ``h``, the per-token stabiliser ``M`` and denominator ``den`` into ``out``, from
    the gate and state buffers of :func:`forward` in it."""
    bh, seq = i.shape
    dqk, dv = q.shape[-1], v.shape[-1]
    nc = triton.cdiv(seq, chunk)
    prec, state_f32 = dot_settings(q.dtype)
    nh, *sq = layout(q)
    out["h"] = torch.empty(bh, seq, dv, device=q.device, dtype=q.dtype)
    out["M"] = torch.empty(bh, seq, device=q.device, dtype=torch.float32)  # per-token stabiliser m_t
    out["den"] = torch.empty(bh, seq, device=q.device, dtype=torch.float32)
    launcher, meta = (fwd_out, {}) if plan is None else (_out_fixed, plan.out_meta())
    launcher[lambda m: (triton.cdiv(seq, m["BLQ"]), m["NVP"], bh)](
        q, k, v, i, out["b"], out["cm"], out["cs"], out["ns"], out["mc"], out["h"], out["M"], out["den"],
        seq, nc, nh, *sq, *layout(k)[1:], *layout(v)[1:], dqk ** -0.5, eps,
        DQK=dqk, DV=dv, DQKP=pow2(dqk), L=chunk, PREC=prec, STATE_F32=state_f32, TK=_tune_key(bh, seq), **meta,
    )


def _states(k, v, gates, c0, n0, m0, chunk, final: dict | None, plan: Plan | None = None):
    """The inter-chunk recurrence: states entering each chunk, m_c, and (into ``final``) the final state."""
    bh, seq = gates["a"].shape
    dqk, dv = k.shape[-1], v.shape[-1]
    nc = triton.cdiv(seq, chunk)
    prec, _ = dot_settings(k.dtype)
    cs = torch.empty(bh, nc, dqk, dv, device=k.device, dtype=state_dtype(k.dtype))
    ns = torch.empty(bh, nc, dqk, device=k.device, dtype=torch.float32)
    mc = torch.empty(bh, nc + 1, device=k.device, dtype=torch.float32)
    if final is not None:
        final["cn"] = torch.empty(bh, dqk, dv, device=k.device, dtype=torch.float32)
        final["nn"] = torch.empty(bh, dqk, device=k.device, dtype=torch.float32)
        final["mn"] = torch.empty(bh, device=k.device, dtype=torch.float32)
    has_init = c0 is not None
    fin = (final["cn"], final["nn"], final["mn"]) if final is not None else (mc, mc, mc)
    launcher, meta = (fwd_states, {}) if plan is None else (_states_fixed, plan.states_meta())
    launcher[lambda m: (triton.cdiv(dqk, m["BK"]), triton.cdiv(dv, m["BV"]), bh)](
        k, v, gates["a"], gates["gc"], gates["ac"], c0 if has_init else mc, n0 if has_init else mc,
        m0 if has_init else mc, cs, ns, mc, *fin, seq, nc, *layout(k), *layout(v)[1:],
        DQK=dqk, DV=dv, L=chunk, HAS_INIT=has_init, WRITE_FINAL=final is not None, PREC=prec,
        TK=_tune_key(bh, seq), **meta,
    )
    return cs, ns, mc


def backward_kernels(q, k, v, i, f, h, dh, saved: dict, c0, n0, m0, dcn, dnn, lam, dmn, eps: float,
                     chunk: int) -> dict[str, Tensor]:
    """All backward kernels; ``saved`` holds the forward's per-token and per-chunk gate buffers."""
    bh, seq, dqk = q.shape
    dv = v.shape[-1]
    nc = triton.cdiv(seq, chunk)
    prec, state_f32 = dot_settings(q.dtype)
    dev = q.device
    f32 = torch.float32
    scale = dqk ** -0.5
    tk = _tune_key(bh, seq)
    b, M, mc = saved["b"], saved["M"], saved["mc"]
    cs, ns, _ = _states(k, v, saved, c0, n0, m0, chunk, None)  # recomputed, not kept between the passes
    inv = torch.empty(bh, seq, device=dev, dtype=f32)
    nu = torch.empty_like(inv)
    gm = torch.empty_like(inv)
    bt = 16 if dv <= 512 else 8
    bwd_prep[(triton.cdiv(seq, bt), bh)](dh, h, saved["den"], M, inv, nu, gm, seq, eps, DV=dv, DVP=pow2(dv),
                                                BT=bt, num_warps=4)
    need_dinit = c0 is not None
    dcs = torch.empty(bh, nc, dqk, dv, device=dev, dtype=state_dtype(q.dtype))
    dns = torch.empty(bh, nc, dqk, device=dev, dtype=f32)
    dc0 = torch.empty(bh, dqk, dv, device=dev, dtype=f32) if need_dinit else inv
    dn0 = torch.empty(bh, dqk, device=dev, dtype=f32) if need_dinit else inv
    has_df = dcn is not None
    bwd_dstates[lambda meta: (triton.cdiv(dqk, meta["BK"]), triton.cdiv(dv, meta["BV"]), bh)](
        q, dh, inv, nu, b, M, mc, saved["gc"], dcn if has_df else inv, dnn if has_df else inv, dcs, dns, dc0, dn0,
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
        q, k, v, dh, i, b, M, saved["a"], mc, inv, nu, dcs, dns, dk, kdk, seq, nc, scale, **common,
    )
    bwd_dv[lambda meta: (triton.cdiv(seq, meta["BLK"]), meta["NVP"], bh)](
        q, k, dh, i, b, M, saved["a"], mc, inv, dcs, dvv, seq, nc, scale, **common,
    )
    # gate gradients (with the stabiliser's own gradient routed along its argmax)
    own, wl, qk = (torch.empty(bh, nc, device=dev, dtype=f32) for _ in range(3))
    bwd_gates_a[(nc, bh)](i, b, mc, gm, qdq, kdk, own, wl, qk, seq, nc, L=chunk, num_warps=4)
    gall = torch.empty(bh, nc + 1, device=dev, dtype=f32)
    qall = torch.empty_like(gall)
    dm0 = torch.empty(bh, device=dev, dtype=f32)
    has_dmn, has_lam = dmn is not None, lam is not None  # contiguous float32 [BH] where given
    bwd_gates_b[(bh,)](own, wl, qk, dmn if has_dmn else dm0, lam if has_lam else dm0, gall, qall, dm0, nc,
                       NCP=pow2(nc), HAS_DMN=has_dmn, HAS_LAM=has_lam, num_warps=4)
    di = torch.empty(bh, seq, device=dev, dtype=f32)
    df = torch.empty_like(di)
    bwd_gates_c[(nc, bh)](i, f, b, mc, gm, qdq, kdk, gall, qall, lam if has_lam else dm0, di, df, seq, nc, L=chunk,
                          HAS_LAM=has_lam, num_warps=4 if chunk <= 64 else 8)
    out = {"dq": dq, "dk": dk, "dv": dvv, "di": di, "df": df, "dm0_path": dm0}
    if need_dinit:
        out["dc0"], out["dn0"] = dc0, dn0
    return out


class MLSTMChunkwiseFn(torch.autograd.Function):
    """Differentiable chunkwise mLSTM on ``[BH,S,D]`` inputs (gates ``[BH,S]`` float32)."""

    SAVED = ("b", "a", "M", "den", "mc", "gc", "ac")

    @staticmethod
    def forward(ctx, q, k, v, i, f, c0, n0, m0, eps: float, chunk: int):
        out = forward(q, k, v, i, f, c0, n0, m0, eps, chunk)
        ctx.set_materialize_grads(False)
        ctx.eps, ctx.chunk = eps, chunk
        ctx.save_for_backward(q, k, v, i, f, out["h"], c0, n0, m0, out["cn"], out["nn"],
                              *(out[name] for name in MLSTMChunkwiseFn.SAVED))
        return out["h"], out["cn"], out["nn"], out["mn"]

    @staticmethod
    def backward(ctx, dh, dcn, dnn, dmn):
        q, k, v, i, f, h, c0, n0, m0, cn, nn, *rest = ctx.saved_tensors
        saved = dict(zip(MLSTMChunkwiseFn.SAVED, rest))
        dh = torch.zeros_like(h) if dh is None else dh.contiguous()
        has_df = dcn is not None or dnn is not None
        lam = None
        if has_df:
            dcn = torch.zeros_like(cn) if dcn is None else dcn.float().contiguous()
            dnn = torch.zeros_like(nn) if dnn is None else dnn.float().contiguous()
            lam = (dcn * cn).sum((-1, -2)) + (dnn * nn).sum(-1)
        g = backward_kernels(q, k, v, i, f, h, dh, saved, c0, n0, m0, dcn, dnn, lam,
                             None if dmn is None else dmn.float().contiguous(), ctx.eps, ctx.chunk)
        dc0 = dn0 = dm0 = None
        if c0 is not None:
            dc0, dn0 = g["dc0"], g["dn0"]
            dm0 = (dc0 * c0).sum((-1, -2)) + (dn0 * n0).sum(-1) + g["dm0_path"]
        return g["dq"], g["dk"], g["dv"], g["di"], g["df"], dc0, dn0, dm0, None, None
