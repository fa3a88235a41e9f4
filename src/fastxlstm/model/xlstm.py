"""The xLSTM 7B language model: embedding -> post-up-projection blocks -> out norm -> LM head."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import XLSTMConfig
from ..state import ModelState, State
from .ffn import FeedForward
from .hf_layout import save_pretrained
from .mlstm_layer import MLSTMLayer, soft_cap
from .norms import MultiHeadLayerNorm, RMSNorm


class XLSTMBlock(nn.Module):
    """RMSNorm -> mLSTM layer -> residual; RMSNorm -> SwiGLU -> residual."""

    def __init__(self, config: XLSTMConfig):
        super().__init__()
        eps, bias, f32 = config.norm_eps, config.use_bias, config.norm_reduction_force_float32
        self.norm_mlstm = RMSNorm(config.embedding_dim, eps, bias, f32)
        self.mlstm_layer = MLSTMLayer(config)
        self.norm_ffn = RMSNorm(config.embedding_dim, eps, bias, f32)
        self.ffn = FeedForward(config)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        y, state = self.mlstm_layer(self.norm_mlstm(x), state)
        x = x + y
        return x + self.ffn(self.norm_ffn(x)), state


class XLSTMBackbone(nn.Module):
    def __init__(self, config: XLSTMConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.blocks = nn.ModuleList(XLSTMBlock(config) for _ in range(config.num_blocks))
        # The out norm has no bias even with use_bias (as in the released model and transformers).
        self.out_norm = (
            RMSNorm(config.embedding_dim, config.norm_eps, False, config.norm_reduction_force_float32)
            if config.add_out_norm else nn.Identity()
        )


class XLSTMForCausalLM(nn.Module):
    """``forward(input_ids[B,S], state=None) -> (logits[B,S,V] float32, state)``.

    ``state`` is a list with one ``(C, n, m)`` tuple per block (float32). Parameter names
    equal those of the released checkpoint and of transformers' ``xLSTMForCausalLM``.
    """

    def __init__(self, config: XLSTMConfig):
        super().__init__()
        self.config = config
        self.backbone = XLSTMBackbone(config)
        self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype  # the LM head may be quantized

    def set_backend(self, backend: str) -> None:
        """Select the mLSTM op backend (``auto``, ``reference``, ``triton``) for every layer."""
        for block in self.backbone.blocks:
            block.mlstm_layer.backend = backend

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> Path:
        """Write the HF layout: :func:`fastxlstm.model.hf_layout.save_pretrained` (``tokenizer_dir``,
        ``max_shard_bytes``, ``dtype``)."""
        return save_pretrained(self, directory, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # --------------------------------------------------------------------- forward
    def check_input_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor (int64/int32), got {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: at least one token is needed")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.config.vocab_size}")

    def hidden_states(self, input_ids: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """Final normed hidden states ``[B,S,D]`` and the new state."""
        self.check_input_ids(input_ids)
        blocks = self.backbone.blocks
        if state is not None and len(state) != len(blocks):
            raise ValueError(f"state has {len(state)} layers, model has {len(blocks)}")
        x = self.backbone.embeddings(input_ids)
        new_state: ModelState = []
        for idx, block in enumerate(blocks):
            layer_state = state[idx] if state is not None else None
            if self.gradient_checkpointing and self.training:
                x, layer_state = checkpoint(block, x, layer_state, use_reentrant=False)
            else:
                x, layer_state = block(x, layer_state)
            new_state.append(layer_state)
        return self.backbone.out_norm(x), new_state

    def logits(self, hidden: Tensor) -> Tensor:
        return soft_cap(self.lm_head(hidden.to(self.dtype)).float(), self.config.output_logit_soft_cap)

    def forward(
        self, input_ids: Tensor, state: ModelState | None = None, *, last_logits_only: bool = False
    ) -> tuple[Tensor, ModelState]:
        hidden, new_state = self.hidden_states(input_ids, state)
        if last_logits_only:
            hidden = hidden[:, -1:]
        return self.logits(hidden), new_state

    def loss(self, input_ids: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
        """Mean next-token cross-entropy; ``labels`` are already shifted (same shape as input_ids)."""
        logits, _ = self(input_ids)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index)

    # ------------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialisation of the paper / official code: small init for embeddings and
        projections, Wang init for the two output projections, zero gate weights, input
        gate bias -10 and forget gate bias linspace(3, 6) over heads."""
        cfg = self.config
        d, nl, nh = cfg.embedding_dim, cfg.num_blocks, cfg.num_heads
        small = math.sqrt(2 / (5 * d))

        def normal_(t: Tensor, std: float) -> None:
            t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float32, device="cpu").to(t) * std)

        normal_(self.backbone.embeddings.weight, small)
        if not cfg.tie_word_embeddings:
            normal_(self.lm_head.weight, small)
        f_bias = torch.linspace(3.0, 6.0, nh)
        for block in self.backbone.blocks:
            layer, ffn = block.mlstm_layer, block.ffn
            for mod in block.modules():
                if isinstance(mod, nn.Linear):
                    normal_(mod.weight, small)
                    if mod.bias is not None:
                        mod.bias.zero_()
            normal_(ffn.proj_down.weight, 2 / nl / math.sqrt(ffn.ffn_dim))
            normal_(layer.out_proj.weight, 2 / nl / math.sqrt(d))
            if layer.fused:
                layer.ifgate_preact.weight.zero_()
                layer.ifgate_preact.bias[:nh] = -10.0
                layer.ifgate_preact.bias[nh:] = f_bias.to(layer.ifgate_preact.bias)
            else:
                layer.igate_preact.weight.zero_()
                layer.fgate_preact.weight.zero_()
                layer.igate_preact.bias.fill_(-10.0)
                layer.fgate_preact.bias.copy_(f_bias.to(layer.fgate_preact.bias))
        for mod in self.modules():
            if isinstance(mod, (RMSNorm, MultiHeadLayerNorm)):
                mod.reset_parameters()


def build_model(
    config: XLSTMConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> XLSTMForCausalLM:
    """A freshly initialised model (paper initialisation) on ``device`` in ``dtype``."""
    with torch.device("meta"):
        model = XLSTMForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    model.init_weights(torch.Generator().manual_seed(seed))
    return model
