"""Speculative decoding for the recurrent model: the configuration, the drafters and the draft model's slots.

A speculative step (:meth:`Engine.spec_step`) feeds every running slot its pending token and ``k`` drafted
tokens, scores the ``k + 1`` positions in one chunkwise forward from the committed state without writing it
(:meth:`Runner.verify`), accepts with the slot's own sampler position by position and then applies exactly
the accepted prefix to the committed state from the per-token terms the forward kept (:meth:`Runner.commit`):
no state is copied or rolled back. See ``docs/speculative.md``.

Drafters: :class:`NgramIndex` (prompt lookup over the prompt and the output so far, on the host) and
:class:`DraftModel` (a small xLSTM with the same vocabulary, its own slot states, drafting greedily on the
device; its state is committed to the accepted prefix like the target's).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..state import State, zero_state
from .runner import Runner
from .transfer import to_device

#: Most draft tokens per step (``num_speculative_tokens``).
MAX_SPECULATIVE_TOKENS = 16
METHODS = ("ngram", "draft")
_ALIASES = {"draft_model": "draft"}  # vLLM's name of the method


@dataclass
class SpeculativeConfig:
    """vLLM's ``speculative_config`` fields that apply here: ``method`` (``"ngram"``: prompt lookup;
    ``"draft"`` or vLLM's ``"draft_model"``: a small xLSTM given by ``model``, a directory, hub id,
    ``random:<preset>`` or an ``XLSTMForCausalLM``), ``num_speculative_tokens`` (k, 1 ..
    :data:`MAX_SPECULATIVE_TOKENS`), and for ``ngram`` the n-gram lengths tried, longest first
    (``prompt_lookup_max`` default 5, ``prompt_lookup_min`` default 1)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 1
    model: object = None

    def __post_init__(self) -> None:
        self.method = _ALIASES.get(self.method, self.method)
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {METHODS} (or 'draft_model'), "
                             f"got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)) or not 1 <= lo <= hi:
            raise ValueError(f"speculative_config needs integers 1 <= prompt_lookup_min <= prompt_lookup_max, "
                             f"got {lo!r}, {hi!r}")
        if self.method == "draft" and self.model is None:
            raise ValueError("speculative_config method 'draft' needs 'model' (the draft model)")
        if self.method == "ngram" and self.model is not None:
            raise ValueError("speculative_config method 'ngram' takes no 'model'")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """A config from a dict or a JSON string (the CLI's ``--speculative-config``); None stays None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict or a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        if "method" not in value or "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs 'method' and 'num_speculative_tokens'")
        return cls(**value)


class NgramIndex:
    """Prompt lookup for one sequence: proposes the tokens that followed the latest earlier occurrence of
    the sequence's last ``n`` tokens, for the longest ``n`` in ``[n_min, n_max]`` that occurred. Updated
    incrementally (a dict per ``n``: constant work per new token)."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self._seen: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(n_min, n_max + 1)}
        self._done = 0  # end positions p < len(tokens) indexed so far (an n-gram ending at p, continued at p)

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(int(t) for t in tokens)
        toks = self.tokens
        for p in range(max(self._done, 1), len(toks)):  # n-grams ending before position p, which now exists
            for n, table in self._seen.items():
                if p >= n:
                    table[tuple(toks[p - n:p])] = p
        self._done = max(self._done, len(toks))

    def propose(self, k: int) -> list[int]:
        toks = self.tokens
        for n in range(min(self.n_max, len(toks)), self.n_min - 1, -1):
            p = self._seen[n].get(tuple(toks[len(toks) - n:]))
            if p is not None:
                return toks[p:p + k]
        return []


class DraftModel:
    """A small xLSTM drafting for the engine's slots: its own recurrent state per slot (the state after the
    same committed prefix as the target's), greedy drafts from a scratch copy of that state, and the commit
    of the accepted prefix from the per-token terms of one forward over the step's inputs."""

    def __init__(self, model, max_slots: int, k: int, backend: str = "auto", chunk_size: int = 4096):
        model.eval()
        self.runner = Runner(model, backend=backend, chunk_size=chunk_size)
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        dev = self.runner.device
        dims = (cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim)
        self.states: list[State] = [zero_state(max_slots, *dims, dev) for _ in range(cfg.num_blocks)]
        self.scratch: list[State] = [zero_state(max_slots, *dims, dev) for _ in range(cfg.num_blocks)]
        self.k = k

    def prefill(self, slot: int, prefix: Sequence[int]) -> None:
        """Make the slot's draft state the state after ``prefix`` (the sequence's tokens before its pending
        token; empty: zeros)."""
        dst = [t[slot:slot + 1] for layer in self.states for t in layer]
        if not len(prefix):
            for t in dst:
                t.zero_()
            return
        ids = torch.as_tensor(list(prefix), dtype=torch.long, device=self.runner.device)[None]
        _, state = self.runner.forward_tokens(ids)
        torch._foreach_copy_(dst, [t for layer in state for t in layer])

    def _views(self, states: list[State], bsz: int) -> list[State]:
        return [tuple(t[:bsz] for t in layer) for layer in states]

    def propose(self, tokens: Tensor, active: Tensor, out: Tensor) -> None:
        """Greedy drafts ``out [bsz, k]`` continuing each row's pending ``tokens [bsz]`` (capturable)."""
        bsz = tokens.shape[0]
        scratch, states = self._views(self.scratch, bsz), self._views(self.states, bsz)
        torch._foreach_copy_([t for layer in scratch for t in layer], [t for layer in states for t in layer])
        x = tokens
        for j in range(self.k):
            x = self.runner.decode(x, scratch, active).argmax(dim=-1)
            out[:, j] = x

    def commit(self, ids: Tensor, lengths: Tensor) -> None:
        """Advance the draft states of rows ``[:bsz]`` over the first ``lengths`` of ``ids [bsz, k+1]``."""
        states = self._views(self.states, ids.shape[0])
        _, terms = self.runner.verify(ids, states)
        self.runner.commit(states, terms, lengths)


