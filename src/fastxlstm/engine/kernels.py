"""Fused elementwise / row-norm kernels of the engine's forward (Triton on CUDA, PyTorch elsewhere).

Each op rounds exactly where the model's module code rounds (e.g. RMSNorm: normalise in
float32, round to the activation dtype, multiply by the weight, round again), so the fused
path computes the model's function; only reduction order may differ in the last bit.

Ops (rows are the leading dim, features the last):

* :func:`add_rmsnorm` - ``x += delta`` (in place, optional) then ``rmsnorm(x) * w``;
* :func:`gates` - soft-capped float32 input/forget gates from the fused preactivations, with
  rows where ``active`` is False set to ``i=-inf, f=+inf`` (the mLSTM step then leaves their
  state bit-for-bit unchanged);
* :func:`mhnorm_ogate` - per-head LayerNorm of ``h`` times its weight, times ``sigmoid(o)``;
* :func:`silu_mul` - ``silu(gate) * up`` of the fused gate|up projection;
* :func:`softcap_logits` - float32 ``cap * tanh(x / cap)`` of the LM-head output;
* :func:`heads_major` - ``[S, NH*D]`` column blocks of a projection as contiguous ``[NH, S, D]``
  (the chunkwise kernels' layout; one tiled copy instead of a strided transpose per tensor).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton is optional (CPU installs, CI)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(x: Tensor) -> bool:
    """Triton kernels run for CUDA tensors when triton imports (and for CPU tensors under
    ``TRITON_INTERPRET=1``, which the tests use)."""
    return HAS_TRITON and (x.is_cuda or INTERPRET)


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


# ----------------------------------------------------------------------------- Triton
if HAS_TRITON:
    from ..ops.triton._common import head_norm_ogate as _head_norm_ogate
    from ..ops.triton._common import tanh as _tanh

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, y_ptr, sx, sd, sy, n_cols, eps,
                            HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(d_ptr + row * sd + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + row * sx + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        y = (xf * rstd).to(y_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (y.to(tl.float32) * w.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * sy + cols, y, mask=mask)

    @triton.jit
    def _gates_kernel(p_ptr, b_ptr, a_ptr, i_ptr, f_ptr, sp, seq, cap, NH: tl.constexpr, BLOCK: tl.constexpr,
                      HAS_CAP: tl.constexpr, HAS_ACTIVE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK)
        mask = h < NH
        ig = tl.load(p_ptr + row * sp + h, mask=mask, other=0.0).to(tl.float32)
        fg = tl.load(p_ptr + row * sp + NH + h, mask=mask, other=0.0).to(tl.float32)
        # the bias add rounds to the activation dtype, as the model's linear layer does
        ig = (ig + tl.load(b_ptr + h, mask=mask, other=0.0)).to(p_ptr.dtype.element_ty).to(tl.float32)
        fg = (fg + tl.load(b_ptr + NH + h, mask=mask, other=0.0)).to(p_ptr.dtype.element_ty).to(tl.float32)
        if HAS_CAP:
            ig = cap * _tanh(ig / cap)
            fg = cap * _tanh(fg / cap)
        if HAS_ACTIVE:
            act = tl.load(a_ptr + row + h * 0) != 0
            ig = tl.where(act, ig, float("-inf"))
            fg = tl.where(act, fg, float("inf"))
        out = (row // seq) * NH * seq + row % seq + h * seq  # [N // seq, NH, seq] (seq = 1: [N, NH])
        tl.store(i_ptr + out, ig, mask=mask)
        tl.store(f_ptr + out, fg, mask=mask)

    @triton.jit
    def _mhnorm_ogate_kernel(h_ptr, o_ptr, w_ptr, y_ptr, s_hb, s_hh, s_ob, s_yb, eps,
                             NH: tl.constexpr, DV: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // NH
        head = pid % NH
        offs = tl.arange(0, DV)
        hv = tl.load(h_ptr + b * s_hb + head * s_hh + offs).to(y_ptr.dtype.element_ty).to(tl.float32)
        out = _head_norm_ogate(hv, tl.load(w_ptr + head * DV + offs), tl.load(o_ptr + b * s_ob + head * DV + offs),
                               eps, DV, y_ptr.dtype.element_ty)
        tl.store(y_ptr + b * s_yb + head * DV + offs, out)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, y_ptr, s_gu, s_y, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(gu_ptr + row * s_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * s_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty)
        y = (s.to(tl.float32) * u).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * s_y + cols, y, mask=mask)

    @triton.jit
    def _softcap_kernel(x_ptr, y_ptr, s_x, s_y, n_cols, cap, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_CAP:
            x = cap * _tanh(x / cap)
        tl.store(y_ptr + row * s_y + cols, x, mask=mask)


    @triton.jit
    def _heads_major_kernel(x_ptr, y_ptr, sx, S, D: tl.constexpr, BS: tl.constexpr):
        pid_s = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
        rows = (pid_s * BS + tl.arange(0, BS)).to(tl.int64)
        cols = tl.arange(0, D)
        mask = rows[:, None] < S
        x = tl.load(x_ptr + rows[:, None] * sx + head * D + cols[None, :], mask=mask)
        tl.store(y_ptr + head * S * D + rows[:, None] * D + cols[None, :], x, mask=mask)


@functools.cache
def _warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def _rows(x: Tensor) -> Tensor:
    """2-D view ``[N, D]`` (last dim contiguous) of ``x``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x


