"""Model FLOPs per trained token (forward + backward = 3 x forward) and peak rates for MFU."""

from __future__ import annotations

import torch
from torch import nn

from ..config import XLSTMConfig
from .llama import LlamaConfig

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' datasheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matrix products: every Linear weight (embeddings excluded)."""
    seen, n = set(), 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            n += mod.weight.numel()
    return n


def xlstm_flops_per_token(cfg: XLSTMConfig, n_matmul: int) -> float:
    """6 N for the projections plus the chunkwise mLSTM cell per head: forward 2c(dqk+dv) for the
    intra-chunk products and 4 dqk dv for reading and updating the chunk state."""
    c, dqk, dv = cfg.chunk_size, cfg.qk_head_dim, cfg.v_head_dim
    cell = cfg.num_blocks * cfg.num_heads * (2 * c * (dqk + dv) + 4 * dqk * dv)
    return 6.0 * n_matmul + 3.0 * cell


def llama_flops_per_token(cfg: LlamaConfig, n_matmul: int, seq_len: int) -> float:
    """6 N plus causal attention (QK^T and AV over on average seq_len/2 keys): 6 L S d."""
    return 6.0 * n_matmul + 6.0 * cfg.num_layers * seq_len * cfg.dim


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    cfg = model.config
    n = matmul_params(model)
    if isinstance(cfg, XLSTMConfig):
        return xlstm_flops_per_token(cfg, n)
    if isinstance(cfg, LlamaConfig):
        return llama_flops_per_token(cfg, n, seq_len)
    return 6.0 * n


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device (None on CPU or an unknown GPU unless overridden)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None
