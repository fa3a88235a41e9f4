"""Llama-style transformer baseline for the ablation: RMSNorm, RoPE, causal SDPA attention, SwiGLU.

Same interface as ``XLSTMForCausalLM`` where the trainer needs it: ``forward(ids) -> (logits, None)``,
``loss``, ``gradient_checkpointing``, ``set_backend`` (no-op), ``blocks`` for FSDP wrapping.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import XLSTMConfig


@dataclass
class LlamaConfig:
    vocab_size: int = 50304
    dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError("head dim must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def num_parameters(self) -> int:
        d = self.dim
        block = 4 * d * d + 3 * d * self.ffn_dim + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_layers * block + d + self.vocab_size * d + head

    def to_dict(self) -> dict:
        return {"model_type": "llama-baseline", **asdict(self)}

    @classmethod
    def matching(cls, xcfg: XLSTMConfig, head_dim: int = 64, multiple_of: int = 64) -> LlamaConfig:
        """A Llama config with the xLSTM config's width, depth and vocabulary, and the SwiGLU width
        chosen so that the parameter counts match (to within ``multiple_of`` rows per block)."""
        d = xcfg.embedding_dim
        per_block_x = (xcfg.num_parameters() - xcfg.vocab_size * d * (1 if xcfg.tie_word_embeddings else 2)
                       - (d if xcfg.add_out_norm else 0)) / xcfg.num_blocks
        ffn = (per_block_x - 4 * d * d - 2 * d) / (3 * d)
        ffn = max(multiple_of, int(round(ffn / multiple_of)) * multiple_of)
        return cls(vocab_size=xcfg.vocab_size, dim=d, num_layers=xcfg.num_blocks, num_heads=max(1, d // head_dim),
                   ffn_dim=ffn, norm_eps=xcfg.norm_eps, tie_word_embeddings=xcfg.tie_word_embeddings)


def _rope_cache(seq: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def _up(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of ``x [B,NH,S,DH]`` (the Llama/NeoX half layout)."""
    x1, x2 = _up(x).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = _up(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.nh, self.hd = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.nh, self.hd).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = False

    def set_backend(self, backend: str) -> None:  # interface parity with XLSTMForCausalLM
        del backend

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def forward(self, input_ids: Tensor, state: None = None) -> tuple[Tensor, None]:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        cos, sin = _rope_cache(input_ids.shape[1], self.config.head_dim, self.config.rope_theta, x.device)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        return (logits if logits.dtype == torch.float64 else logits.float()), None

    def loss(self, input_ids: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
        logits, _ = self(input_ids)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """GPT-2/Llama init: N(0, 0.02), output projections scaled by 1/sqrt(2 * layers)."""
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                s = out_std if name.endswith(("attn.out.weight", "ffn.down.weight")) else std
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) * s)
            else:
                p.fill_(1.0)


def build_llama(config: LlamaConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.init_weights(torch.Generator().manual_seed(seed))
    return model

