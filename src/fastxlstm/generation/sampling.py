"""Next-token selection from logits: greedy, temperature, top-k, top-p (v0 ``sample``), and the
engine's batched sampler with per-row parameters, min-p, repetition penalty and per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) sets to -inf. ``logits`` is ``[B,V]``."""
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ``ValueError`` for a temperature, top-k or top-p out of range."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(
    logits: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of ``logits [B,V]``; greedy (argmax) when ``temperature == 0``."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------
# Batched GPU sampling with per-row parameters (the engine's sampler). No host sync, no
# data-dependent shapes: it runs inside a CUDA graph.

MAX_STOP_TOKEN_IDS = 8


@dataclass
class SamplingParams:
    """Per-request generation parameters.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters;
    ``min_p`` keeps tokens whose probability is at least ``min_p`` times the top one;
    ``repetition_penalty`` (> 1 discourages) divides positive / multiplies negative logits of
    every token already in the prompt or output (the CTRL / transformers rule). ``seed`` makes
    sampling reproducible and independent of the batch the request runs in (``None``: a
    random seed). Generation stops at ``max_new_tokens``, at the EOS token (unless
    ``ignore_eos``), at any of ``stop_token_ids`` or when the text contains one of ``stop``.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS - 1:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS - 1} stop_token_ids are supported")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_sort(self) -> bool:
        """True when top-k / top-p thresholds must be computed (a sort of the vocabulary)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    """The ``lowbias32`` integer hash (bijective on 32-bit values)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_from_seed(seed: Tensor, counter: Tensor) -> Tensor:
    """A float32 uniform in [0, 1) per row from int64 ``(seed, counter)``: a counter-based RNG,
    so a request's random stream depends on its seed and step only (not on its batch)."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    h = _hash32(lo ^ _hash32(hi ^ 0x9E3779B9))
    h = _hash32(h ^ _hash32((counter & _M32) ^ 0x85EBCA6B))
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """Divide positive / multiply negative logits of ``seen`` tokens by ``penalty [B]`` (1 = no-op)."""
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def sample_rows(
    logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, u: Tensor,
    use_sort: bool = True,
) -> Tensor:
    """One token per row of float32 ``logits [B,V]`` with per-row parameters (tensors ``[B]``).

    Rows with ``temperature == 0`` take the argmax. Other rows sample by inverse CDF with the
    uniform ``u [B]`` from the filtered distribution ``softmax(logits / T)`` restricted to the
    top-k, then the top-p nucleus (on the top-k renormalised probabilities), then ``min_p``.
    Sampling runs over the vocabulary in its own order, so a row's token does not depend on
    whether ``use_sort`` (only needed when some row has top-k / top-p) was on.
    """
    vocab = logits.shape[-1]
    greedy = logits.argmax(dim=-1)
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / temp[:, None]
    if use_sort:
        svals = torch.sort(scaled, dim=-1, descending=True).values
        ranks = torch.arange(vocab, device=logits.device)
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        in_k = ranks[None, :] < k[:, None]
        probs = svals.masked_fill(~in_k, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs
        n_keep = ((before < top_p[:, None]) & in_k).sum(dim=-1)
        n_keep = torch.where(top_p >= 1.0, k, n_keep).clamp(min=1)
        threshold = svals.gather(1, (n_keep - 1)[:, None])
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = scaled.softmax(dim=-1)
    probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1])[:, None]
    token = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)[:, 0]
    return torch.where(temperature > 0, token, greedy)
