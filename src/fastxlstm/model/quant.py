"""Quantized models: :class:`QuantLinear` modules in place of the blocks' ``nn.Linear`` projections.

:func:`quantize_model` replaces every projection of every block (the mLSTM layer's q/k/v/o and gate
projections, fused or single, its out-projection, the FFN's gate/up and down projections) and, when
asked, the LM head, with per-output-channel int8 / FP8 weights (:mod:`fastxlstm.ops.quant`). The
embedding, the norms, the gate biases and the recurrent state stay as they are.

A quantized model records its scheme in ``config.extra["quantization_config"]`` (the HF convention:
a ``quantization_config`` object in ``config.json`` with a ``quant_method``), which
:func:`fastxlstm.save_pretrained` writes and :func:`fastxlstm.load` reads. Tensors per quantized
module: ``<module>.weight`` (int8 / float8_e4m3fn ``[out, in]``) and ``<module>.weight_scale``
(float32 ``[out, 1]``) -- the layout of transformers' ``fbgemm_fp8`` and compressed-tensors' channel
schemes; transformers itself does not load these directories (unknown ``quant_method``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..ops.quant import STORAGE, QuantWeight, check_scheme, check_supported, linear, quantize_weight
from .hf_layout import keeps_dtype
from .xlstm import XLSTMForCausalLM

QUANT_METHOD = "fastxlstm"
CONFIG_KEY = "quantization_config"
#: the projections quantized in every block (names as in the checkpoint, fused and single layouts)
BLOCK_LINEARS = ("mlstm_layer.qkv_opreact", "mlstm_layer.ifgate_preact", "mlstm_layer.q", "mlstm_layer.k",
                 "mlstm_layer.v", "mlstm_layer.ogate_preact", "mlstm_layer.igate_preact", "mlstm_layer.fgate_preact",
                 "mlstm_layer.out_proj", "ffn.proj_up_gate_z", "ffn.proj_up_gate", "ffn.proj_up", "ffn.proj_down")


class QuantLinear(nn.Module):
    """``nn.Linear`` with a quantized weight: ``weight`` (int8 / float8_e4m3fn ``[out, in]``, no grad) and
    ``weight_scale`` (float32 ``[out, 1]``); the bias, if any, stays in the model's dtype.

    Moving the module (``.to(device)``, ``.cuda()``) moves these tensors; dtype conversions
    (``.to(torch.bfloat16)``, ``.half()``) leave the weight and its scales as they are."""

    def __init__(self, in_features: int, out_features: int, scheme: str, bias: Tensor | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, check_scheme(scheme)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=STORAGE[scheme], device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, module: nn.Linear, scheme: str) -> QuantLinear:
        """Quantize ``module``'s weight (on the meta device: an empty module of the right shapes)."""
        w = module.weight
        out = cls(w.shape[1], w.shape[0], scheme, module.bias, device=w.device)
        if w.device.type != "meta":
            q = quantize_weight(w, scheme)
            out.weight.data, out.weight_scale = q.data, q.scale
        return out

    def quant_weight(self) -> QuantWeight:
        return QuantWeight(self.weight, self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.quant_weight(), self.bias)

    def _apply(self, fn, recurse=True):
        device = fn(torch.empty(0, dtype=torch.int32, device=self.weight.device)).device
        self.weight.data = self.weight.data.to(device)
        self.weight_scale = self.weight_scale.to(device)
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


# ----------------------------------------------------------------------------- config
def quant_config(scheme: str, lm_head: bool) -> dict[str, Any]:
    """The ``quantization_config`` written into ``config.json``."""
    check_scheme(scheme)
    return {"quant_method": QUANT_METHOD, "scheme": scheme, "weight_dtype": str(STORAGE[scheme]).split(".")[-1],
            "granularity": "per_channel", "scale_name": "weight_scale", "quantize_lm_head": bool(lm_head),
            "modules_to_not_convert": ["backbone.embeddings"] + ([] if lm_head else ["lm_head"])}


