"""Normalisation layers of the xLSTM 7B: RMSNorm and the per-head LayerNorm."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm with the reduction in float32 (as the released model computes it)."""

    def __init__(self, dim: int, eps: float = 1e-6, use_bias: bool = False, force_float32: bool = True):
        super().__init__()
        self.eps = eps
        self.force_float32 = force_float32
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if use_bias else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Scale 1, bias 0."""
        self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        xf = x.float() if self.force_float32 else x
        y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(in_dtype) * self.weight
        return y + self.bias if self.bias is not None else y


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm over each head's features (no centring across heads), one scale per feature."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, use_bias: bool = False,
                 force_float32: bool = True):
        super().__init__()
        self.num_heads, self.head_dim, self.eps = num_heads, head_dim, eps
        self.force_float32 = force_float32
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads * head_dim)) if use_bias else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Scale 1, bias 0."""
        self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, h: Tensor) -> Tensor:
        """h ``[B,S,NH,DH]`` -> ``[B,S,NH*DH]``."""
        in_dtype = h.dtype
        hf = h.float() if self.force_float32 else h
        centred = hf - hf.mean(dim=-1, keepdim=True)
        y = centred * torch.rsqrt(hf.var(dim=-1, keepdim=True, unbiased=False) + self.eps)
        y = y.to(in_dtype).flatten(-2) * self.weight
        return y + self.bias if self.bias is not None else y
