"""Normalisation layers of the xLSTM 7B: RMSNorm and the per-head LayerNorm."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _ScaledNorm(nn.Module):
    """What both norms share: ``eps``, ``force_float32`` (normalise in float32), a scale per feature (``weight``,
    1 at init) and an optional bias (0 at init), applied by :meth:`_affine` after the normalisation."""

    def __init__(self, size: int, eps: float, use_bias: bool, force_float32: bool):
        super().__init__()
        self.eps = eps
        self.force_float32 = force_float32
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if use_bias else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Scale 1, bias 0."""
        self.weight.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()

    def _affine(self, y: Tensor) -> Tensor:
        y = y * self.weight
        return y + self.bias if self.bias is not None else y


class RMSNorm(_ScaledNorm):
    """RMSNorm with the reduction in float32 (as the released model computes it)."""

    def __init__(self, dim: int, eps: float = 1e-6, use_bias: bool = False, force_float32: bool = True):
        super().__init__(dim, eps, use_bias, force_float32)

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        xf = x.float() if self.force_float32 else x
        return self._affine((xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(in_dtype))


class MultiHeadLayerNorm(_ScaledNorm):
    """LayerNorm over each head's features (no centring across heads), one scale per feature."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, use_bias: bool = False,
                 force_float32: bool = True):
        super().__init__(num_heads * head_dim, eps, use_bias, force_float32)
        self.num_heads, self.head_dim = num_heads, head_dim

    def forward(self, h: Tensor) -> Tensor:
        """h ``[B,S,NH,DH]`` -> ``[B,S,NH*DH]``."""
        in_dtype = h.dtype
        hf = h.float() if self.force_float32 else h
        centred = hf - hf.mean(dim=-1, keepdim=True)
        y = centred * torch.rsqrt(hf.var(dim=-1, keepdim=True, unbiased=False) + self.eps)
        return self._affine(y.to(in_dtype).flatten(-2))