def parse_quant_config(data: Any, where: str = "config.json") -> tuple[str, bool]:
    """``(scheme, lm_head)`` of a ``quantization_config`` (clear errors for ones we cannot run)."""
    if not isinstance(data, dict) or data.get("quant_method") != QUANT_METHOD:
        method = data.get("quant_method") if isinstance(data, dict) else data
        raise ValueError(f"{where}: quantization_config with quant_method {method!r} is not supported "
                         f"(fastxlstm reads quant_method {QUANT_METHOD!r}, written by fastxlstm.save_pretrained)")
    scheme = data.get("scheme")
    try:
        check_scheme(scheme)
    except ValueError as e:
        raise ValueError(f"{where}: quantization_config: {e}") from None
    if data.get("granularity", "per_channel") != "per_channel":
        raise ValueError(f"{where}: quantization_config granularity {data.get('granularity')!r} is not supported "
                         "(per_channel only)")
    return scheme, bool(data.get("quantize_lm_head", False))


def saved_quantization(config, quantization: str | None, device, where: str) -> tuple[str, bool] | None:
    """``(scheme, lm_head)`` of a config saved quantized (None: unquantized), checking that ``quantization``
    does not ask for another scheme and that the scheme runs on ``device``."""
    data = config.extra.get(CONFIG_KEY)
    if data is None:
        return None
    scheme, lm_head = parse_quant_config(data, where)
    if quantization not in (None, scheme):
        raise ValueError(f"{where}: the directory holds {scheme}-quantized weights; it cannot be loaded as "
                         f"{quantization!r} (pass quantization=None or {scheme!r}, or quantize the unquantized "
                         "checkpoint)")
    check_supported(scheme, device)
    return scheme, lm_head


def quantizing_transform(model: nn.Module, scheme: str):
    """For load-time quantization into ``model`` (quantized on the meta device): ``transform(name, tensor)``
    mapping a checkpoint tensor to the state-dict entries it becomes (a quantized weight and its scale)."""
    targets = {k for k, v in model.state_dict().items() if k.endswith(".weight") and keeps_dtype(k, v)}

    def transform(name: str, t: Tensor) -> dict[str, Tensor]:
        if name not in targets:
            return {name: t}
        q = quantize_weight(t, scheme)
        return {name: q.data, f"{name}_scale": q.scale}

    return transform


def model_quantization(model: nn.Module) -> tuple[str, bool] | None:
    """``(scheme, lm_head)`` of a quantized model, None for an unquantized one."""
    data = getattr(model, "config", None) and model.config.extra.get(CONFIG_KEY)
    return parse_quant_config(data, "model config") if data else None


# --------------------------------------------------------------------------- quantize
def _targets(model: XLSTMForCausalLM, lm_head: bool) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for block in model.backbone.blocks:
        for path in BLOCK_LINEARS:
            owner_name, _, attr = path.rpartition(".")
            owner = block.get_submodule(owner_name)
            mod = getattr(owner, attr, None)
            if isinstance(mod, nn.Linear):
                found.append((owner, attr, mod))
    if lm_head:
        if model.config.tie_word_embeddings:
            raise ValueError("the LM head is tied to the embedding (tie_word_embeddings): it cannot be quantized "
                             "on its own; quantize the blocks only (lm_head=False)")
        found.append((model, "lm_head", model.lm_head))
    return found


@torch.no_grad()
def quantize_model(model: XLSTMForCausalLM, scheme: str, lm_head: bool = False) -> XLSTMForCausalLM:
    """Replace the projections (and the LM head with ``lm_head``) by :class:`QuantLinear` modules, in
    place, one matrix at a time (the unquantized weight of a module is freed once it is replaced).
    A model on the meta device gets empty modules of the right shapes (for loading)."""
    check_supported(scheme, model.device)
    done = model_quantization(model)
    if done is not None:
        raise ValueError(f"the model is already quantized ({done[0]}); load the unquantized weights to "
                         f"quantize to {scheme}")
    for owner, attr, mod in _targets(model, lm_head):
        setattr(owner, attr, QuantLinear.from_linear(mod, scheme))
    model.config = model.config.replace(extra={**model.config.extra, CONFIG_KEY: quant_config(scheme, lm_head)})
    return model
