"""The engine's weights: each block's projections fused by rows into the matrices the runner multiplies
(q | k | v | o | i | f, gate | up), as views of the model's own parameters where they already lie back to back,
plain or per-channel quantized (:mod:`fastxlstm.ops.quant`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..model import XLSTMForCausalLM
from ..model.quant import QuantLinear
from ..ops.quant import QuantWeight

Weight = Tensor | QuantWeight  # a plain or a per-channel quantized matrix (fastxlstm.ops.quant)


@dataclass
class LayerWeights:
    norm_mlstm: Tensor
    w_in: Weight          # [2*qk + 2*v + 2*NH, D]: q | k | v | o | i | f (no bias: see gate_bias)
    gate_bias: Tensor     # float32 [2*NH]: i | f gate biases, added in the gate kernel
    mh_norm: Tensor
    w_out: Weight
    b_out: Tensor | None
    norm_ffn: Tensor
    w_up: Weight          # [2*H, D]: gate | up
    b_up: Tensor | None
    w_down: Weight
    b_down: Tensor | None


def _cat_rows(parts: list[Tensor]) -> Tensor:
    """``torch.cat(parts)``, or a view when the parts already lie back to back in one storage
    (a model fused before: no copy)."""
    first = parts[0]
    offset = first.storage_offset()
    same = all(p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() and p.is_contiguous()
               for p in parts)
    if same:
        for p in parts:
            if p.storage_offset() != offset:
                same = False
                break
            offset += p.numel()
    if same:
        rows = sum(p.shape[0] for p in parts)
        return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
    return torch.cat(parts, dim=0)


def _param_view(module: nn.Module, name: str, tensor: Tensor) -> None:
    setattr(module, name, nn.Parameter(tensor, requires_grad=False))


def weight_of(module: nn.Module) -> Weight:
    """A projection's matrix: the tensor of an ``nn.Linear``, the quantized weight of a ``QuantLinear``."""
    if isinstance(module, QuantLinear):
        return module.quant_weight()
    return module.weight.detach()


def _fuse_rows(modules: list[nn.Module]) -> tuple[Weight, list[Weight]]:
    """The modules' matrices stacked by rows (:func:`_cat_rows`; data and scales alike for quantized
    ones) and the per-module row blocks of the result; every module is re-pointed to its block."""
    mats = [weight_of(mod) for mod in modules]
    kinds = {type(w) for w in mats}
    if len(kinds) != 1:
        raise ValueError("the projections of a block are partly quantized: quantize all or none of them")
    sizes = [w.shape[0] for w in mats]
    if isinstance(mats[0], QuantWeight):
        fused = QuantWeight(_cat_rows([w.data for w in mats]), _cat_rows([w.scale for w in mats]))
        parts = [QuantWeight(d, s) for d, s in zip(fused.data.split(sizes), fused.scale.split(sizes))]
        for mod, part in zip(modules, parts):
            _param_view(mod, "weight", part.data)
            mod.weight_scale = part.scale
    else:
        fused = _cat_rows(mats)
        parts = list(fused.split(sizes, dim=0))
        for mod, part in zip(modules, parts):
            _param_view(mod, "weight", part)
    return fused, parts


@torch.no_grad()
def fuse_weights(model: XLSTMForCausalLM) -> list[LayerWeights]:
    """Per-block fused matrices. The model's own parameters are re-pointed to views of them
    (no second copy of the weights; the model's forward keeps working)."""
    cfg = model.config
    if cfg.use_bias:
        raise NotImplementedError("the engine supports use_bias=False models (as the xLSTM 7B family)")
    out = []
    for block in model.backbone.blocks:
        layer, ffn = block.mlstm_layer, block.ffn
        if layer.fused:
            w_in, _ = _fuse_rows([layer.qkv_opreact, layer.ifgate_preact])
        else:
            w_in, _ = _fuse_rows([layer.q, layer.k, layer.v, layer.ogate_preact, layer.igate_preact,
                                  layer.fgate_preact])
        nh = cfg.num_heads
        gate_bias = (torch.cat([layer.igate_preact.bias, layer.fgate_preact.bias]) if not layer.fused
                     else layer.ifgate_preact.bias).detach().float()
        assert gate_bias.numel() == 2 * nh
        w_up = weight_of(ffn.proj_up_gate_z) if ffn.fused else _fuse_rows([ffn.proj_up_gate, ffn.proj_up])[0]
        out.append(LayerWeights(
            norm_mlstm=block.norm_mlstm.weight.detach(), w_in=w_in, gate_bias=gate_bias,
            mh_norm=layer.multihead_norm.weight.detach(), w_out=weight_of(layer.out_proj), b_out=None,
            norm_ffn=block.norm_ffn.weight.detach(), w_up=w_up, b_up=None,
            w_down=weight_of(ffn.proj_down), b_down=None,
        ))
    return out
