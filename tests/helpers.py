"""Test helpers: small random models and their transformers twins."""

from __future__ import annotations

import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.model import XLSTMForCausalLM, build_model


def perturbed_model(config: XLSTMConfig, seed: int = 0, scale: float = 0.05) -> XLSTMForCausalLM:
    """Paper init plus noise on every parameter, and gate biases spread over a wide range
    (input gates about N(-1, 1.5), forget gates N(3, 1.5)), so that gates, norms,
    biases and the stabiliser all matter."""
    model = build_model(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
            if name.endswith(("igate_preact.bias", "fgate_preact.bias", "ifgate_preact.bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 + (3.0 if "fgate" in name else -1.0))
    return model.eval()


def hf_config(config: XLSTMConfig):
    from transformers import xLSTMConfig

    data = config.to_dict()
    for key in ("architectures", "model_type", "transformers_version"):
        data.pop(key, None)
    data["weight_mode"] = "single"  # transformers' fused init is broken; weights are loaded split
    return xLSTMConfig(**data)


def hf_twin(model: XLSTMForCausalLM):
    """transformers' xLSTMForCausalLM holding the same weights (single layout)."""
    from transformers import xLSTMForCausalLM

    from fastxlstm.checkpoint import _single_mode_state

    hf = xLSTMForCausalLM(hf_config(model.config)).eval()
    hf.load_state_dict(_single_mode_state(model), strict=True)
    return hf
