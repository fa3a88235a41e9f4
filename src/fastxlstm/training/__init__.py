"""Training: token shards, a deterministic window loader, the FSDP2 trainer, the Llama baseline, export."""

from .config import TrainConfig
from .data import TokenShards, prepare
from .llama import LlamaConfig, LlamaForCausalLM, build_llama
from .loader import WindowSampler, eval_batches
from .optim import build_optimizer, lr_at, param_groups

__all__ = [
    "TrainConfig", "TokenShards", "prepare", "LlamaConfig", "LlamaForCausalLM", "build_llama",
    "WindowSampler", "eval_batches", "build_optimizer", "lr_at", "param_groups",
]
