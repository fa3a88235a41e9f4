"""Quantized-matmul kernels: the weight-only matmul for a few rows (decode batches) and the dynamic
per-row FP8 quantization of activations (the W8A8 prefill path).

Weight-only: ``y = x @ (data * scale).T``.

``data [N, K]`` int8 or float8_e4m3fn (row-major, as ``nn.Linear`` stores weights), ``scale [N]``
float32, ``x [M, K]`` bf16 / fp16 / fp32 with ``M`` small. Each program streams a ``BN x K`` strip of the
weight once, converts each tile to ``x``'s dtype in registers (exact: int8 and e4m3 values are bf16 /
fp16 values) and accumulates ``x . w`` in float32 on the tensor cores (rows padded to 16); the
per-channel scale multiplies the float32 accumulator, and the result is rounded once to ``x``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FP32_DOT, INTERPRET


@triton.jit
def _wo_mm_kernel(X, W, S, Y, M, N, K, sxm, sym, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  STAGES: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    mm, mn = rm < M, rn < N
    dt = X.dtype.element_ty
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        x = tl.load(X + rm[:, None] * sxm + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        w = tl.load(W + rn[:, None] * K + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(dt)), acc, input_precision=PREC)
    s = tl.load(S + rn, mask=mn, other=0.0)
    y = acc * s[None, :]
    tl.store(Y + rm[:, None] * sym + rn[None, :], y.to(Y.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _quant_rows_kernel(X, Q, S, K, sxm, sqm, BK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BK], dtype=tl.float32)
    for k0 in tl.range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(X + row * sxm + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    a = tl.max(amax, axis=0)
    scale = tl.where(a > 0, tl.math.div_rn(a, 448.0), 1.0)
    tl.store(S + row, scale)
    for k0 in tl.range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(X + row * sxm + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
        tl.store(Q + row * sqm + cols, q.to(Q.dtype.element_ty), mask=cols < K)


def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`fastxlstm.ops.quant.quantize_rows_fp8` in one launch (one program per row reads it twice:
    its absolute maximum, then the scaled, saturated e4m3 values, rounded to nearest even)."""
    if x.ndim != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_rows_fp8 takes rows x [M, K] with contiguous rows, got {tuple(x.shape)}")
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    if m:
        bk = 32 if INTERPRET else min(2048, triton.next_power_of_2(k))
        _quant_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BK=bk, num_warps=1 if INTERPRET else 4)
    return q, s


#: (N, K) -> (BN, BK, num_warps, stages): the best of the H200 sweep at batch 8 (2026-12-03,
#: benchmarks/quant_gpu.py, FP8 weights; 2.3 / 1.3 / 2.3 / 1.6 TB/s for w_in / w_out / w_up / w_down)
CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (12304, 4096): (32, 256, 4, 4), (4096, 4096): (32, 256, 4, 4), (21888, 4096): (32, 256, 4, 4),
    (4096, 10944): (32, 256, 4, 4)}


def wo_config(n: int, k: int) -> tuple[int, int, int, int]:
    if (n, k) in CONFIGS:
        return CONFIGS[(n, k)]
    if INTERPRET:
        return 16, 32, 1, 1
    return 32, 256, 4, 4


def wo_matmul(x: Tensor, data: Tensor, scale: Tensor, out: Tensor | None = None,
              config: tuple[int, int, int, int] | None = None) -> Tensor:
    """``x [M, K] @ (data * scale).T`` -> ``[M, N]`` in ``x``'s dtype (see the module docstring)."""
    if x.ndim != 2 or data.ndim != 2 or x.shape[1] != data.shape[1]:
        raise ValueError(f"wo_matmul takes x [M, K] and data [N, K], got {tuple(x.shape)} and {tuple(data.shape)}")
    if data.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"wo_matmul needs int8 or float8_e4m3fn weights, got {data.dtype}")
    if not data.is_contiguous() or scale.numel() != data.shape[0]:
        raise ValueError("wo_matmul needs a contiguous weight and one scale per output row")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = data.shape[0]
    y = out if out is not None else torch.empty(m, n, device=x.device, dtype=x.dtype)
    bn, bk, warps, stages = config or wo_config(n, k)
    bm = 16 if m <= 16 else 32
    prec = ("ieee" if INTERPRET else FP32_DOT) if x.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _wo_mm_kernel[grid](x, data, scale, y, m, n, k, x.stride(0), y.stride(0), BM=bm, BN=bn, BK=bk, STAGES=stages,
                        PREC=prec, num_warps=warps)
    return y
