"""Weight quantization: per-output-channel int8 / FP8 (e4m3) weights and the quantized linear.

A quantized weight is ``W ~ data * scale`` with ``data [N, K]`` in ``int8`` (``round(W / scale)``,
clamped to +-127) or ``float8_e4m3fn`` (``W / scale`` cast with round-to-nearest-even) and one float32
``scale [N, 1] = max_k |W[n, k]| / qmax`` per output channel (qmax 127 / 448). Scales are computed in
float32 from the weight as the model holds it (its dtype).

:func:`linear` ``(x, weight, bias)`` takes a plain tensor (``F.linear``) or a :class:`QuantWeight`;
the output has ``x``'s dtype. Which math runs depends on the device and the number of rows
``M = x.numel() / K`` (the choice per shape measured on the H200, BENCHMARKS.md):

* CUDA, ``M <= WO_MAX_ROWS`` (decode batches): weight-only, the Triton kernel of
  :mod:`fastxlstm.ops.triton._quant` dequantizes the weight tile in registers (int8 and fp8);
* CUDA, larger ``M`` (prefill, large batches): fp8 -> W8A8 ``torch._scaled_mm`` with dynamic
  per-token activation scales (e4m3, ``amax / 448`` per row, one Triton launch) and the per-channel
  weight scales (cuBLAS needs N and K multiples of 16; other shapes stay weight-only); int8 -> the
  weight cast to ``x``'s dtype (exact), cuBLAS, the output columns scaled in place;
* CPU: the weight is dequantized to ``x``'s dtype and ``F.linear`` runs (the reference math; weight
  memory is what quantization saves there, not time). torch's int8 weight-only CPU kernel
  (``torch._weight_int8pack_mm``) was 3-4x slower than this on the embedded model (torch 2.13, 2 cores).

FP8 on CUDA needs compute capability >= 8.9 (:func:`check_supported` raises otherwise).
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

SCHEMES = ("int8", "fp8")
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}
#: rows up to which CUDA runs the weight-only Triton kernel per scheme (above: W8A8 for fp8, int8 weights cast
#: to bf16 + cuBLAS); from the H200 sweep of 2026-12-03 (BENCHMARKS.md, Quantization)
WO_MAX_ROWS = {"fp8": 16, "int8": 32}


class QuantWeight(NamedTuple):
    """A per-output-channel quantized ``[N, K]`` weight: ``data`` (int8 / float8_e4m3fn) and ``scale``
    (float32 ``[N, 1]``)."""

    data: Tensor
    scale: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def scheme(self) -> str:
        return scheme_of(self.data.dtype)


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)} (or None)")
    return scheme


def parse_quantization(value: str | None) -> str | None:
    """A quantization argument (``LLM(quantization=)``, ``--quantization``, lm-eval's ``model_args``): one of
    :data:`SCHEMES`, or None for ``None`` / ``""`` / ``"none"`` (the weights as saved)."""
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    return check_scheme(str(value).strip().lower())


def scheme_of(dtype: torch.dtype) -> str:
    for name, dt in STORAGE.items():
        if dt == dtype:
            return name
    raise ValueError(f"{dtype} is not a quantized weight dtype ({', '.join(map(str, STORAGE.values()))})")


def check_supported(scheme: str, device: torch.device | str) -> None:
    """Raise a clear error where ``scheme`` cannot run on ``device``."""
    check_scheme(scheme)
    device = torch.device(device)
    if scheme == "fp8" and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(index)
        if cap < (8, 9):
            raise ValueError(f"quantization='fp8' needs a GPU with FP8 support (compute capability >= 8.9: Ada, "
                             f"Hopper or newer); {torch.cuda.get_device_name(index)} is sm_{cap[0]}{cap[1]}. "
                             "Use quantization='int8'")
    elif device.type not in ("cuda", "cpu", "meta"):
        raise ValueError(f"quantized weights run on CUDA and the CPU, not on {device.type}")


# -------------------------------------------------------------------------- quantize
@torch.no_grad()
def quantize_weight(weight: Tensor, scheme: str) -> QuantWeight:
    """Per-output-channel quantization of ``weight [N, K]`` (see the module docstring)."""
    check_scheme(scheme)
    if weight.ndim != 2:
        raise ValueError(f"quantize_weight takes a [N, K] matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX[scheme], torch.ones_like(amax))
    q = w / scale
    if scheme == "int8":
        data = q.round_().clamp_(-127, 127).to(torch.int8)
    else:
        data = q.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
    return QuantWeight(data, scale)


def dequantize(weight: QuantWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """``data * scale`` computed in float32, rounded to ``dtype``."""
    return (weight.data.float() * weight.scale).to(dtype)


def quantize_rows_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-row (per-token) FP8 quantization of ``x [M, K]``: ``(x_fp8, scale [M, 1] float32)``
    with ``x ~ x_fp8 * scale``, ``scale = max_k |x[m, k]| / 448`` (1 for an all-zero row)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX["fp8"], torch.ones_like(amax))
    return (xf / scale).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def fp8_linear_w8a8(x: Tensor, weight: QuantWeight) -> Tensor:
    """``x [M, K] @ W.T`` with FP8 activations (dynamic per-token scales) and FP8 weights (per-channel
    scales) through ``torch._scaled_mm`` (float32 accumulation); output in ``x``'s dtype."""
    if weight.data.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_linear_w8a8 needs float8_e4m3fn weights, got {weight.data.dtype}")
    xq, sx = _triton_quant().quantize_rows_fp8(x) if x.is_cuda else quantize_rows_fp8(x)
    out_dtype = torch.bfloat16 if x.is_cuda else x.dtype  # cuBLAS' row-wise scaled matmul writes bf16 only
    y = torch._scaled_mm(xq, weight.data.t(), scale_a=sx, scale_b=weight.scale.t(), out_dtype=out_dtype)
    return y.to(x.dtype)


def _triton_quant():
    return importlib.import_module("fastxlstm.ops.triton._quant")


def linear(x: Tensor, weight: Tensor | QuantWeight, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` for a plain or a quantized weight (see the module docstring for which math runs)."""
    if not isinstance(weight, QuantWeight):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features for a weight of shape {(n, k)}")
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    if x.device.type == "cuda":
        fp8 = weight.data.dtype == torch.float8_e4m3fn
        if rows <= WO_MAX_ROWS[weight.scheme] or (fp8 and (n % 16 or k % 16)):
            y = _triton_quant().wo_matmul(x2, weight.data, weight.scale)
        elif fp8:
            y = fp8_linear_w8a8(x2, weight)
        else:  # int8 values are bf16 / fp16 values: cast, multiply, scale the output columns in place
            y = F.linear(x2, weight.data.to(x.dtype)).mul_(weight.scale.view(1, -1))
    else:
        y = F.linear(x2, dequantize(weight, x.dtype))
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], n)
