"""LoRA adapters on the projections of the mLSTM layer and the FFN, in the PEFT format.

``apply_lora`` turns the targeted ``nn.Linear`` modules into :class:`LoRALinear` in place: the
module keeps its frozen ``weight`` (so base parameter names are unchanged) and gains
``lora_A`` (``[r, in]``) and ``lora_B`` (``[out, r]``), trained in float32, with
``y = x W^T + b + scaling * B(A(dropout(x)))``, ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``), as PEFT's ``LoraLayer`` computes it.

Module names are those of transformers' ``xLSTMForCausalLM`` (ours equal them), so an adapter
directory is PEFT's: ``adapter_config.json`` plus ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``. ``peft.PeftModel.from_pretrained``
reads what :func:`save_adapter` writes, and :func:`read_adapter` reads what PEFT writes (plain LoRA:
no DoRA, no per-layer rank or alpha patterns, no bias training, no extra saved modules).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hf_layout import copy_tokenizer_files, save_safetensors, staged_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Projections LoRA can target (last component of the module name), and the default selection.
TARGETS = ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact", "out_proj", "proj_up_gate", "proj_up",
           "proj_down")
DEFAULT_TARGETS = ("q", "k", "v", "ogate_preact", "out_proj", "proj_up_gate", "proj_up", "proj_down")


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"lora r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if (not isinstance(self.target_modules, (list, tuple)) or not self.target_modules
                or any(t not in TARGETS for t in self.target_modules)):
            raise ValueError(f"lora target_modules must be a non-empty list of {', '.join(TARGETS)}; "
                             f"got {self.target_modules!r}")
        self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft(self, base_model: str | None = None) -> dict:
        """``adapter_config.json`` as PEFT writes it for a plain LoRA (PEFT fills in the rest)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": sorted(self.target_modules), "bias": "none", "fan_in_fan_out": False,
                "use_rslora": self.use_rslora, "use_dora": False, "modules_to_save": None,
                "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "init_lora_weights": True,
                "inference_mode": True}

    @classmethod
    def from_peft(cls, data: dict, where: str) -> LoRAConfig:
        if data.get("peft_type") != "LORA":
            raise ValueError(f"{where}: peft_type {data.get('peft_type')!r} is not LORA")
        unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
                       "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}
        for key, ok in unsupported.items():
            value = data.get(key, ok)
            if value != ok and not (ok in ({}, None) and not value):
                raise ValueError(f"{where}: {key}={value!r} is not supported (plain LoRA only)")
        targets = data.get("target_modules")
        if isinstance(targets, str):
            raise ValueError(f"{where}: target_modules given as a regex ({targets!r}) is not supported; list the "
                             f"projections ({', '.join(TARGETS)})")
        return cls(r=int(data["r"]), alpha=float(data.get("lora_alpha", 8)), dropout=float(data.get("lora_dropout", 0)),
                   target_modules=list(targets or []), use_rslora=bool(data.get("use_rslora", False)))


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update; the base weight and bias keep their names."""

    lora_config: LoRAConfig

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        a = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        return out + (self.lora_B(a) * self.scaling).to(out.dtype)

    def delta_weight(self) -> Tensor:
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)


def lora_delta(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``scaling * B @ A`` in float32: what merging adds to the base weight."""
    return (b.float() @ a.float()) * scaling


