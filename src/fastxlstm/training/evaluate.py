"""Held-out perplexity of a model on raw text, with the trainer's protocol: each document is
encoded whole and followed by the end-of-sequence token, the documents are concatenated, and
the loss is the mean next-token cross-entropy over non-overlapping windows of ``seq_len``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """``tokenizer`` is a ``fastxlstm.tokenizer.Tokenizer``."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_bos=False))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def perplexity(model: nn.Module, ids: list[int], seq_len: int = 512, max_tokens: int | None = None,
               batch_size: int = 4) -> dict[str, float]:
    """Mean loss and perplexity over ``len(ids) // seq_len`` windows (at most ``max_tokens`` tokens)."""
    n_windows = (len(ids) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    if n_windows < 1:
        raise ValueError(f"need more than {seq_len} tokens, got {len(ids)}")
    data = torch.tensor(ids[: n_windows * seq_len + 1], dtype=torch.long)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        x = torch.stack([data[r * seq_len : (r + 1) * seq_len] for r in rows]).to(device)
        y = torch.stack([data[r * seq_len + 1 : (r + 1) * seq_len + 1] for r in rows]).to(device)
        logits, _ = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "seq_len": seq_len}
