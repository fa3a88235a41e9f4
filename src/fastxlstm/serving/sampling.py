"""Per-sequence sampling state: penalties, logit bias, min-p, seeded generator, logprobs.

The request parameters are the engine's :class:`fastxlstm.generation.sampling.SamplingParams` (one set of
fields and checks for ``LLM.generate`` and the server) plus the OpenAI-only knobs the host applies. With only
temperature/top-k/top-p set, a sequence samples exactly like :func:`fastxlstm.generation.sample` with a
generator seeded the same way, so a seeded request reproduces :func:`fastxlstm.generation.generate` token for
token.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..engine.transfer import to_device
from ..generation import sampling as gen


@dataclass
class SamplingParams(gen.SamplingParams):
    """:class:`fastxlstm.generation.sampling.SamplingParams` (``max_new_tokens``, temperature, top-k/p, min-p,
    repetition penalty, seed, stop ids, ``ignore_eos``; its checks) plus the server's host-side extras:
    OpenAI presence/frequency penalties, ``logit_bias`` and ``logprobs`` (top alternatives to report; None:
    no logprobs). Stop strings are the HTTP layer's (``stop`` stays empty here)."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def greedy_plain(self) -> bool:
        """Argmax of the raw logits (batched fast path)."""
        return self.temperature == 0 and not self.needs_processing

    @property
    def needs_processing(self) -> bool:
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias)


class SequenceSampler:
    """Sampling for one sequence (one choice of a request)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device,
                 choice_index: int = 0):
        self.params = params
        self.device = device
        seed = params.seed
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            seed = (secrets.randbits(63) if seed is None else seed + choice_index) % (2**64)
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.counts: Tensor | None = None
        self.seen: Tensor | None = None
        self.bias: Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, device=device, dtype=torch.float32)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, device=device, dtype=torch.bool)
            if prompt_ids:
                ids = to_device(prompt_ids, device)  # (a blocking copy waits for the device)
                self.seen.index_fill_(0, ids.clamp_(0, vocab_size - 1), True)
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size, device=device, dtype=torch.float32)
            values = to_device(list(params.logit_bias.values()), device, torch.float32)
            self.bias.index_copy_(0, to_device(list(params.logit_bias), device), values)

    def process(self, logits: Tensor) -> Tensor:
        """Penalties and bias applied to a ``[V]`` float32 row."""
        p = self.params
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        if self.bias is not None:
            logits = logits + self.bias
        return logits

    def sample(self, logits: Tensor) -> Tensor:
        """Next token (a 0-d device tensor) from a ``[V]`` logits row."""
        p = self.params
        logits = self.process(logits)
        if p.temperature == 0:
            return logits.argmax()
        if p.min_p > 0:
            cutoff = logits.max() + p.temperature * math.log(p.min_p)
            logits = logits.masked_fill(logits < cutoff, float("-inf"))
        return gen.sample(logits[None], p.temperature, p.top_k, p.top_p, self.generator)[0]

    def observe(self, token: int) -> None:
        """Record a generated token for the penalties."""
        # one-element updates: ``t[token] = x`` writes a CPU scalar into a 0-dim view, which waits for the device
        one = slice(int(token), int(token) + 1)
        if self.counts is not None:
            self.counts[one] += 1
        if self.seen is not None:
            self.seen[one] = True
