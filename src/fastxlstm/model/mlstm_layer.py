"""The mLSTM layer: projections, soft-capped gates, the mLSTM cell, per-head norm, output gate."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import XLSTMConfig
from ..ops import mlstm_chunkwise, mlstm_step
from ..state import State
from .norms import MultiHeadLayerNorm


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(x / cap)``; identity when ``cap`` is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


class MLSTMLayer(nn.Module):
    """mLSTM layer of the xLSTM 7B block; ``fused`` mode keeps q|k|v|o and i|f in one matrix each."""

    def __init__(self, config: XLSTMConfig):
        super().__init__()
        self.config = config
        d, bias, nh = config.embedding_dim, config.use_bias, config.num_heads
        self.num_heads, self.qk_dim, self.v_dim = nh, config.qk_dim, config.v_dim
        self.fused = config.weight_mode == "fused"
        if self.fused:
            self.qkv_opreact = nn.Linear(d, 2 * self.qk_dim + 2 * self.v_dim, bias=bias)
            self.ifgate_preact = nn.Linear(d, 2 * nh, bias=True)
        else:
            self.q = nn.Linear(d, self.qk_dim, bias=bias)
            self.k = nn.Linear(d, self.qk_dim, bias=bias)
            self.v = nn.Linear(d, self.v_dim, bias=bias)
            self.ogate_preact = nn.Linear(d, self.v_dim, bias=bias)
            self.igate_preact = nn.Linear(d, nh, bias=True)
            self.fgate_preact = nn.Linear(d, nh, bias=True)
        self.multihead_norm = MultiHeadLayerNorm(
            nh, self.v_dim // nh, eps=config.norm_eps, use_bias=bias,
            force_float32=config.norm_reduction_force_float32,
        )
        self.out_proj = nn.Linear(self.v_dim, d, bias=bias)
        self.backend = "auto"

    def projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q, k, v, o preactivations ``[B,S,*]`` and soft-capped float32 gates i, f ``[B,S,NH]``."""
        cap = self.config.gate_soft_cap
        if self.fused:
            q, k, v, o = self.qkv_opreact(x).split([self.qk_dim, self.qk_dim, self.v_dim, self.v_dim], dim=-1)
            i, f = soft_cap(self.ifgate_preact(x).float(), cap).split(self.num_heads, dim=-1)
        else:
            q, k, v, o = self.q(x), self.k(x), self.v(x), self.ogate_preact(x)
            i = soft_cap(self.igate_preact(x).float(), cap)
            f = soft_cap(self.fgate_preact(x).float(), cap)
        return q, k, v, o, i, f

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        bsz, seq, _ = x.shape
        nh = self.num_heads
        q, k, v, o, i, f = self.projections(x)
        q = q.view(bsz, seq, nh, -1).transpose(1, 2)
        k = k.view(bsz, seq, nh, -1).transpose(1, 2)
        v = v.view(bsz, seq, nh, -1).transpose(1, 2)
        i, f = i.transpose(1, 2), f.transpose(1, 2)
        if seq == 1 and not torch.is_grad_enabled():
            h, state = mlstm_step(q, k, v, i, f, state, backend=self.backend, eps=self.config.eps)
        else:
            h, state = mlstm_chunkwise(
                q, k, v, i, f, state, chunk_size=self.config.chunk_size, backend=self.backend,
                eps=self.config.eps,
            )
        h = self.multihead_norm(h.transpose(1, 2))
        return self.out_proj(torch.sigmoid(o) * h), state