class Speculation:
    """An engine's speculative decoding: the config, per-slot draft buffers and counters, the draft model,
    and the step (:meth:`step_fn`) the engine runs or captures per (batch bucket, sampler mode)."""

    def __init__(self, engine, config: SpeculativeConfig, draft_model, backend: str, chunk_size: int):
        if (config.method == "draft") != (draft_model is not None):
            raise ValueError("speculative method 'draft' needs draft_model (and only it takes one)")
        self.engine, self.config = engine, config
        n, self.k, dev = engine.max_slots, config.num_speculative_tokens, engine.device
        self.draft = None
        if draft_model is not None:
            if draft_model.config.vocab_size != engine.vocab_size:
                raise ValueError(f"the draft model's vocab_size {draft_model.config.vocab_size} differs from the "
                                 f"target's {engine.vocab_size}")
            if draft_model.device != dev:
                raise ValueError(f"the draft model is on {draft_model.device}, the target on {dev}")
            self.draft = DraftModel(draft_model, n, self.k, backend=backend, chunk_size=chunk_size)
        i64 = dict(device=dev, dtype=torch.long)
        self.drafts = torch.zeros(n, self.k, **i64)  # each slot's draft tokens of the step
        self.draft_len = torch.zeros(n, **i64)  # how many of them are real proposals
        self.steps, self.drafted, self.accepted = (torch.zeros(n, **i64) for _ in range(3))  # since reset

    def reset(self, slot: int) -> None:
        for t in (self.steps, self.drafted, self.accepted):
            t[slot:slot + 1].zero_()

    def counts(self, slot: int) -> tuple[int, int, int]:
        one = slice(slot, slot + 1)
        steps, drafted, accepted = torch.cat([self.steps[one], self.drafted[one], self.accepted[one]]).tolist()
        return steps, drafted, accepted

    def load_drafts(self, bsz: int, drafts: dict[int, Sequence[int]] | None) -> None:
        """Copy host drafts (slot -> tokens, at most k used) into rows ``[:bsz]`` (one non-blocking copy)."""
        if self.draft is not None:
            if drafts is not None:
                raise ValueError("this engine drafts with its draft model: spec_step takes no drafts")
            return
        k, vocab = self.k, self.engine.vocab_size
        rows = torch.zeros(bsz, k + 1, dtype=torch.long)
        for s, toks in (drafts or {}).items():
            toks = list(toks)[:k]
            if 0 <= s < bsz and toks:
                rows[s, :len(toks)] = torch.as_tensor(toks, dtype=torch.long).clamp_(0, vocab - 1)
                rows[s, k] = len(toks)
        rows = to_device(rows, self.engine.device)
        self.drafts[:bsz].copy_(rows[:, :k])
        self.draft_len[:bsz].copy_(rows[:, k])

    def step_fn(self, bsz: int, mode: str):
        """One speculative step of rows ``[:bsz]`` (capturable): draft (with a draft model), verify the pending
        token and the ``k`` drafts in one forward, accept position by position with the slot's sampler and
        commit exactly the emitted prefix. Position ``j`` samples the target's token with the plain path's
        sampler, penalties and RNG stream (the tokens accepted before ``j`` already counted), and the draft at
        ``j`` is accepted when it equals that token: for greedy rows the longest prefix the target's argmax
        agrees with, for sampled rows the rejection rule for a point-mass proposal (accept with probability
        ``p(d)``; on rejection a token from ``p`` without ``d``), so the output is the plain path's."""
        eng = self.engine
        ridx = slice(0, bsz)
        views = [(c[:bsz], n[:bsz], m[:bsz]) for c, n, m in eng.states]
        k, sampler = self.k, eng.sampler
        tokens, active = eng.tokens[:bsz], eng.active[:bsz]
        drafts, dlen = self.drafts[:bsz], self.draft_len[:bsz]

        def fn() -> Tensor:
            run = active.clone()
            if self.draft is not None:
                self.draft.propose(tokens, run, drafts)
                dlen.fill_(k)
            ids = torch.cat([tokens[:, None], drafts], dim=1)  # [bsz, k+1]: the pending token and the drafts
            logits, terms = eng.runner.verify(ids, views)
            acc, stopped = run.clone(), torch.zeros_like(run)
            length = torch.zeros(bsz, device=ids.device, dtype=torch.long)
            accepted = torch.zeros_like(length)
            for j in range(k + 1):
                nxt = sampler.advance(ridx, logits[:, j], mode, acc)  # emits position j where acc
                length += acc
                stopped |= acc & ~active  # EOS, a stop id or max_new_tokens
                if j < k:
                    hit = acc & (nxt == drafts[:, j]) & (dlen > j)
                    accepted += hit
                    acc = hit & active
            active.copy_(run & ~stopped)
            eng.runner.commit(views, terms, length)
            if self.draft is not None:
                self.draft.commit(ids, length)
            self.drafted[:bsz] += torch.where(run, dlen, 0)
            self.accepted[:bsz] += accepted
            self.steps[:bsz] += run
            return logits

        return fn
