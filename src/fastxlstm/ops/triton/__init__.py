"""Triton kernels for the mLSTM cell (the ``backend="triton"`` of :mod:`fastxlstm.ops`).

* :func:`mlstm_chunkwise` -- chunkwise forward (two-level tiling: chunk states at a coarse
  granularity, small tiles inside) and its backward through an autograd Function;
* :func:`mlstm_step` / :func:`mlstm_step_` -- the fused decode step (functional / in place, the
  latter capturable in a CUDA graph);
* :func:`mlstm_decode_cell_` -- the inference engine's whole decode cell in one launch (gates from
  the fused projection, in-place step, per-head LayerNorm, output gate; float32 or bf16 ``C``);
* :func:`mlstm_commit_` -- speculative decoding's in-place commit of accepted tokens (one pass over ``C``).

Semantics are those of :mod:`fastxlstm.ops.reference` (stabilised state, ``m0 = 0`` for a missing
state, the final state's ``m``). Inputs may be bf16, fp16 or fp32; gates and states are fp32. The
kernels run on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1`` (tests). Importing this
package raises ImportError (:class:`~fastxlstm.extras.MissingDependency`, the install hint) without Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...extras import require
from ...state import State
from ..reference import mlstm_chunkwise_reference, mlstm_step_reference

require("triton", ("triton", "triton.language"), feature="fastxlstm.ops.triton (the Triton kernels)")

from ._chunkwise import DEFAULT_KERNEL_CHUNK, MLSTMChunkwiseFn, forward, kernel_chunk_for  # noqa: E402
from ._commit import mlstm_commit_  # noqa: E402
from ._common import INTERPRET  # noqa: E402
from ._step import launch_fused_step, launch_step  # noqa: E402

__all__ = ["mlstm_chunkwise", "mlstm_step", "mlstm_step_", "mlstm_decode_cell_", "mlstm_commit_",
           "DEFAULT_KERNEL_CHUNK", "INTERPRET"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_device(t: Tensor) -> None:
    if not (t.is_cuda or INTERPRET):
        raise ValueError("the Triton mLSTM kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU); "
                         f"got a tensor on {t.device}")


def _needs_grad(tensors: tuple[Tensor, ...], state: State | None) -> bool:
    tensors = tensors + (tuple(state) if state is not None else ())
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _flat_state(state: State, bh: int, dqk: int, dv: int) -> tuple[Tensor, Tensor, Tensor]:
    """(C, n, m) as contiguous float32 ``[BH,DQK,DV]``, ``[BH,DQK]``, ``[BH]``."""
    return (state[0].float().reshape(bh, dqk, dv).contiguous(), state[1].float().reshape(bh, dqk).contiguous(),
            state[2].float().reshape(bh).contiguous())


def _strided(t: Tensor, chunk: int) -> Tensor:
    """``t [B,NH,S,D]`` as the forward kernels read it: as it is where its last dim is contiguous and a
    chunk's token offsets fit in int32 (the kernels' offsets inside a tile), else a contiguous copy."""
    if t.stride(-1) == 1 and chunk * t.stride(2) + t.shape[-1] < 2**31:
        return t
    return t.contiguous()


def mlstm_chunkwise(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, initial_state: State | None = None,
    chunk_size: int = 64, eps: float = 1e-6, *, kernel_chunk: int | None = None, final_state: bool = True,
) -> tuple[Tensor, State | None]:
    """Chunkwise mLSTM; q,k ``[B,NH,S,DQK]``, v ``[B,NH,S,DV]``, i,f ``[B,NH,S]``.

    Returns ``(h [B,NH,S,DV] in q's dtype, (C, n, m) float32)``, differentiable w.r.t. q, k, v, i, f
    and the initial state. ``chunk_size`` is the reference's chunk; the kernels keep states every
    ``kernel_chunk`` tokens (default :data:`DEFAULT_KERNEL_CHUNK`), which changes results only by
    rounding. float64 inputs run the reference. Without gradients, q, k, v are read in place where
    their last dim is contiguous (any other strides: e.g. ``proj[:, :NH*D].view(S, NH, D).transpose(0, 1)[None]``
    of a fused projection, no copy); the autograd path copies them to a contiguous layout.
    """
    if q.dtype == torch.float64:
        return mlstm_chunkwise_reference(q, k, v, i, f, initial_state, chunk_size=chunk_size, eps=eps)
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be bf16, fp16 or fp32, got {q.dtype}")
    _check_device(q)
    bsz, nh, seq, dqk = q.shape
    dv = v.shape[-1]
    if seq == 0:
        return mlstm_chunkwise_reference(q, k, v, i, f, initial_state, chunk_size=chunk_size, eps=eps)
    bh = bsz * nh
    i2 = i.float().reshape(bh, seq).contiguous()
    f2 = f.float().reshape(bh, seq).contiguous()
    c0 = n0 = m0 = None
    if initial_state is not None:
        c0, n0, m0 = _flat_state(initial_state, bh, dqk, dv)
    chunk = kernel_chunk_for(seq, kernel_chunk, q.dtype)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if _needs_grad((q, k, v, i, f), initial_state):  # the backward kernels take contiguous [BH,S,D]
        q3, k3, v3 = (t.reshape(bh, seq, t.shape[-1]).contiguous() for t in (q, k, v))
        h, cn, nn, mn = MLSTMChunkwiseFn.apply(q3, k3, v3, i2, f2, c0, n0, m0, eps, chunk)
    else:  # the forward kernels read q, k, v in place (e.g. head views into a fused projection)
        out = forward(*(_strided(t, chunk) for t in (q, k, v)), i2, f2, c0, n0, m0, eps, chunk,
                      final=final_state)
        if not final_state:
            return out["h"].view(bsz, nh, seq, dv), None
        h, cn, nn, mn = out["h"], out["cn"], out["nn"], out["mn"]
    return h.view(bsz, nh, seq, dv), (cn.view(bsz, nh, dqk, dv), nn.view(bsz, nh, dqk), mn.view(bsz, nh))


def mlstm_step(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State | None = None, eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """One decode step (functional); q,k ``[B,NH,DQK]``, v ``[B,NH,DV]``, i,f ``[B,NH]``.

    Returns ``(h [B,NH,DV] in q's dtype, new state float32)``; the given state is not modified.
    Not differentiable: with gradients required (or float64 inputs) it runs the reference step.
    """
    if q.dtype == torch.float64 or _needs_grad((q, k, v, i, f), state):
        return mlstm_step_reference(q, k, v, i, f, state, eps=eps)
    _check_device(q)
    bsz, nh, dqk = q.shape
    dv = v.shape[-1]
    bh = bsz * nh
    dev = q.device
    if state is None:
        c = torch.zeros(bh, dqk, dv, device=dev, dtype=torch.float32)
        n = torch.zeros(bh, dqk, device=dev, dtype=torch.float32)
        m = torch.zeros(bh, device=dev, dtype=torch.float32)
    else:
        c, n, m = _flat_state(state, bh, dqk, dv)
    h = torch.empty(bh, dv, device=dev, dtype=q.dtype)
    c_out, n_out, m_out = torch.empty_like(c), torch.empty_like(n), torch.empty_like(m)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    launch_step(q, k, v, i, f, c, n, m, h, c_out, n_out, m_out, eps)
    return h.view(bsz, nh, dv), (c_out.view(bsz, nh, dqk, dv), n_out.view(bsz, nh, dqk), m_out.view(bsz, nh))


def mlstm_step_(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, C: Tensor, n: Tensor, m: Tensor, h_out: Tensor,
    eps: float = 1e-6,
) -> None:
    """In-place decode step: updates C ``[B,NH,DQK,DV]``, n ``[B,NH,DQK]``, m ``[B,NH]`` (contiguous
    float32) and writes h_out ``[B,NH,DV]`` (contiguous), in one kernel launch and with no allocation
    after the first call for a shape (CUDA-graph capturable: call once before capturing). q, k, v need a
    contiguous last dim; other strides (views into a fused projection) are fine."""
    bsz, nh, dqk = q.shape
    dv = v.shape[-1]
    want = {"k": (k, (bsz, nh, dqk)), "v": (v, (bsz, nh, dv)), "i": (i, (bsz, nh)), "f": (f, (bsz, nh)),
            "C": (C, (bsz, nh, dqk, dv)), "n": (n, (bsz, nh, dqk)), "m": (m, (bsz, nh)),
            "h_out": (h_out, (bsz, nh, dv))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    for name, t in (("C", C), ("n", n), ("m", m)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"state {name} must be a contiguous float32 tensor (updated in place)")
    if not h_out.is_contiguous():
        raise ValueError("h_out must be contiguous")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (no copies inside a captured step)")
    _check_device(q)
    launch_step(q, k, v, i, f, C, n, m, h_out, C, n, m, eps)


def mlstm_decode_cell_(
    proj: Tensor, gate_bias: Tensor, active: Tensor | None, C: Tensor, n: Tensor, m: Tensor, norm_weight: Tensor,
    out: Tensor, *, num_heads: int, cap: float | None, eps: float = 1e-6, norm_eps: float = 1e-6,
) -> None:
    """One decode step of an mLSTM layer from its fused input projection, in place and in one launch.

    ``proj [B, 2*NH*DQK + 2*NH*DV + 2*NH]`` holds ``q | k | v | o | i | f`` preactivations per row
    (last dim contiguous); the gates are ``cap * tanh((pre + gate_bias) / cap)`` (float32
    ``gate_bias [2NH]``; the sum rounded to proj's dtype first, as a linear layer's output), forced to
    ``i = -inf, f = +inf`` where ``active [B]`` (bool) is False so that row's state stays unchanged.
    Updates ``C [B,NH,DQK,DV]`` (float32 or bfloat16 storage, float32 math), ``n [B,NH,DQK]``,
    ``m [B,NH]`` (float32) and writes ``out [B, NH*DV] = sigmoid(o) * MultiHeadLayerNorm(h) * norm_weight``
    in out's dtype (the norm without bias, over each head's DV; DV a power of two).
    """
    bsz, nh, dqk, dv = C.shape
    if nh != num_heads:
        raise ValueError(f"C has {nh} heads, num_heads is {num_heads}")
    if tuple(proj.shape) != (bsz, 2 * nh * (dqk + dv + 1)) or proj.stride(-1) != 1:
        raise ValueError(f"proj must be [{bsz}, {2 * nh * (dqk + dv + 1)}] with a contiguous last dim, "
                         f"got {tuple(proj.shape)}")
    if C.dtype not in (torch.float32, torch.bfloat16) or not C.is_contiguous():
        raise ValueError("C must be a contiguous float32 or bfloat16 tensor (updated in place)")
    for name, t, shape in (("n", n, (bsz, nh, dqk)), ("m", m, (bsz, nh))):
        if tuple(t.shape) != shape or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape {shape}")
    if tuple(out.shape) != (bsz, nh * dv) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{bsz}, {nh * dv}] tensor")
    if active is not None and tuple(active.shape) != (bsz,):
        raise ValueError(f"active must have shape ({bsz},)")
    _check_device(proj)
    launch_fused_step(proj, gate_bias, active, C, n, m, norm_weight, out, nh, nh * dqk, nh * dv, cap, eps,
                      norm_eps)
