"""Model configuration, field-compatible with the HF ``config.json`` of ``NX-AI/xLSTM-7b``.

Field names and defaults follow transformers' ``xLSTMConfig``. Unknown fields found in a
``config.json`` (kernel names, training settings, ...) are kept in ``extra`` and written back
unchanged, so a config round-trips without loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

WeightMode = Literal["single", "fused"]


def round_up(x: float, multiple_of: int) -> int:
    """``int(((x + multiple_of - 1) // multiple_of) * multiple_of)``: the FFN-width rule of the official
    xlstm code and of transformers (on the float product). It rounds ``int(x)`` up, so a product just
    above a multiple stays there: 768 * 2.667 = 2048.26 gives 2048 (``ceil`` would give 2112)."""
    return int(((x + multiple_of - 1) // multiple_of) * multiple_of)


_INT_FIELDS = ("vocab_size", "embedding_dim", "num_blocks", "num_heads", "ffn_round_up_to_multiple_of", "chunk_size",
               "max_inference_chunksize")
_FACTOR_FIELDS = ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor")
_BOOL_FIELDS = ("norm_reduction_force_float32", "use_bias", "add_out_norm", "tie_word_embeddings")
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


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
        """Types and ranges of every field, so that a bad ``config.json`` fails here with the field's name
        (not later inside the model). Limits: integer sizes > 0; factors finite and > 0; ``eps`` and
        ``norm_eps`` in (0, 1); soft caps null or finite and > 0; token ids null or integers >= 0."""
        if self.weight_mode not in ("single", "fused"):
            raise ValueError(f"weight_mode must be 'single' or 'fused', got {self.weight_mode!r}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in _FACTOR_FIELDS:
            value = getattr(self, name)
            if not _is_real(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("eps", "norm_eps"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 < value < 1:
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or value <= 0):
                raise ValueError(f"{name} must be null or a finite number > 0, got {value!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in _TOKEN_FIELDS:
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be null or an integer >= 0, got {value!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        for name, width in (("qk_dim", self.qk_dim), ("v_dim", self.v_dim), ("ffn_dim", self.ffn_dim)):
            if width <= 0:
                factor = {"qk_dim": "qk_dim_factor", "v_dim": "v_dim_factor"}.get(name, "ffn_proj_factor")
                raise ValueError(f"{name} = {width}: {factor}={getattr(self, factor)} is too small for "
                                 f"embedding_dim={self.embedding_dim}")
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
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
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
        if isinstance(kwargs.get("eos_token_id"), list) and kwargs["eos_token_id"]:
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
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config must be a JSON object, got {type(data).__name__}")
        if data.get("model_type", "xlstm") != "xlstm":
            raise ValueError(f"{path}: model_type is {data['model_type']!r}, expected 'xlstm'")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

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
