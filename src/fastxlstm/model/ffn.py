"""Gated SwiGLU feed-forward network of the post-up-projection block."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import XLSTMConfig


class FeedForward(nn.Module):
    """``down(silu(gate(x)) * up(x))``; ``fused`` mode keeps gate|up in one matrix."""

    def __init__(self, config: XLSTMConfig):
        super().__init__()
        d, h, bias = config.embedding_dim, config.ffn_dim, config.use_bias
        self.fused = config.weight_mode == "fused"
        self.ffn_dim = h
        if self.fused:
            self.proj_up_gate_z = nn.Linear(d, 2 * h, bias=bias)
        else:
            self.proj_up_gate = nn.Linear(d, h, bias=bias)
            self.proj_up = nn.Linear(d, h, bias=bias)
        self.proj_down = nn.Linear(h, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.proj_up_gate_z(x).split(self.ffn_dim, dim=-1)
        else:
            gate, up = self.proj_up_gate(x), self.proj_up(x)
        return self.proj_down(F.silu(gate) * up)
