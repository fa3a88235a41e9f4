"""A sequence's saved state: recurrent state, tokens so far and what comes next; safetensors on disk."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..ops import State

FORMAT = "fastxlstm-sequence-state/1"


@dataclass
class SequenceState:
    """Everything needed to continue a sequence exactly.

    ``layers``: per block ``(C [1,NH,DQK,DV], n [1,NH,DQK], m [1,NH])`` float32, the state
    after every token of ``token_ids`` except ``pending_token``. Exactly one of ``logits``
    (float32 ``[V]``: the next-token logits, after a prefill) and ``pending_token`` (the last
    generated token, not yet run through the model) is set. ``rng_counter`` is the number of
    tokens sampled so far, so a seeded continuation draws the same random stream as an
    uninterrupted run."""

    layers: list[State]
    token_ids: list[int] = field(default_factory=list)
    logits: Tensor | None = None
    pending_token: int | None = None
    rng_counter: int = 0

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.pending_token is None):
            raise ValueError("a SequenceState holds exactly one of logits and pending_token")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def to(self, device: torch.device | str) -> SequenceState:
        return SequenceState(
            [tuple(t.to(device) for t in layer) for layer in self.layers], list(self.token_ids),
            None if self.logits is None else self.logits.to(device), self.pending_token, self.rng_counter,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (tensors plus JSON metadata); no pickle."""
        path = Path(path)
        tensors = {}
        for idx, (c, n, m) in enumerate(self.layers):
            tensors[f"layers.{idx}.C"] = c.detach().contiguous().cpu()
            tensors[f"layers.{idx}.n"] = n.detach().contiguous().cpu()
            tensors[f"layers.{idx}.m"] = m.detach().contiguous().cpu()
        if self.logits is not None:
            tensors["logits"] = self.logits.detach().float().contiguous().cpu()
        meta = {"format": FORMAT, "num_layers": str(len(self.layers)), "token_ids": json.dumps(self.token_ids),
                "pending_token": json.dumps(self.pending_token), "rng_counter": str(self.rng_counter)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> SequenceState:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"state file {path} does not exist")
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a fastxlstm sequence state (format {meta.get('format')!r})")
        tensors = load_file(str(path), device=str(device))
        layers = [(tensors[f"layers.{i}.C"], tensors[f"layers.{i}.n"], tensors[f"layers.{i}.m"])
                  for i in range(int(meta["num_layers"]))]
        return cls(layers, json.loads(meta["token_ids"]), tensors.get("logits"),
                   json.loads(meta["pending_token"]), int(meta["rng_counter"]))
