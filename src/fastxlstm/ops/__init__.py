"""Public mLSTM op API. Kernels plug in behind ``backend=``.

Shapes: q,k ``[B,NH,S,DQK]``, v ``[B,NH,S,DV]``, i,f ``[B,NH,S]`` (soft-capped gate
preactivations), state ``(C [B,NH,DQK,DV], n [B,NH,DQK], m [B,NH])`` in float32, h
``[B,NH,S,DV]``. For :func:`mlstm_step` the S axis is absent or 1.

Backends: ``"reference"`` (plain PyTorch, any device), ``"triton"`` (CUDA, or the CPU
under ``TRITON_INTERPRET=1``), ``"auto"`` (triton on CUDA tensors, reference otherwise).
"""

from __future__ import annotations

import functools
import importlib
from typing import Literal

import torch
from torch import Tensor

from ..state import State, zero_state
from .reference import (
    mlstm_chunkwise_reference,
    mlstm_commit_reference_,
    mlstm_parallel_reference,
    mlstm_recurrent_reference,
    mlstm_step_reference,
)

Backend = Literal["auto", "reference", "triton"]
BACKENDS = ("auto", "reference", "triton")

__all__ = [
    "State",
    "Backend",
    "mlstm_chunkwise",
    "mlstm_step",
    "mlstm_commit_",
    "mlstm_parallel",
    "mlstm_recurrent",
    "zero_state",
    "triton_available",
    "resolve_backend",
]


@functools.cache
def triton_available() -> bool:
    """True when the Triton backend module imports (triton installed, kernels present)."""
    try:
        importlib.import_module("fastxlstm.ops.triton")
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown mLSTM backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton" and not triton_available():
        from ..extras import install_hint

        raise RuntimeError("backend='triton' requested but the Triton kernels are not available "
                           f"({install_hint('triton')})")
    return backend


def _check(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State | None, seq_axis: bool) -> None:
    nd = 4 if seq_axis else 3
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != nd:
            layout = "[B,NH,S,D]" if seq_axis else "[B,NH,D]"
            raise ValueError(f"{name} must have {nd} dims {layout}, got {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v {tuple(v.shape)} does not match q {tuple(q.shape)} in all but the last dim")
    for name, t in (("i", i), ("f", f)):
        if t.shape != q.shape[:-1]:
            raise ValueError(f"gate {name} must have shape {tuple(q.shape[:-1])}, got {tuple(t.shape)}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise TypeError("q, k, v must be floating point tensors")
    if state is not None:
        b, nh, dqk, dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
        want = ((b, nh, dqk, dv), (b, nh, dqk), (b, nh))
        for name, t, w in zip(("C", "n", "m"), state, want):
            if tuple(t.shape) != w:
                raise ValueError(f"state {name} must have shape {w}, got {tuple(t.shape)}")


def _triton():
    return importlib.import_module("fastxlstm.ops.triton")


def mlstm_chunkwise(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, initial_state: State | None = None,
    chunk_size: int = 64, backend: Backend = "auto", eps: float = 1e-6, final_state: bool = True,
) -> tuple[Tensor, State | None]:
    """mLSTM over a sequence in chunkwise form; returns ``(h, final_state)`` (``final_state=False``: ``(h, None)``,
    and the Triton kernels skip computing it)."""
    _check(q, k, v, i, f, initial_state, seq_axis=True)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if resolve_backend(backend, q.device) == "triton":
        h, state = _triton().mlstm_chunkwise(q, k, v, i, f, initial_state, chunk_size=chunk_size, eps=eps,
                                             final_state=final_state)
    else:
        h, state = mlstm_chunkwise_reference(q, k, v, i, f, initial_state, chunk_size=chunk_size, eps=eps)
    return h, (state if final_state else None)


def mlstm_step(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State | None = None,
    backend: Backend = "auto", eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """One recurrent step; q,k ``[B,NH,DQK]`` (or ``[B,NH,1,DQK]``), i,f ``[B,NH]`` (or ``[B,NH,1]``)."""
    squeeze = q.ndim == 4
    if squeeze:
        if q.shape[2] != 1:
            raise ValueError(f"mlstm_step takes one token, got S={q.shape[2]}")
        q, k, v, i, f = q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0]
    _check(q, k, v, i, f, state, seq_axis=False)
    if resolve_backend(backend, q.device) == "triton":
        h, new_state = _triton().mlstm_step(q, k, v, i, f, state, eps=eps)
    else:
        h, new_state = mlstm_step_reference(q, k, v, i, f, state, eps=eps)
    return (h[:, :, None] if squeeze else h), new_state


def mlstm_commit_(
    state: State, k: Tensor, v: Tensor, i: Tensor, f: Tensor, lengths: Tensor, backend: Backend = "auto",
) -> None:
    """Advance ``state = (C, n, m)`` in place over the first ``lengths[b]`` of the ``T`` tokens of each row,
    from their per-token terms only (k ``[B,NH,T,DQK]``, v ``[B,NH,T,DV]``, i,f ``[B,NH,T]``; no q): the state
    after an accepted speculative prefix, equal to ``lengths[b]`` :func:`mlstm_step` calls. Capturable."""
    if k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3] or i.shape != k.shape[:3] or f.shape != i.shape:
        raise ValueError(f"commit terms must be k [B,NH,T,DQK], v [B,NH,T,DV], i/f [B,NH,T]; got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}, i {tuple(i.shape)}, f {tuple(f.shape)}")
    b, nh, _, dqk = k.shape
    want = ((b, nh, dqk, v.shape[-1]), (b, nh, dqk), (b, nh))
    for name, t, w in zip(("C", "n", "m"), state, want):
        if tuple(t.shape) != w:
            raise ValueError(f"state {name} must have shape {w}, got {tuple(t.shape)}")
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
    if resolve_backend(backend, k.device) == "triton" and hasattr(_triton(), "mlstm_commit_"):
        _triton().mlstm_commit_(state, k, v, i, f, lengths)
        return
    mlstm_commit_reference_(state, k, v, i, f, lengths)


def mlstm_parallel(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, initial_state: State | None = None, eps: float = 1e-6
) -> tuple[Tensor, State]:
    """Quadratic parallel form (reference only; for tests)."""
    _check(q, k, v, i, f, initial_state, seq_axis=True)
    return mlstm_parallel_reference(q, k, v, i, f, initial_state, eps=eps)


def mlstm_recurrent(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, initial_state: State | None = None, eps: float = 1e-6
) -> tuple[Tensor, State]:
    """Step-by-step loop over the sequence (reference only; for tests)."""
    _check(q, k, v, i, f, initial_state, seq_axis=True)
    return mlstm_recurrent_reference(q, k, v, i, f, initial_state, eps=eps)
