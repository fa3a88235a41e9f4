"""The recurrent state: one type for the ops, the model, the engine, the prefix cache and saved sequences.

An mLSTM block's state is :data:`State`, the tuple ``(C [B,NH,DQK,DV], n [B,NH,DQK], m [B,NH])``
(float32; the engine may keep ``C`` of its slots in a narrower dtype). The model's state is
:data:`ModelState`, one :data:`State` per block. Row ``j`` of every tensor is sequence ``j`` of the
batch. Unlike a transformer's KV cache the state has a fixed size, whatever the sequence length.

This module depends on torch only, so that every layer (``ops`` included) can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

State = tuple[Tensor, Tensor, Tensor]
ModelState = list[State]


class StateDims(Protocol):
    """What :func:`zero_model_state` reads of a model config (:class:`~fastxlstm.config.XLSTMConfig` has it)."""

    num_blocks: int
    num_heads: int
    qk_head_dim: int
    v_head_dim: int


def zero_state(batch: int, num_heads: int, dqk: int, dv: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> State:
    """One block's all-zero state (what ``initial_state=None`` means to the ops)."""
    return (
        torch.zeros(batch, num_heads, dqk, dv, device=device, dtype=dtype),
        torch.zeros(batch, num_heads, dqk, device=device, dtype=dtype),
        torch.zeros(batch, num_heads, device=device, dtype=dtype),
    )


