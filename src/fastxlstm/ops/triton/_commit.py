"""The speculative commit on Triton: ``(C, n)`` advanced in place over each row's accepted tokens.

The per-(row, head) scalars (the new stabiliser ``m'``, the decay ``exp(g + m - m')`` and the token weights
``exp(a_t - m')``, ``[B, NH, T]``) are a few PyTorch ops on tiny tensors; the kernel then reads and writes every
tile of ``C`` once: ``C' = decay * C + sum_t w_t k_t v_t^T`` (``T``, the step's ``k + 1`` tokens, is a
compile-time constant), and the programs of the first ``DV`` tile update ``n`` alike. Rows past their accepted
length carry ``w_t = 0`` and ``decay = 1`` for an idle row. ``C`` may be stored in float32 or bfloat16 (math in
float32). No autotuning; capturable in a CUDA graph.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ...state import State
from ..reference import commit_weights
from ._common import pow2


@triton.jit
def _commit_kernel(c_ptr, n_ptr, k_ptr, v_ptr, w_ptr, d_ptr, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                   NH: tl.constexpr, T: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0)
    pid_k, pid_v = tl.program_id(1), tl.program_id(2)
    b, h = bh // NH, bh % NH
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk, mv = offs_k < DQK, offs_v < DV
    decay = tl.load(d_ptr + bh)
    cptr = c_ptr + bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :]
    cmask = mk[:, None] & mv[None, :]
    acc = tl.load(cptr, mask=cmask, other=0.0).to(tl.float32) * decay
    nacc = tl.zeros([BK], dtype=tl.float32)
    k_row = k_ptr + b * s_kb + h * s_kh
    v_row = v_ptr + b * s_vb + h * s_vh
    for t in tl.static_range(T):
        w = tl.load(w_ptr + bh * T + t)
        kt = tl.load(k_row + t * s_kt + offs_k, mask=mk, other=0.0).to(tl.float32) * w
        vt = tl.load(v_row + t * s_vt + offs_v, mask=mv, other=0.0).to(tl.float32)
        acc += kt[:, None] * vt[None, :]
        nacc += kt
    tl.store(cptr, acc.to(c_ptr.dtype.element_ty), mask=cmask)
    if pid_v == 0:
        nptr = n_ptr + bh * DQK + offs_k
        tl.store(nptr, tl.load(nptr, mask=mk, other=0.0) * decay + nacc, mask=mk)


def mlstm_commit_(state: State, k: Tensor, v: Tensor, i: Tensor, f: Tensor, lengths: Tensor) -> None:
    """In-place commit of the first ``lengths[b]`` tokens (see :func:`fastxlstm.ops.mlstm_commit_`): ``C`` and
    ``n`` contiguous (``C`` float32 or bfloat16, ``n``, ``m`` float32), k and v with a contiguous last dim."""
    c, n, m = state
    b, nh, steps, dqk = k.shape
    dv = v.shape[-1]
    if not (c.is_contiguous() and n.is_contiguous() and k.stride(-1) == 1 and v.stride(-1) == 1):
        raise ValueError("the Triton commit needs contiguous C and n and k, v with a contiguous last dim")
    m_new, decay, w = commit_weights(i, f, m, lengths)
    bk, bv = min(pow2(dqk), 64), min(pow2(dv), 64)
    grid = (b * nh, triton.cdiv(dqk, bk), triton.cdiv(dv, bv))
    _commit_kernel[grid](c, n, k, v, w.contiguous(), decay.contiguous(), k.stride(0), k.stride(1), k.stride(2),
                         v.stride(0), v.stride(1), v.stride(2), NH=nh, T=steps, DQK=dqk, DV=dv, BK=bk, BV=bv,
                         num_warps=4)
    m.copy_(m_new)
