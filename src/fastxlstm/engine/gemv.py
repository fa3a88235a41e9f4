"""Batch-1 decode projections as Triton GEMVs with the neighbouring elementwise work fused in.

At batch 1 every projection is a matrix-vector product bound by streaming the weight; the small
kernels between them (RMSNorm, SwiGLU, residual add, logit soft-cap) cost a launch each. Here a
GEMV ``y = W @ x'`` (``W [N, K]`` row-major, as ``nn.Linear`` stores it) computes its input ``x'``
on the fly from a prologue and folds an epilogue into its output:

* prologue ``"none"``: ``x' = x``; ``"rmsnorm"``: ``x' = RMSNorm(x) * w`` (each program first reduces
  the whole row, which is a few KiB from L2); ``"silu_mul"``: ``x' = silu(x[:K]) * x[K:2K]``;
* epilogue ``"store"``: ``y = W x'`` in y's dtype; ``"residual"``: ``r += W x'`` in place;
  ``"softcap"``: float32 ``cap * tanh((W x') / cap)`` (the LM head).

Rounding follows the model's modules (and :mod:`fastxlstm.engine.kernels`): every elementwise
result is rounded to the activation dtype where the module's would be, the GEMV output too.

A quantized weight (:class:`fastxlstm.ops.quant.QuantWeight`: int8 / FP8 ``data [N, K]`` and float32
per-row ``scale``) is streamed as it is stored and converted to float32 in registers; the row scale
multiplies the float32 dot product before the output is rounded (weight-only quantization: the
activations stay in their dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.quant import QuantWeight
from .kernels import HAS_TRITON, INTERPRET

PROLOGUES = {"none": 0, "rmsnorm": 1, "silu_mul": 2}
EPILOGUES = {"store": 0, "residual": 1, "softcap": 2}

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ..ops.triton._common import tanh as _tanh

    @triton.jit
    def _gemv_kernel(X, NW, W, S, R, Y, N, eps, cap, K: tl.constexpr, PRO: tl.constexpr, EPI: tl.constexpr,
                     HAS_CAP: tl.constexpr, HAS_SCALE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     STAGES: tl.constexpr):
        pid = tl.program_id(0)
        rows = (pid * BN + tl.arange(0, BN)).to(tl.int64)
        mr = rows < N
        dt = X.dtype.element_ty
        rstd = 0.0
        if PRO == 1:
            ss = tl.zeros([BK], dtype=tl.float32)
            for k0 in tl.range(0, K, BK):
                cols = k0 + tl.arange(0, BK)
                xs = tl.load(X + cols, mask=cols < K, other=0.0).to(tl.float32)
                ss += xs * xs
            rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        for k0 in tl.range(0, K, BK, num_stages=STAGES):
            cols = k0 + tl.arange(0, BK)
            mk = cols < K
            x = tl.load(X + cols, mask=mk, other=0.0).to(tl.float32)
            if PRO == 1:
                nw = tl.load(NW + cols, mask=mk, other=0.0).to(tl.float32)
                x = ((x * rstd).to(dt).to(tl.float32) * nw).to(dt).to(tl.float32)
            elif PRO == 2:
                u = tl.load(X + K + cols, mask=mk, other=0.0).to(tl.float32)
                s = (x / (1.0 + tl.exp(-x))).to(dt).to(tl.float32)
                x = (s * u).to(dt).to(tl.float32)
            w = tl.load(W + rows[:, None] * K + cols[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:
            y = y * tl.load(S + rows, mask=mr, other=0.0)
        y = y.to(dt)
        if EPI == 0:
            tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=mr)
        elif EPI == 1:
            r = tl.load(R + rows, mask=mr, other=0.0).to(tl.float32)
            tl.store(R + rows, (r + y.to(tl.float32)).to(R.dtype.element_ty), mask=mr)
        else:
            yf = y.to(tl.float32)
            if HAS_CAP:
                yf = cap * _tanh(yf / cap)
            tl.store(Y + rows, yf, mask=mr)


#: (N, K) -> (BN, BK, num_warps, stages); filled from the H100 sweep (benchmarks), else :func:`gemv_config`
CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {}


#: the same for 1-byte (int8 / FP8) weights: the best of the H200 sweep (2026-12-03, benchmarks/quant_gpu.py,
#: FP8 weights: 2.70 / 2.43 / 2.95 TB/s; w_down keeps the default below, 3.02 TB/s)
CONFIGS_8BIT: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (12304, 4096): (8, 1024, 4, 3), (4096, 4096): (8, 1024, 4, 3), (21888, 4096): (8, 1024, 4, 3)}


def gemv_config(n: int, k: int, weight_bytes: int = 2) -> tuple[int, int, int, int]:
    """(rows per program, K tile, warps, pipeline stages)."""
    table = CONFIGS_8BIT if weight_bytes == 1 else CONFIGS
    if (n, k) in table:
        return table[(n, k)]
    if INTERPRET:
        return 16, 32, 1, 1
    if weight_bytes == 1:  # the same bytes per tile as the 2-byte configs below
        bn, bk, warps, stages = gemv_config(n, k)
        return bn, 2 * bk, warps, stages
    # H100 sweep over the 7B projections (2026-11-24, decode_profile.json): tall matrices stream best
    # with 4-row x 1024-wide tiles, the 4096-row ones with more rows per program.
    if n >= 8192:
        return 4, 1024, 4, 3
    return (16, 512, 4, 3) if k >= 8192 else (8, 512, 4, 3)


def gemv(x: Tensor, weight: Tensor | QuantWeight, *, prologue: str = "none", norm_weight: Tensor | None = None,
         eps: float = 1e-6, epilogue: str = "store", residual: Tensor | None = None, cap: float | None = None,
         out: Tensor | None = None, config: tuple[int, int, int, int] | None = None) -> Tensor:
    """One row ``x [1, K]`` (``[1, 2K]`` for ``silu_mul``) times ``weight [N, K]``ᵀ with the fused
    prologue / epilogue (see the module docstring). Returns ``y [1, N]`` (``residual`` itself for
    the residual epilogue, updated in place). ``weight`` may be quantized (see the module docstring)."""
    scale = None
    if isinstance(weight, QuantWeight):
        weight, scale = weight.data, weight.scale
    n, k = weight.shape
    if x.ndim != 2 or x.shape[0] != 1 or not x.is_contiguous() or not weight.is_contiguous():
        raise ValueError("gemv takes one contiguous row x [1, K] and a contiguous weight [N, K]")
    if x.shape[1] != (2 * k if prologue == "silu_mul" else k):
        raise ValueError(f"x has {x.shape[1]} features for a weight of shape {tuple(weight.shape)}")
    pro, epi = PROLOGUES[prologue], EPILOGUES[epilogue]
    if pro == 1 and norm_weight is None:
        raise ValueError("the rmsnorm prologue needs norm_weight")
    if epi == 1:
        if residual is None or residual.shape != (1, n) or not residual.is_contiguous():
            raise ValueError("the residual epilogue needs a contiguous residual [1, N]")
        y = residual
    elif out is not None:
        y = out
    else:
        y = torch.empty(1, n, device=x.device, dtype=torch.float32 if epi == 2 else x.dtype)
    bn, bk, warps, stages = config or gemv_config(n, k, weight.element_size())
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, norm_weight if norm_weight is not None else x, weight, scale if scale is not None else x, y, y, n, eps,
        float(cap or 1.0), K=k, PRO=pro, EPI=epi, HAS_CAP=cap is not None, HAS_SCALE=scale is not None, BN=bn,
        BK=bk, STAGES=stages, num_warps=warps)
    return y