def zero_model_state(config: StateDims, batch: int, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> ModelState:
    """The all-zero state of every block of a model of ``config``, ``batch`` rows."""
    return [zero_state(batch, config.num_heads, config.qk_head_dim, config.v_head_dim, device, dtype)
            for _ in range(config.num_blocks)]


def state_tensors(state: Sequence[State]) -> list[Tensor]:
    """The tensors of a model state, block after block (``C, n, m, C, n, m, ...``)."""
    return [t for layer in state for t in layer]


def state_nbytes(state: Sequence[State]) -> int:
    """Bytes the tensors of ``state`` hold."""
    if isinstance(state, PackedState):
        return state.flat.numel() * state.flat.element_size()
    return sum(t.numel() * t.element_size() for t in state_tensors(state))


def clone_state(state: Sequence[State], packed: bool = False) -> ModelState:
    """A private copy (no tensor shared with ``state``). ``packed``: the copies are views of one fresh buffer
    per (device, dtype), filled by one multi-tensor copy (a few kernels instead of one per tensor: what the
    prefix cache's inserts and hits use); not for states written to a file (safetensors refuses views of
    one buffer)."""
    if isinstance(state, PackedState):
        return state.clone() if packed else [tuple(t.clone() for t in layer) for layer in state]
    if not packed:
        return [tuple(t.clone() for t in layer) for layer in state]
    flat = state_tensors(state)
    copies: list[Tensor | None] = [None] * len(flat)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(flat):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for (device, dtype), idx in groups.items():
        sizes = [flat[i].numel() for i in idx]
        buf = torch.empty(sum(sizes), device=device, dtype=dtype)
        views = [v.view(flat[i].shape) for v, i in zip(buf.split(sizes), idx)]
        torch._foreach_copy_(views, [flat[i] for i in idx])
        for v, i in zip(views, idx):
            copies[i] = v
    it = iter(copies)
    return [tuple(next(it) for _ in layer) for layer in state]


def state_to(state: Sequence[State], device: torch.device | str) -> ModelState:
    """``state`` on ``device`` (tensors already there are not copied)."""
    return [tuple(t.to(device) for t in layer) for layer in state]


def split_state(state: Sequence[State], n: int, copy: bool = True) -> list[ModelState]:
    """Rows of a batched state as ``n`` batch-1 states: copies (so no row keeps the batch alive), or
    with ``copy=False`` views (no device work; whoever keeps one for long copies it). A
    :class:`PackedState` splits into :class:`PackedState` rows (one op each)."""
    if isinstance(state, PackedState):
        return [state.row(j) if not copy else state.row(j).clone() for j in range(n)]
    if not copy:
        return [[tuple(t[j:j + 1] for t in layer) for layer in state] for j in range(n)]
    return [[tuple(t[j:j + 1].clone() for t in layer) for layer in state] for j in range(n)]


def stack_states(states: Sequence[Sequence[State] | None], device: torch.device | str) -> ModelState | None:
    """One batched state from batch-1 states (None if they are all None); mixing is an error."""
    if all(s is None for s in states):
        return None
    if any(s is None for s in states):
        raise ValueError("cannot batch prompts with and without a start state")
    first = states[0]
    if isinstance(first, PackedState) and all(isinstance(s, PackedState) and s.layout.shapes == first.layout.shapes
                                              and s.flat.shape[1] == first.flat.shape[1] for s in states):
        return PackedState(torch.cat([s.flat.to(device) for s in states]), first.layout)  # type: ignore[union-attr]
    return [tuple(torch.cat([s[i][k].to(device) for s in states]) for k in range(len(states[0][i])))
            for i in range(len(states[0]))]


class FlatState:
    """Per-block ``(C, n, m)`` views of one float32 buffer ``[B, numel]``: a whole sequence's state
    in one row, so that a batch of states is copied or cloned with one kernel."""

    def __init__(self, batch: int, num_blocks: int, nh: int, dqk: int, dv: int, device: torch.device):
        self.shapes = ((nh, dqk, dv), (nh, dqk), (nh,))
        self.sizes = [nh * dqk * dv, nh * dqk, nh]
        self.num_blocks = num_blocks
        self.buffer = torch.zeros(batch, num_blocks * sum(self.sizes), device=device)

    def views(self, flat: Tensor) -> ModelState:
        """The per-block states of the rows of ``flat`` (``[b, numel]``, this layout)."""
        b = flat.shape[0]
        out, off = [], 0
        for _ in range(self.num_blocks):
            layer = []
            for size, shape in zip(self.sizes, self.shapes):
                layer.append(flat[:, off:off + size].view(b, *shape))
                off += size
            out.append(tuple(layer))
        return out

    def packed(self, flat: Tensor) -> PackedState:
        """The rows of ``flat`` (``[b, numel]``, this layout) as a :class:`PackedState` (no device work)."""
        return PackedState(flat, self)

    @property
    def tensor_sizes(self) -> list[int]:
        """The numel of every tensor of one row, block after block (``C, n, m, C, n, m, ...``)."""
        return self.sizes * self.num_blocks


class PackedState(Sequence):
    """A model state held as the rows of one float32 buffer ``flat [b, numel]`` in the layout of a
    :class:`FlatState` (``layout``): what a prefill graph returns. It reads as a :data:`ModelState` (one
    ``(C, n, m)`` per block, views of ``flat`` made on first use), and whoever knows the layout copies,
    clones or stores it with one op on ``flat`` instead of one per tensor (the prefix cache, the engine's
    slot loads). Immutable: ``flat`` is all there is, the views are made once."""

    __slots__ = ("flat", "layout", "_views")

    def __init__(self, flat: Tensor, layout: FlatState):
        if flat.ndim != 2 or flat.shape[1] != layout.buffer.shape[1] or flat.dtype != torch.float32:
            raise ValueError(f"a packed state is float32 [b, {layout.buffer.shape[1]}], got {flat.dtype} "
                             f"{tuple(flat.shape)}")
        self.flat, self.layout = flat, layout
        self._views: ModelState | None = None

    def views(self) -> ModelState:
        """The per-block ``(C, n, m)`` views of :attr:`flat` (made once)."""
        if self._views is None:
            self._views = self.layout.views(self.flat)
        return self._views

    def __len__(self) -> int:
        return self.layout.num_blocks

    def __getitem__(self, i):
        return self.views()[i]

    def __iter__(self):
        return iter(self.views())

    @property
    def batch(self) -> int:
        return self.flat.shape[0]

    def row(self, j: int) -> PackedState:
        """Row ``j`` (a view: batch 1)."""
        return PackedState(self.flat[j:j + 1], self.layout)

    def clone(self) -> PackedState:
        """A private copy (one op)."""
        return PackedState(self.flat.clone(), self.layout)

    def fits(self, shapes: tuple, num_blocks: int, device: torch.device) -> bool:
        """Whether this is batch-1 state of ``num_blocks`` blocks of tensors ``shapes`` (``(C, n, m)``'s, no
        batch dim) on ``device``."""
        return (self.flat.shape[0] == 1 and self.layout.num_blocks == num_blocks
                and tuple(self.layout.shapes) == tuple(shapes) and self.flat.device == device)


__all__ = ["State", "ModelState", "StateDims", "zero_state", "zero_model_state", "state_tensors", "state_nbytes",
           "clone_state", "state_to", "split_state", "stack_states", "FlatState",
           "PackedState"]
