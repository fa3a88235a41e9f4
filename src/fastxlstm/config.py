"""Model configuration, field-compatible with the HF ``config.json`` of ``NX-AI/xLSTM-7b``.

Field names and defaults follow transformers' ``xLSTMConfig``. Unknown fields found in a
``config.json`` (kernel names, training settings, ...) are kept in ``extra`` and written back
unchanged, so a config round-trips without loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

WeightMode = Literal["single", "fused"]


def round_up(x: float, multiple_of: int) -> int:
    """Round ``x`` up to the next multiple of ``multiple_of``."""
    return int(math.ceil(x / multiple_of) * multiple_of)


@dataclass
class XLSTMConfig:
    """Architecture of an mLSTM-only xLSTM language model (the xLSTM 7B family)."""

    vocab_size: int = 50304
    embedding_dim: int = 4096
    num_blocks: int = 32
    num_heads: int = 8
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: float | None = 15.0
    output_logit_soft_cap: float | None = 30.0
    norm_eps: float = 1e-6
    eps: float = 1e-6
    norm_reduction_force_float32: bool = True
    use_bias: bool = False
    add_out_norm: bool = True
    weight_mode: WeightMode = "single"
    tie_word_embeddings: bool = False
    chunk_size: int = 64
    max_inference_chunksize: int = 16384
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    pad_token_id: int | None = 1
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.weight_mode not in ("single", "fused"):
            raise ValueError(f"weight_mode must be 'single' or 'fused', got {self.weight_mode!r}")
        for name in ("vocab_size", "embedding_dim", "num_blocks", "num_heads", "chunk_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_dim % self.num_heads or self.v_dim % self.num_heads:
            raise ValueError(
                f"qk_dim={self.qk_dim} and v_dim={self.v_dim} must be divisible by num_heads={self.num_heads}"
            )

    # Dimensions. Like the official xlstm code (and transformers' layer), the q/k and v
    # widths are int(embedding_dim * factor), not rounded up: that is what checkpoints hold.
    @property
    def qk_dim(self) -> int:
        return int(self.embedding_dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.embedding_dim * self.v_dim_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.v_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round_up(self.embedding_dim * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)

    @property
    def hidden_size(self) -> int:
        return self.embedding_dim

    @property
    def num_hidden_layers(self) -> int:
        return self.num_blocks

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Parameter count implied by the config (weights, biases and norm scales)."""
        d, nh, b = self.embedding_dim, self.num_heads, int(self.use_bias)
        mlstm = d * (2 * self.qk_dim + 2 * self.v_dim) + b * (2 * self.qk_dim + 2 * self.v_dim)
        mlstm += 2 * (d * nh + nh) + self.v_dim * (1 + b) + self.v_dim * d + b * d
        ffn = 2 * d * self.ffn_dim + self.ffn_dim * d + b * (2 * self.ffn_dim + d)
        norms = 2 * d * (1 + b)
        total = self.num_blocks * (mlstm + ffn + norms) + (d if self.add_out_norm else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        if include_embedding:
            total += self.vocab_size * d
        return total + head

    # Serialisation -------------------------------------------------------------------
    _ALIASES = {"hidden_size": "embedding_dim", "num_hidden_layers": "num_blocks"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XLSTMConfig:
        """Build from a ``config.json`` dict; unknown keys go to ``extra``."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        for alias, name in cls._ALIASES.items():
            if alias in data and data[alias] is not None:
                value = data.pop(alias)
                if data.get(name) is None:
                    data[name] = value
        for key in list(data):
            if key in known:
                kwargs[key] = data.pop(key)
        if isinstance(kwargs.get("eos_token_id"), list):
            data["eos_token_id_list"] = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k.endswith("token_id") or "soft_cap" in k}
        return cls(**kwargs, extra=data)

    def to_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``xLSTMConfig`` and the 7B tools read."""
        out = dict(self.extra)
        out.pop("eos_token_id_list", None)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["hidden_size"] = self.embedding_dim
        out["num_hidden_layers"] = self.num_blocks
        out["model_type"] = "xlstm"
        out.setdefault("architectures", ["xLSTMForCausalLM"])
        # Keys whose values name kernels that only exist in the official package are reset
        # to transformers' native ones so that any transformers install can load the dir.
        out["chunkwise_kernel"] = "chunkwise--native_autograd"
        out["sequence_kernel"] = "native_sequence__native"
        out["step_kernel"] = "native"
        out.setdefault("mode", "inference")
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> XLSTMConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if data.get("model_type", "xlstm") != "xlstm":
            raise ValueError(f"{path}: model_type is {data['model_type']!r}, expected 'xlstm'")
        return cls.from_dict(data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> XLSTMConfig:
        return dataclasses.replace(self, **changes)


# Named presets. Sizes of the small ones follow the paper's scaling ladder (same shape
# family as the 7B: qk 0.5, v 1.0, ffn 2.667, head dim 512 at the 7B).
PRESETS: dict[str, dict[str, Any]] = {
    "xlstm-7b": dict(embedding_dim=4096, num_blocks=32, num_heads=8),
    "xlstm-1.3b": dict(embedding_dim=2048, num_blocks=24, num_heads=4),
    "xlstm-350m": dict(embedding_dim=1024, num_blocks=24, num_heads=4),
    "xlstm-125m": dict(embedding_dim=768, num_blocks=12, num_heads=4),
    "xlstm-tiny": dict(embedding_dim=64, num_blocks=2, num_heads=2, vocab_size=512),
}


def preset(name: str, **overrides: Any) -> XLSTMConfig:
    """Config of a named preset (``xlstm-7b``, ``xlstm-1.3b``, ``xlstm-350m``, ``xlstm-125m``, ``xlstm-tiny``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return XLSTMConfig(**{**PRESETS[name], **overrides})
