"""The scheduler's view of the engine: sequence slots, each holding one sequence's recurrent state.

The scheduler talks to this narrow interface only (``prefill``, ``load``, ``read``, ``first_tokens``,
``decode_window``). A prefill runs with one prompt (or several: right-padded to the longest, with neutral
gates on the pads that leave each row's state as its last real token left it) and never touches a slot
until ``load`` writes its final state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from ..state import ModelState


class SlotBackend(Protocol):
    """What the scheduler needs from an engine (:class:`fastxlstm.engine.EngineSlotBackend` is the one
    implementation; tests and benchmarks may stand in for it). Sampling happens on the device: the
    scheduler hands each slot its :class:`~fastxlstm.sampling.SamplingParams` at :meth:`load` and reads
    back sampled tokens (``Sampled``: tokens ``[n, steps]`` and, where asked for, logprobs)."""

    max_slots: int
    vocab_size: int
    device: torch.device

    def prefill(self, tokens: Sequence[int], state: ModelState | None) -> tuple[Tensor, ModelState]:
        """Run ``tokens`` (batch 1) from ``state`` (None: the zero state); return last logits ``[V]`` and state."""

    def prefill_batch(self, tokens: Sequence[Sequence[int]], states: Sequence[ModelState | None]
                      ) -> tuple[Tensor, list[ModelState]]:
        """Prefill several prompts in one forward (states all None or all given); logits ``[n, V]``, states."""

    def load(self, slot: int, state: ModelState, params=None, history: Sequence[int] = ()) -> None:
        """Make ``state`` the state of ``slot``; sample it with ``params`` (``history``: the prompt)."""

    def read(self, slot: int) -> ModelState:
        """A copy of the state of ``slot`` (batch 1)."""

    def prefill_scored(self, tokens: Sequence[int], state: ModelState | None, next_token: int | None,
                       top_k: int = 0):
        """:meth:`prefill` that also scores the prompt tokens (``prompt_logprobs``): ``(last logits or None,
        state, PromptScores)``; ``next_token``: the next piece's first token (None: the prompt ends here)."""

    def set_masks(self, slots: Sequence[int], words: Tensor) -> None:
        """Grammar bitmasks (int32 ``[len(slots), ceil(V/32)]``) for the slots' next sampled tokens."""

    def release(self, slot: int) -> None:
        """``slot`` no longer holds a sequence."""

    def first_tokens(self, slots: Sequence[int], logits: Tensor, logprobs: bool = False):
        """Sample each slot's first token from ``logits [n, V]``; a ``Sampled`` of device tensors."""

    def decode_window(self, slots: Sequence[int], steps: int, logprobs: bool = False):
        """``steps`` decode steps, each slot fed its last sampled token on the device; ``Sampled``."""



def warm_prefill(backend: SlotBackend, max_len: int, force: bool = False, budget: int | None = None) -> int:
    """Before the first request: capture the backend's prefill CUDA graphs for every bucket a scheduler
    with a prefill budget of ``budget`` (default ``max_len``) tokens can use (``capture_prefill_graphs``,
    where the backend has it), then run the prefill once per shape class the server meets that no graph
    holds (lengths around 16..2048, with and without a start state, one and two prompts), so that neither
    a graph capture nor a Triton compile (seconds each) stalls a request. GPU backends only unless
    ``force``. Returns the graphs captured plus the prefills run."""
    if not force and getattr(backend, "device", torch.device("cpu")).type != "cuda":
        return 0
    runs, graphed = 0, 0
    capture = getattr(backend, "capture_prefill_graphs", None)
    if capture is not None:
        keys = capture(budget or max_len)
        runs += len(keys)
        graphed = max((n for b, n in keys if b == 1), default=0)  # these lengths replay graphs: nothing to compile
    lengths = sorted({n for b in (16, 64, 256, 1024, 2048, 4096) for n in (b - 1, b) if graphed < n <= max_len}
                     | ({1, 2} if not graphed else set()))
    for n in lengths:
        ids = [(7 * t + 3) % backend.vocab_size for t in range(n)]
        _, state = backend.prefill(ids, None)
        backend.prefill(ids[: max(1, n // 2)], state)  # continuing a state (prefix-cache hits, split prompts)
        runs += 2
        if hasattr(backend, "prefill_batch") and n <= 256:
            backend.prefill_batch([ids, ids], [None, None])
            runs += 1
        if getattr(backend, "prefill_padded", False) and n > 1:  # different lengths: the padding-mask variants
            backend.prefill_batch([ids, ids[: max(1, n * 4 // 5)]], [None, None])
            runs += 1
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
    return runs
