"""Export trained weights: xLSTM models as HF-format directories (``fastxlstm.load`` and transformers
read them), the Llama baseline as safetensors plus a small ``config.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..config import XLSTMConfig
from ..devices import DTYPE_CHOICES, parse_dtype
from .distributed import DistEnv, barrier


def export_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The ``torch.dtype`` the export writes, from a name :func:`fastxlstm.devices.parse_dtype` reads (``float32``,
    ``bfloat16``, ``bf16``, ``half``, ...); ValueError naming the choices for anything else, ``auto`` included
    (an export has no device whose default it could take)."""
    choices = ", ".join(c for c in DTYPE_CHOICES if c != "auto")
    try:
        parsed = parse_dtype(dtype)
    except ValueError:
        parsed = None
    if parsed is None:
        raise ValueError(f"export dtype must be one of {choices}, got {dtype!r}")
    return parsed


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict on rank 0 (empty on other ranks of a sharded model). Collective."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=opts)


def export(model: nn.Module, env: DistEnv, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None,
           dtype: str = "float32", merged_dir: str | os.PathLike | None = None, base_model: str | None = None) -> Path:
    """Collective: every rank calls it, rank 0 writes ``out_dir``. A LoRA model writes its adapter
    (PEFT format, float32) there and, with ``merged_dir``, base + adapter as an HF directory."""
    torch_dtype = export_dtype(dtype)
    lora = getattr(model, "lora_config", None)
    state = full_state_dict(model, trainable_only=lora is not None and merged_dir is None)
    out = Path(out_dir)
    if env.is_main:
        cfg = model.config
        if lora is not None:
            from ..model.lora import merge_lora_state, save_adapter

            save_adapter(state, lora, out, base_model, tokenizer_dir)
            if merged_dir is not None:
                save_xlstm(cfg, merge_lora_state(state, lora), Path(merged_dir), tokenizer_dir, torch_dtype)
        elif isinstance(cfg, XLSTMConfig):
            save_xlstm(cfg, state, out, tokenizer_dir, torch_dtype)
        else:
            save_plain(cfg, state, out, torch_dtype)
    barrier()
    return out


def save_xlstm(cfg: XLSTMConfig, state: dict[str, torch.Tensor], out: Path,
               tokenizer_dir: str | os.PathLike | None, dtype: torch.dtype) -> Path:
    from ..model import XLSTMForCausalLM
    from ..model.hf_layout import save_pretrained

    with torch.device("meta"):
        cpu_model = XLSTMForCausalLM(cfg)
    cpu_model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        cpu_model.lm_head.weight = cpu_model.backbone.embeddings.weight
    return save_pretrained(cpu_model, out, tokenizer_dir=tokenizer_dir, dtype=dtype)


def save_plain(cfg, state: dict[str, torch.Tensor], out: Path, dtype: torch.dtype) -> Path:
    from ..model.hf_layout import save_safetensors

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in state.items() if not k.endswith("lm_head.weight")
               or not getattr(cfg, "tie_word_embeddings", False)}
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out