# ------------------------------------------------------------------------------ public
def add_rmsnorm(x: Tensor, delta: Tensor | None, weight: Tensor | None, eps: float,
                bias: Tensor | None = None) -> Tensor:
    """``x += delta`` in place (when given), then return ``RMSNorm(x)`` (``x`` itself when
    ``weight`` is None); ``x`` is ``[N, D]``."""
    if (use_triton(x) and weight is not None and bias is None and x.ndim == 2 and x.stride(-1) == 1
            and (delta is None or delta.shape == x.shape)):
        n, d = x.shape
        y = torch.empty_like(x)
        dd = x if delta is None else (delta if delta.stride(-1) == 1 else delta.contiguous())
        block = _next_pow2(d)
        _add_rmsnorm_kernel[(n,)](x, dd, weight, y, x.stride(0), dd.stride(0), y.stride(0), d, eps,
                                  HAS_DELTA=delta is not None, BLOCK=block, num_warps=_warps(block))
        return y
    if delta is not None:
        x.add_(delta)
    if weight is None:
        return x
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight
    return y + bias if bias is not None else y


def gates(pre: Tensor, num_heads: int, cap: float | None, active: Tensor | None = None,
          bias: Tensor | None = None, seq: int | None = None) -> tuple[Tensor, Tensor]:
    """Soft-capped float32 gates ``(i, f)`` ``[N, NH]`` from ``pre = [i | f]`` preactivations ``[N, 2NH]``
    (plus the float32 ``bias [2NH]``, rounded to pre's dtype as a linear layer's output is). With ``seq``
    (rows are ``N // seq`` sequences of ``seq`` tokens) they come head-major, ``[N // seq, NH, seq]``."""
    n = pre.shape[0]
    shape = (n, num_heads) if seq is None else (n // seq, num_heads, seq)
    if bias is None:
        bias = torch.zeros(2 * num_heads, device=pre.device, dtype=torch.float32)
    if use_triton(pre) and pre.stride(-1) == 1:
        i = torch.empty(shape, device=pre.device, dtype=torch.float32)
        f = torch.empty_like(i)
        act = active if active is not None else i
        _gates_kernel[(n,)](pre, bias, act, i, f, pre.stride(0), seq or 1, float(cap or 1.0), NH=num_heads,
                            BLOCK=_next_pow2(num_heads), HAS_CAP=cap is not None, HAS_ACTIVE=active is not None,
                            num_warps=1)
        return i, f
    g = (pre.float() + bias).to(pre.dtype).float()
    if cap is not None:
        g = cap * torch.tanh(g / cap)
    i, f = g[:, :num_heads], g[:, num_heads:]
    if active is not None:
        a = active[:, None]
        i = torch.where(a, i, torch.full_like(i, float("-inf")))
        f = torch.where(a, f, torch.full_like(f, float("inf")))
    if seq is not None:
        i, f = (t.reshape(n // seq, seq, num_heads).transpose(1, 2) for t in (i, f))
    return i.contiguous(), f.contiguous()


def mhnorm_ogate(h: Tensor, o: Tensor, weight: Tensor, eps: float, bias: Tensor | None = None) -> Tensor:
    """``sigmoid(o) * MultiHeadLayerNorm(h)``; h ``[N, NH, DV]``, o ``[N, NH*DV]`` -> ``[N, NH*DV]`` in o's dtype."""
    n, nh, dv = h.shape
    if (use_triton(h) and bias is None and h.stride(-1) == 1 and o.stride(-1) == 1
            and dv == _next_pow2(dv)):
        y = torch.empty(n, nh * dv, device=h.device, dtype=o.dtype)
        _mhnorm_ogate_kernel[(n * nh,)](h, o, weight, y, h.stride(0), h.stride(1), o.stride(0), y.stride(0), eps,
                                        NH=nh, DV=dv, num_warps=_warps(dv) // 2 or 1)
        return y
    hf = h.to(o.dtype).float()
    centred = hf - hf.mean(dim=-1, keepdim=True)
    y = centred * torch.rsqrt(hf.var(dim=-1, keepdim=True, unbiased=False) + eps)
    y = y.to(o.dtype).flatten(-2) * weight
    if bias is not None:
        y = y + bias
    return torch.sigmoid(o) * y


def silu_mul(gu: Tensor, hidden: int) -> Tensor:
    """``silu(gu[:, :hidden]) * gu[:, hidden:]``."""
    if use_triton(gu) and gu.ndim == 2 and gu.stride(-1) == 1:
        n = gu.shape[0]
        y = torch.empty(n, hidden, device=gu.device, dtype=gu.dtype)
        block = 1024
        _silu_mul_kernel[(n, triton.cdiv(hidden, block))](gu, y, gu.stride(0), y.stride(0), hidden, BLOCK=block,
                                                           num_warps=4)
        return y
    gate, up = gu.split(hidden, dim=-1)
    return F.silu(gate) * up


def softcap_logits(x: Tensor, cap: float | None) -> Tensor:
    """float32 ``cap * tanh(x / cap)`` of ``x [N, V]``."""
    if use_triton(x) and x.ndim == 2 and x.stride(-1) == 1:
        n, v = x.shape
        y = torch.empty(n, v, device=x.device, dtype=torch.float32)
        block = 2048
        _softcap_kernel[(n, triton.cdiv(v, block))](x, y, x.stride(0), y.stride(0), v, float(cap or 1.0),
                                                     HAS_CAP=cap is not None, BLOCK=block, num_warps=4)
        return y
    y = x.float()
    return y if cap is None else cap * torch.tanh(y / cap)


def heads_major(x: Tensor, num_heads: int) -> Tensor:
    """``x [S, NH*D]`` (last dim contiguous, any row stride) as a contiguous ``[NH, S, D]`` tensor."""
    s, width = x.shape
    d = width // num_heads
    if use_triton(x) and x.stride(-1) == 1 and d == _next_pow2(d) and d <= 1024:
        y = torch.empty(num_heads, s, d, device=x.device, dtype=x.dtype)
        bs = max(1, 8192 // d)
        _heads_major_kernel[(triton.cdiv(s, bs), num_heads)](x, y, x.stride(0), s, D=d, BS=bs, num_warps=4)
        return y
    return x.reshape(s, num_heads, d).transpose(0, 1).contiguous()
