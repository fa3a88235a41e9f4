"""A sequence's saved state: recurrent state, tokens so far and what comes next; safetensors on disk."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..model.hf_layout import save_safetensors
from ..state import State, state_to

FORMAT = "fastxlstm-sequence-state/1"
# dtypes a saved state may hold: C in the engine's state dtype (float32 or bfloat16), n, m, logits float32
_C_DTYPES = (torch.float32, torch.bfloat16)


class StateError(ValueError):
    """A saved sequence state that does not fit the model (names the file or the part)."""


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
            state_to(self.layers, device), list(self.token_ids),
            None if self.logits is None else self.logits.to(device), self.pending_token, self.rng_counter,
        )

    def validate(self, config, vocab_size: int | None = None) -> SequenceState:
        """Check that the state fits a model of ``config`` (an ``XLSTMConfig``): one ``(C, n, m)`` per block
        with the shapes and dtypes above, all finite; token ids (and the pending token) integers in
        ``[0, vocab_size)`` (default ``config.vocab_size``); logits ``[vocab_size]`` float32, not NaN;
        ``rng_counter`` an integer >= 0. Raises :class:`StateError` naming the offending part; returns self."""
        vocab = config.vocab_size if vocab_size is None else vocab_size
        nh, dqk, dv = config.num_heads, config.qk_head_dim, config.v_head_dim
        if not isinstance(self.layers, (list, tuple)) or len(self.layers) != config.num_blocks:
            got = len(self.layers) if isinstance(self.layers, (list, tuple)) else type(self.layers).__name__
            raise StateError(f"the state has {got} layers, the model {config.num_blocks}")
        want = (("C", (1, nh, dqk, dv), _C_DTYPES), ("n", (1, nh, dqk), (torch.float32,)),
                ("m", (1, nh), (torch.float32,)))
        for idx, layer in enumerate(self.layers):
            if not isinstance(layer, (list, tuple)) or len(layer) != 3:
                raise StateError(f"layers.{idx} must be a (C, n, m) triple")
            for t, (name, shape, dtypes) in zip(layer, want):
                where = f"layers.{idx}.{name}"
                if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype not in dtypes:
                    got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                    raise StateError(f"{where} is {got}; the model needs {shape} "
                                     f"{' or '.join(str(d) for d in dtypes)}")
                if not bool(torch.isfinite(t).all()):
                    raise StateError(f"{where} holds NaN or inf")
        ids = self.token_ids + ([] if self.pending_token is None else [self.pending_token])
        bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise StateError(f"token id {bad!r} is not an integer in [0, {vocab})")
        if self.logits is not None:
            if not isinstance(self.logits, Tensor) or tuple(self.logits.shape) != (vocab,) \
                    or self.logits.dtype != torch.float32:
                got = f"{tuple(self.logits.shape)} {self.logits.dtype}" if isinstance(self.logits, Tensor) else "?"
                raise StateError(f"logits are {got}; the model needs ({vocab},) torch.float32")
            if bool(torch.isnan(self.logits).any()):
                raise StateError("logits hold NaN")
        if not isinstance(self.rng_counter, int) or isinstance(self.rng_counter, bool) or self.rng_counter < 0:
            raise StateError(f"rng_counter must be an integer >= 0, got {self.rng_counter!r}")
        return self

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
        save_safetensors(tensors, tmp, metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu", config=None,
             vocab_size: int | None = None) -> SequenceState:
        """Read a state written by :meth:`save`; with ``config``, also :meth:`validate` it (what the engine
        needs before it runs a state from a file). Errors name the file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"state file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise StateError(f"not a fastxlstm sequence state (format {meta.get('format')!r})")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            num_layers = int(meta["num_layers"])
            if not 0 <= num_layers <= len(tensors):
                raise StateError(f"num_layers {num_layers} but {len(tensors)} tensors")
            layers = [(tensors[f"layers.{i}.C"], tensors[f"layers.{i}.n"], tensors[f"layers.{i}.m"])
                      for i in range(num_layers)]
            state = cls(layers, json.loads(meta["token_ids"]), tensors.get("logits"),
                        json.loads(meta["pending_token"]), int(meta["rng_counter"]))
            if not isinstance(state.token_ids, list):
                raise StateError("token_ids is not a list")
            if config is not None:
                state.validate(config, vocab_size)
        except StateError as e:
            raise StateError(f"{path}: {e}") from None
        except KeyError as e:
            raise StateError(f"{path}: missing {e}") from None
        except Exception as e:  # safetensors errors (truncated, bad header), bad JSON or numbers in the metadata
            raise StateError(f"{path} is not a readable sequence state: {type(e).__name__}: {e}") from None
        return state.to(device)
