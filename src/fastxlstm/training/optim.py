"""AdamW with weight decay on matrices only, and the learning-rate schedules of the paper's recipe."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Schedule = Literal["cosine", "wsd", "constant", "linear"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (ndim >= 2: projections, embedding, head) decay; vectors
    (biases, norm scales, gate biases) do not. Tied parameters are listed once."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, fused: bool | None = None) -> torch.optim.AdamW:
    kwargs = {}
    if fused is not None:
        kwargs["fused"] = fused
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **kwargs)


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int, schedule: Schedule = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps``, then ``cosine`` decay to ``min_lr_ratio * lr`` at
    ``total_steps``, ``linear`` decay, ``constant``, or ``wsd`` (warm-up, stable, then a linear
    cool-down over the last ``decay_fraction`` of the steps).
    """
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    min_lr = lr * min_lr_ratio
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "wsd":
        decay_steps = max(1, int(round(total_steps * decay_fraction)))
        start = total_steps - decay_steps
        if step < start:
            return lr
        frac = min(1.0, (step - start + 1) / decay_steps)
        return lr + (min_lr - lr) * frac
    span = max(1, total_steps - warmup_steps)
    frac = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        return lr + (min_lr - lr) * frac
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine, wsd, linear or constant")