def _targets(model: nn.Module, cfg: LoRAConfig) -> list[tuple[str, nn.Linear]]:
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and name.rpartition(".")[2] in cfg.target_modules]
    if not found:
        raise ValueError(f"no module of the model matches lora target_modules {cfg.target_modules} (LoRA needs the "
                         "'single' weight layout)")
    return found


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze every parameter of ``model`` and add float32 LoRA weights to the target projections
    (PEFT's initialisation: A Kaiming-uniform, B zero, so the model is unchanged at first). Returns
    the adapted module names."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, mod in _targets(model, cfg):
        mod.__class__ = LoRALinear  # same module object: the base parameters keep identity and name
        mod.lora_A = nn.Linear(mod.in_features, cfg.r, bias=False, device=mod.weight.device, dtype=torch.float32)
        mod.lora_B = nn.Linear(cfg.r, mod.out_features, bias=False, device=mod.weight.device, dtype=torch.float32)
        bound = 1 / math.sqrt(mod.in_features)  # kaiming_uniform_(a=sqrt(5)), nn.Linear's and PEFT's default
        with torch.no_grad():
            mod.lora_A.weight.copy_(torch.rand(mod.lora_A.weight.shape, generator=gen) * 2 * bound - bound)
            mod.lora_B.weight.zero_()
        mod.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        mod.scaling = cfg.scaling
        names.append(name)
    model.lora_config = cfg  # type: ignore[assignment]
    return names


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merge_lora_state(state: dict[str, Tensor], cfg: LoRAConfig) -> dict[str, Tensor]:
    """A model state dict with LoRA weights -> the plain state dict with ``W + scaling * B @ A``."""
    out = {k: v for k, v in state.items() if not is_lora_key(k)}
    for key in state:
        if key.endswith(".lora_A.weight"):
            mod = key[: -len(".lora_A.weight")]
            w = out[f"{mod}.weight"]
            out[f"{mod}.weight"] = (w.float() + lora_delta(state[key], state[f"{mod}.lora_B.weight"],
                                                           cfg.scaling)).to(w.dtype)
    return out


# ---------------------------------------------------------------------------------------- files
def save_adapter(state: dict[str, Tensor], cfg: LoRAConfig, directory: str | os.PathLike,
                 base_model: str | None = None, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write the PEFT adapter directory from a model state dict (its LoRA entries), atomically."""
    directory = Path(directory)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in state.items() if is_lora_key(k)}
    if not tensors:
        raise ValueError("the state dict holds no LoRA weights")
    with staged_dir(directory) as tmp:
        save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg.to_peft(base_model), indent=2) + "\n")
        copy_tokenizer_files(tokenizer_dir, tmp)
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[LoRAConfig, dict[str, tuple[Tensor, Tensor]]]:
    """The config and ``{module name: (A, B)}`` of a PEFT LoRA directory; errors name the file and key."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: not a PEFT adapter directory")
    try:
        cfg = LoRAConfig.from_peft(json.loads(cfg_path.read_text()), str(cfg_path))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path}: not a valid LoRA adapter config ({type(e).__name__}: {e})") from e
    tensors = load_file(str(w_path))
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):
                if name is not None and name.endswith(suffix):
                    pairs.setdefault(name[: -len(suffix)], {})[part] = t
                    break
            else:
                continue
            break
        else:
            raise ValueError(f"{w_path}: unexpected tensor {key!r} (expected {PEFT_PREFIX}<module>.lora_A/B.weight)")
    out = {}
    for mod, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{w_path}: {mod} has {'/'.join(ab)} only")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != cfg.r or b.shape[1] != cfg.r:
            raise ValueError(f"{w_path}: {mod} has lora_A {list(a.shape)}, lora_B {list(b.shape)}; r={cfg.r}")
        if mod.rpartition(".")[2] not in cfg.target_modules:
            raise ValueError(f"{w_path}: {mod} is not among target_modules {cfg.target_modules}")
        out[mod] = (a, b)
    if not out:
        raise ValueError(f"{w_path} holds no LoRA weights")
    return cfg, out


def adapter_deltas(directory: str | os.PathLike) -> dict[str, Tensor]:
    """``{"<module>.weight": scaling * B @ A}`` (float32) of an adapter directory: what merging adds."""
    cfg, pairs = read_adapter(directory)
    return {f"{mod}.weight": lora_delta(a, b, cfg.scaling) for mod, (a, b) in pairs.items()}
