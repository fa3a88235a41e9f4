"""The one sampler: request parameters (:class:`SamplingParams`) and the batched, capturable math the
engine runs on the device for every entry point (``LLM``, ``fastxlstm generate``, the server).

Order of operations for a row of float32 logits (after the model's soft-cap):

0. a grammar's token bitmask (structured output): disallowed tokens get ``-inf``;
1. repetition penalty over every token of the prompt and the output so far (divide positive,
   multiply negative logits: the CTRL / transformers rule);
2. presence and frequency penalties over the tokens generated so far (OpenAI's rule:
   ``logit - frequency * count - presence * (count > 0)``);
3. ``logit_bias`` added;
4. temperature (``0``: greedy, the argmax of the processed logits; the steps below are skipped);
5. top-k, then top-p (nucleus on the top-k renormalised probabilities), then min-p (relative to the
   most likely token), the order transformers' logits warpers use;
6. one draw by inverse CDF with a counter-based uniform ``u(seed, n)``, ``n`` the number of tokens
   the sequence sampled before: a seeded request draws the same tokens whatever batch it shares and
   whichever entry point sent it.

Log-probabilities (``logprobs``) are those of the model's distribution (the log-softmax of the raw
logits, before penalties, bias and temperature), with up to :data:`MAX_LOGPROBS` alternatives.
No host sync and no data-dependent shapes: every function here can run inside a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MAX_STOP_TOKEN_IDS = 8
MAX_LOGIT_BIAS = 1024
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Per-request generation parameters (see the module docstring for the order they apply in).

    ``temperature == 0`` is greedy. ``top_k == 0``, ``top_p == 1`` and ``min_p == 0`` disable those
    filters; ``repetition_penalty`` (> 1 discourages, 1 = off), ``presence_penalty`` and
    ``frequency_penalty`` (OpenAI's, in [-2, 2]), ``logit_bias`` (token id -> value added to its logit,
    at most :data:`MAX_LOGIT_BIAS` entries). ``seed`` makes sampling reproducible and independent of
    the batch (``None``: a random seed). ``logprobs``: ``None`` for none, else the number of top
    alternatives to report with each token's log-probability (0 .. :data:`MAX_LOGPROBS`).
    Generation stops at ``max_new_tokens``, at the EOS token (unless ``ignore_eos``), at any of
    ``stop_token_ids`` or when the text contains one of ``stop``."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        _check(self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0", self.max_new_tokens)
        _check(self.temperature >= 0, "temperature", "must be >= 0", self.temperature)
        _check(self.top_k >= 0, "top_k", "must be >= 0", self.top_k)
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, name, "must be in [-2, 2]", value)
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias", f"may name at most {MAX_LOGIT_BIAS} tokens",
               len(self.logit_bias))
        _check(all(v == v and abs(v) != float("inf") for v in self.logit_bias.values()), "logit_bias",
               "values must be finite", self.logit_bias)
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
               f"must be None or in [0, {MAX_LOGPROBS}]", self.logprobs)
        _check(all(self.stop), "stop", "strings must be non-empty", self.stop)
        _check(len(self.stop_token_ids) < MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"at most {MAX_STOP_TOKEN_IDS - 1} are supported", self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_processing(self) -> bool:
        """Penalties or a logit bias change the logits before the choice."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias)

    @property
    def needs_sort(self) -> bool:
        """True when top-k / top-p thresholds must be computed (a sort of the vocabulary)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` for a ``logit_bias`` or ``stop_token_ids`` entry outside the vocabulary."""
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            _check(not bad, name, f"token ids must be in [0, {vocab_size})", bad)


def _check(ok: bool, name: str, what: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} {what}, got {value!r}")


def batch_mode(params: list[SamplingParams | None]) -> str:
    """The sampler variant a batch needs: ``greedy`` (raw argmax), ``sample`` (penalties / bias /
    temperature), ``sorted`` (top-k / top-p too), with ``+lp`` when some row reports logprobs. (The sampler
    adds ``+gm`` before ``+lp`` when some row follows a grammar: :meth:`SlotSampler.mode`.)"""
    kind, lp = "greedy", False
    for p in params:
        if p is None:
            continue
        lp = lp or p.logprobs is not None
        if p.needs_sort:
            kind = "sorted"
        elif kind == "greedy" and (not p.greedy or p.needs_processing):
            kind = "sample"
    return kind + ("+lp" if lp else "")


# ---------------------------------------------------------------------------------- counter-based RNG
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


# ------------------------------------------------------------------------------------- the steps
def apply_token_mask(logits: Tensor, words: Tensor, word_of: Tensor, bit_of: Tensor) -> Tensor:
    """Step 0: ``-inf`` where the int32 bitmask ``words [B, ceil(V/32)]`` has bit ``bit_of[t]`` of word
    ``word_of[t]`` clear (``word_of = arange(V) // 32``, ``bit_of = arange(V) % 32``; all bits set: no-op)."""
    allowed = ((words[:, word_of] >> bit_of) & 1).bool()
    return logits.masked_fill(~allowed, float("-inf"))


def apply_penalties(logits: Tensor, seen: Tensor, counts: Tensor, repetition: Tensor, presence: Tensor,
                    frequency: Tensor) -> Tensor:
    """Steps 1-2: ``seen [B,V]`` (bool: prompt and output tokens), ``counts [B,V]`` (float: output
    tokens), per-row ``repetition`` / ``presence`` / ``frequency [B]`` (1, 0, 0 = no-op)."""
    p = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: Tensor, bias_ids: Tensor, bias_values: Tensor) -> Tensor:
    """Step 3: add ``bias_values [B,K]`` at ``bias_ids [B,K]`` (unused entries: value 0 at id 0)."""
    return logits.scatter_add(1, bias_ids, bias_values)


def sample_rows(
    logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, u: Tensor,
    use_sort: bool = True,
) -> Tensor:
    """Steps 4-6: one token per row of float32 ``logits [B,V]`` with per-row parameters ``[B]``.

    Rows with ``temperature == 0`` take the argmax. Other rows sample by inverse CDF with the
    uniform ``u [B]``. Sampling runs over the vocabulary in its own order, so a row's token does not
    depend on whether ``use_sort`` (only needed when some row has top-k / top-p) was on."""
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


def token_logprobs(logits: Tensor, tokens: Tensor, k: int = MAX_LOGPROBS) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities under the model's distribution ``log_softmax(logits [B,V])``: of ``tokens [B]``
    ``[B]``, and the top ``k`` alternatives, values and ids ``[B,k]`` (descending)."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    chosen = lsm.gather(1, tokens[:, None])[:, 0]
    top = lsm.topk(min(k, lsm.shape[-1]), dim=-1)
    return chosen, top.values, top.indices
