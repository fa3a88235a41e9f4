"""Log-probabilities of chosen tokens, as the scheduler, the slot backends and the engine's backend report them."""

from __future__ import annotations

import torch
from torch import Tensor


def chosen_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of ``tokens [n]`` under ``logits [n, V]`` (float32 softmax over the whole vocabulary)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]
