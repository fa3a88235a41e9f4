"""The tokens in flight: blocks of tokens sampled on the device (multi-step decode windows, first tokens
from prefill logits) whose values the host has not read yet, kept in launch order so that each sequence's
tokens are read in order; and how many decode steps the next window runs."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..engine.backend import Sampled
from .requests import Choice, GenerationRequest


@dataclass
class Window:
    """A block of tokens sampled on the device whose values are not read yet: a multi-step decode
    window, or (``phase == "prefill"``) the first tokens sampled from prefill logits."""

    active: list[Choice]
    owners: list[GenerationRequest]
    sampled: Sampled  # tokens [n, steps] (+ logprobs): host copies in flight (CUDA) or the tensors
    event: torch.cuda.Event | None  # recorded after the copies (CUDA only)
    phase: str = "decode"

    def read(self) -> tuple[list[list[int]], list[list[float]] | None, tuple[list, list] | None]:
        """Wait for the block and read it: tokens, logprobs and (top ids, top logprobs), row per sequence
        and step (the last two None where nobody asked for them). Raises an asynchronous device error."""
        s = self.sampled
        if self.event is not None:
            self.event.synchronize()
        block = s.tokens.tolist()
        lps = s.logprobs.tolist() if s.logprobs is not None else None
        tops = None
        if s.top_ids is not None and any(c.params.logprobs for c in self.active):
            tops = (s.top_ids.tolist(), s.top_logprobs.tolist())
        return block, lps, tops


class InFlight:
    """The blocks of tokens on their way to the host, in launch order."""

    def __init__(self) -> None:
        self.unread: deque[Window] = deque()

    def __bool__(self) -> bool:
        return bool(self.unread)

    def push(self, active: list[Choice], owners: list[GenerationRequest], sampled: Sampled,
             phase: str = "decode") -> Window:
        """Start copying a block of sampled tokens (and logprobs) to pinned host memory behind the work
        queued so far, without waiting; it joins the blocks to read."""
        event = None
        if sampled.tokens.device.type == "cuda":
            sampled = Sampled(*(None if t is None else t.to("cpu", non_blocking=True)
                                for t in (sampled.tokens, sampled.logprobs, sampled.top_logprobs, sampled.top_ids)))
            event = torch.cuda.Event()
            event.record()
        window = Window(active, owners, sampled, event, phase)
        self.unread.append(window)
        return window

    def pop_before(self, before: Window | None = None) -> Iterator[Window]:
        """Take the blocks launched before ``before`` (all of them: None) off the queue, oldest first."""
        while self.unread and self.unread[0] is not before:
            yield self.unread.popleft()

    def has(self, phase: str) -> bool:
        return any(w.phase == phase for w in self.unread)


def runnable(running: list[GenerationRequest]) -> tuple[list[Choice], list[GenerationRequest]]:
    """The choices of ``running`` a decode window may run, with their requests: not done, and with budget
    left once the tokens not read yet are counted (once every token is read, a choice not done has steps
    left)."""
    active: list[Choice] = []
    owners: list[GenerationRequest] = []
    for req in running:
        for choice in req.choices:
            if not choice.done and choice.steps_left > 0:
                active.append(choice)
                owners.append(req)
    return active, owners


def window_steps(steps_per_read: int, active: list[Choice], owners: list[GenerationRequest],
                 caching: bool) -> int:
    """Decode steps before the next host read: ``steps_per_read``, at most the longest remaining budget (at
    most the shortest for a chat turn whose end state goes to the prefix cache, ``caching``, so a length stop
    leaves a state that matches the tokens). Every request samples on the device, greedy or not, so every
    batch gets windows. Requests arriving meanwhile are admitted after the window (their first token waits
    up to ``k - 1`` steps longer). The budget left counts the tokens of a window still in flight (``fed``:
    inputs handed to the device)."""
    k = steps_per_read
    longest = 0
    for choice, req in zip(active, owners):
        left = choice.steps_left
        longest = max(longest, left)
        if req.cache_generation_end and caching:
            k = min(k, left)
    return max(1, min(k, longest))
