"""Generation v0: prefill once, then one recurrent step per token (readable reference loop)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..model import XLSTMForCausalLM
from .sampling import sample


def as_batch(input_ids: Tensor | Sequence[int] | Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """Token ids as a ``[B,S]`` int64 tensor on ``device`` (a flat list is one sequence)."""
    if not isinstance(input_ids, Tensor):
        if len(input_ids) == 0:
            raise ValueError("empty prompt: at least one token id is needed")
        input_ids = torch.tensor(input_ids if isinstance(input_ids[0], Sequence) else [input_ids])
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    return input_ids.to(device=device, dtype=torch.long)


@torch.inference_mode()
def generate_stream(
    model: XLSTMForCausalLM, input_ids: Tensor | Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int = 32,
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
    eos_token_id: int | None = None,
) -> Iterator[Tensor]:
    """Yield the next token ids ``[B]`` one step at a time (stops early once every row hit EOS)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = as_batch(input_ids, model.device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    if max_new_tokens == 0:
        return
    logits, state = model(ids, last_logits_only=True)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        token = sample(logits[:, -1], temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        yield token
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            return
        logits, state = model(token[:, None], state)


def generate(
    model: XLSTMForCausalLM, input_ids: Tensor | Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int = 32,
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
    eos_token_id: int | None = None,
) -> Tensor:
    """Generated ids ``[B, n]`` (prompt excluded). Greedy when ``temperature == 0``."""
    steps = list(generate_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id))
    if not steps:
        return torch.zeros(as_batch(input_ids, model.device).shape[0], 0, dtype=torch.long, device=model.device)
    return torch.stack(steps, dim=1)
