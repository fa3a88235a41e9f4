"""What a request is to the scheduler, and what it hands back: a :class:`GenerationRequest` (a prompt and its
``n`` choices), the events that reach the request's asyncio queue, and the exceptions :meth:`Scheduler.submit`
raises."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..engine.backend import PromptScores
from ..sampling import SamplingParams
from ..state import ModelState


# ------------------------------------------------------------------------------------------------ events
@dataclass
class PrefillDone:
    cached_tokens: int


@dataclass
class PromptLogprobs:
    """The prompt's scores (``prompt_logprobs``): :class:`~fastxlstm.engine.backend.PromptScores` of positions
    0 .. len(prompt) - 2 (position ``t`` scores prompt token ``t + 1``)."""

    scores: PromptScores


@dataclass
class TokenEvent:
    choice: int
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    choice: int
    reason: str  # "stop" | "length" | "abort"


@dataclass
class ErrorEvent:
    status: int
    message: str
    code: str | None = None


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Choice:
    index: int
    params: SamplingParams  # the request's, with this choice's seed (the engine samples with them)
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # generated tokens already folded into the slot state
    done: bool = False
    cancelled: bool = False
    matcher: Any = None  # the choice's grammar position (structured output; .grammar.Matcher)

    @property
    def steps_left(self) -> int:
        """Decode steps this choice may still launch: each step feeds one generated token, and the last of
        its ``max_new_tokens`` is never fed, so ``max_new_tokens - 1`` less those already fed."""
        return self.params.max_new_tokens - self.fed - 1




_ids = itertools.count()


class GenerationRequest:
    """One prompt with ``n`` choices, as handed to the scheduler. ``prompt_logprobs``: score the prompt on the
    device as it is prefilled (that many alternatives per position; the prefix cache is not used);
    ``grammar``: a compiled grammar every choice samples under (structured output, :mod:`.grammar`)."""

    def __init__(self, prompt: list[int], params: SamplingParams, n: int = 1, cache_points: tuple[int, ...] = (),
                 cache_generation_end: bool = False, timeout: float | None = None,
                 prompt_logprobs: int | None = None, grammar: Any = None):
        if not prompt:
            raise ValueError("empty prompt")
        self.id = next(_ids)
        self.prompt = list(prompt)
        self.params = params
        self.n = n
        self.cache_points = tuple(sorted(set(p for p in cache_points if 0 < p < len(prompt))))
        self.cache_generation_end = cache_generation_end and n == 1
        self.prompt_logprobs, self.grammar = prompt_logprobs, grammar
        self.scores: PromptScores | None = None  # scheduler-private: the prompt's scores so far
        self.arrival = time.monotonic()
        self.deadline = self.arrival + timeout if timeout else None
        self.queue: asyncio.Queue | None = None  # receives (request, [events]) tuples
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cancelled = False
        # set by a scheduler in another process (SchedulerProxy): cancel() goes there instead
        self.on_cancel: Callable[[int | None], None] | None = None
        # scheduler-private
        self.choices: list[Choice] = []
        self.pos = 0
        self.state: ModelState | None = None
        self.logits: Tensor | None = None
        self.cached_tokens = 0
        self.first_token_time: float | None = None
        self.last_delivery = 0.0  # when the scheduler last handed this request's events over

    def cancel(self, choice: int | None = None) -> None:
        """Stop generating (all choices, or one); the scheduler frees the slots on its next iteration."""
        if self.on_cancel is not None:
            self.on_cancel(choice)
            return
        if choice is None:
            self.cancelled = True
        elif self.choices and 0 <= choice < len(self.choices):
            self.choices[choice].cancelled = True
        else:
            self.cancelled = True

    @property
    def finished(self) -> bool:
        return bool(self.choices) and all(c.done for c in self.choices)



def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters choice ``index`` of a request samples with: the request's, the seed ``seed + index``
    (a fresh random seed per choice when the request has none), so choices differ and each reproduces."""
    seed = secrets.randbits(63) if params.seed is None else (params.seed + index) % (1 << 64)
    return dataclasses.replace(params, seed=seed)
