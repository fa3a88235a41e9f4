"""Per-slot sampling state on the device: the parameters of every slot as tensors, the token each slot
feeds next, stop conditions, and a ring buffer of what each slot sampled (tokens and log-probabilities)
since the host last read it. :meth:`SlotSampler.advance` is the one sampling step of the engine (first
tokens from prefill logits and every decode step, inside the CUDA graphs)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    apply_token_mask,
    batch_mode,
    sample_rows,
    token_logprobs,
    uniform_from_seed,
)
from .transfer import to_device


def _row_views(*tensors: Tensor):
    """Per row ``j``, the views ``t[j:j+1]`` of each of ``tensors`` (one split each)."""
    return zip(*(t.split(1) for t in tensors))


@dataclass
class SlotRead:
    """What a slot sampled since the previous read: ``new_tokens``, whether it stopped, and (where its
    parameters ask for logprobs) each token's log-probability and its top alternatives
    ``[(token_id, logprob), ...]`` (as many as the request's ``logprobs``)."""

    slot: int
    new_tokens: list[int]
    finished: bool
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class SlotSampler:
    """Sampling parameters and bookkeeping of ``n`` slots (device tensors, one row per slot)."""

    def __init__(self, n: int, vocab_size: int, device: torch.device, history: int = 256,
                 eos_token_id: int | None = None):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        f32 = dict(device=device, dtype=torch.float32)
        i64 = dict(device=device, dtype=torch.long)
        self.n, self.vocab_size, self.device, self.history = n, vocab_size, device, history
        self.eos_token_id = eos_token_id
        self.tokens = torch.zeros(n, **i64)  # each slot's next decode input: its last sampled token
        self.active = torch.zeros(n, device=device, dtype=torch.bool)
        self.temperature = torch.zeros(n, **f32)
        self.top_k = torch.zeros(n, **i64)
        self.top_p = torch.ones(n, **f32)
        self.min_p = torch.zeros(n, **f32)
        self.repetition = torch.ones(n, **f32)
        self.presence = torch.zeros(n, **f32)
        self.frequency = torch.zeros(n, **f32)
        self.seed = torch.zeros(n, **i64)
        self.counter = torch.zeros(n, **i64)  # tokens sampled so far (the RNG position)
        self.seen = torch.zeros(n, vocab_size, device=device, dtype=torch.bool)  # prompt + output
        self.counts = torch.zeros(n, vocab_size, **f32)  # output only
        self.bias_ids = torch.zeros(n, MAX_LOGIT_BIAS, **i64)
        self.bias_values = torch.zeros(n, MAX_LOGIT_BIAS, **f32)
        self.remaining = torch.zeros(n, **i64)
        self.stop_ids = torch.full((n, MAX_STOP_TOKEN_IDS), -1, **i64)
        # ring buffers of what each slot sampled, position ``pos % history``
        self.hist = torch.zeros(n, history, **i64)
        self.hist_lp = torch.zeros(n, history, **f32)
        self.hist_top_lp = torch.zeros(n, history, MAX_LOGPROBS, **f32)
        self.hist_top_ids = torch.zeros(n, history, MAX_LOGPROBS, **i64)
        self.pos = torch.zeros(n, **i64)
        # grammar bitmasks (structured output): int32 words, bit t % 32 of word t // 32 = token t allowed
        words = (vocab_size + 31) // 32
        self.allow = torch.full((n, words), -1, device=device, dtype=torch.int32)
        vocab = torch.arange(vocab_size, device=device)
        self._word_of, self._bit_of = vocab // 32, (vocab % 32).to(torch.int32)
        self.masked = [False] * n  # rows whose sampling reads their bitmask
        self.params: list[SamplingParams | None] = [None] * n
        self._read_pos = [0] * n
        # per slot, views of its row of the fields :meth:`configure` sets (made once: a configure makes none)
        self._rows = list(zip(
            _row_views(self.temperature, self.top_p, self.min_p, self.repetition, self.presence, self.frequency),
            (r + (s,) for r, s in zip(_row_views(self.top_k, self.seed, self.counter, self.remaining),
                                      self.stop_ids.unbind(0))),
            _row_views(self.bias_ids, self.bias_values, self.seen, self.counts, self.pos),
            self.allow.split(1), self.seen.unbind(0)))

    # ------------------------------------------------------------------------------ configuration
    def configure(self, slot: int, params: SamplingParams, history: Sequence[int] | Tensor = (),
                  counter: int = 0) -> None:
        """Set ``slot``'s parameters and stop conditions; ``history`` (prompt and earlier output) feeds
        the repetition penalty; ``counter`` is the RNG position (tokens drawn so far)."""
        params.check_vocab(self.vocab_size)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.params[slot] = params
        stops = list(params.stop_token_ids)
        if not params.ignore_eos and self.eos_token_id is not None:
            stops.append(int(self.eos_token_id))
        stops += [-1] * (MAX_STOP_TOKEN_IDS - len(stops))
        # the slot's fields from one host tensor per dtype by one multi-tensor copy each, into row views made
        # once (``t[slot] = x`` of a CPU scalar waits for all queued GPU work; a fill per field is a launch each)
        floats, longs, zeros, allow, seen = self._rows[slot]
        values = (params.temperature, params.top_p, params.min_p, params.repetition_penalty, params.presence_penalty,
                  params.frequency_penalty)
        torch._foreach_copy_(floats, to_device([float(v) for v in values], self.device, torch.float32).split(1))
        torch._foreach_copy_(longs, to_device(
            [int(params.top_k), int(seed) & ((1 << 63) - 1), int(counter), int(params.max_new_tokens), *stops],
            self.device).split([1, 1, 1, 1, len(stops)]))
        torch._foreach_zero_(zeros)  # logit bias, seen tokens, output counts, ring position
        if params.logit_bias:
            k = len(params.logit_bias)
            self.bias_ids[slot, :k] = to_device(list(params.logit_bias), self.device)
            self.bias_values[slot, :k] = to_device(list(params.logit_bias.values()), self.device, torch.float32)
        if len(history):
            seen.index_fill_(0, to_device(history if isinstance(history, Tensor) else list(history), self.device),
                             True)
        allow.fill_(-1)  # rows of a grammar batch that follow none read all-ones
        self._read_pos[slot] = 0
        self.masked[slot] = False

    def release(self, slot: int) -> None:
        self.active[slot:slot + 1].zero_()  # a 0-dim write would wait for the GPU
        self.params[slot] = None
        self.masked[slot] = False

    def set_masks(self, slots: Sequence[int], words: Tensor) -> None:
        """The allowed next tokens of ``slots``: int32 bitmask rows ``words [len(slots), ceil(V/32)]`` (a CPU
        tensor, pinned for an asynchronous copy, or on the device); the slots sample under their masks from
        now on (until :meth:`configure` or :meth:`release`), each step reading the row last set."""
        if words.shape != (len(slots), self.allow.shape[1]) or words.dtype != torch.int32:
            raise ValueError(f"masks must be int32 {(len(slots), self.allow.shape[1])}, got {words.dtype} "
                             f"{tuple(words.shape)}")
        ridx = to_device(list(slots), self.device)
        self.allow.index_copy_(0, ridx, words.to(self.device, non_blocking=True))
        for s in slots:
            self.masked[s] = True

    def mode(self, slots: Sequence[int]) -> str:
        """The sampler variant (:func:`fastxlstm.sampling.batch_mode`) the parameters of ``slots`` need, with
        ``+gm`` (before ``+lp``) when some of them sample under a grammar's bitmask."""
        mode = batch_mode([self.params[s] for s in slots])
        if any(self.masked[s] for s in slots):
            kind, lp = mode.split("+")[0], mode.endswith("+lp")
            mode = kind + "+gm" + ("+lp" if lp else "")
        return mode

    # ------------------------------------------------------------------------------------ the step
    def advance(self, ridx: Tensor | slice, logits: Tensor, mode: str, act: Tensor) -> Tensor:
        """Sample the next token of rows ``ridx`` (index tensor, or a slice of the leading rows: the decode
        step's case) from float32 ``logits`` and update their bookkeeping; inactive rows keep everything.
        Capturable: no host sync, static shapes."""
        kind, want_lp = mode.split("+")[0], mode.endswith("+lp")
        x = logits
        if "+gm" in mode:  # rows without a grammar hold all-ones masks
            x = apply_token_mask(x, self.allow[ridx], self._word_of, self._bit_of)
        if kind == "greedy":
            nxt = x.argmax(dim=-1)
        else:
            x = apply_penalties(x, self.seen[ridx], self.counts[ridx], self.repetition[ridx],
                                self.presence[ridx], self.frequency[ridx])
            x = apply_logit_bias(x, self.bias_ids[ridx], self.bias_values[ridx])
            u = uniform_from_seed(self.seed[ridx], self.counter[ridx])
            nxt = sample_rows(x, self.temperature[ridx], self.top_k[ridx], self.top_p[ridx], self.min_p[ridx], u,
                              use_sort=kind == "sorted")
        nxt = torch.where(act, nxt, self.tokens[ridx])
        rows = ridx if isinstance(ridx, Tensor) else torch.arange(ridx.start or 0, ridx.stop, device=nxt.device)
        col = self.pos[ridx] % self.history
        step = act.long()
        self.seen.index_put_((rows, nxt), self.seen[rows, nxt] | act)
        self.counts.index_put_((rows, nxt), act.to(torch.float32), accumulate=True)
        self.hist.index_put_((rows, col), torch.where(act, nxt, self.hist[rows, col]))
        if want_lp:
            chosen, top_v, top_i = token_logprobs(logits, nxt)
            self.hist_lp.index_put_((rows, col), torch.where(act, chosen, self.hist_lp[rows, col]))
            a2 = act[:, None]
            self.hist_top_lp.index_put_((rows, col), torch.where(a2, top_v, self.hist_top_lp[rows, col]))
            self.hist_top_ids.index_put_((rows, col), torch.where(a2, top_i, self.hist_top_ids[rows, col]))
        self.tokens[ridx] = nxt
        self.counter[ridx] = self.counter[ridx] + step
        self.pos[ridx] = self.pos[ridx] + step
        rem = self.remaining[ridx] - step
        self.remaining[ridx] = rem
        stop = (rem <= 0) | (nxt[:, None] == self.stop_ids[ridx]).any(dim=-1)
        self.active[ridx] = act & ~stop
        return nxt

    def last_logprobs(self, ridx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The log-probability and top alternatives (values, ids) of each row's latest token (device)."""
        col = (self.pos[ridx] - 1) % self.history
        return self.hist_lp[ridx, col], self.hist_top_lp[ridx, col], self.hist_top_ids[ridx, col]

    # ---------------------------------------------------------------------------------------- reads
    def read(self, slots: Sequence[int], start: Sequence[int] | None = None) -> list[SlotRead]:
        """What each slot sampled since its last read (one host sync for all slots); ``start``: per slot, the
        position to read from instead (tokens sampled since its configuration that the caller already has)."""
        if not slots:
            return []
        ridx = to_device(list(slots), self.device)
        lp_rows = [j for j, s in enumerate(slots) if self.params[s] is not None and self.params[s].logprobs is not None]
        packed = torch.cat([self.pos[ridx, None], self.active[ridx, None].long(), self.hist[ridx]], dim=1)
        lp = None
        if lp_rows:
            sel = ridx[to_device(lp_rows, self.device)]
            lp, top_v, top_i = self.hist_lp[sel], self.hist_top_lp[sel], self.hist_top_ids[sel]
            lp, top_v, top_i = lp.cpu(), top_v.cpu(), top_i.cpu()
        packed = packed.cpu()
        out = []
        where = {j: r for r, j in enumerate(lp_rows)}
        for j, s in enumerate(slots):
            pos, active = int(packed[j, 0]), bool(packed[j, 1])
            begin = self._read_pos[s] if start is None else int(start[j])
            if pos - begin > self.history:
                raise RuntimeError(f"slot {s}: {pos - begin} tokens since the last read exceed the history "
                                   f"buffer ({self.history}); read more often or raise history")
            cols = [p % self.history for p in range(begin, pos)]
            read = SlotRead(s, [int(packed[j, 2 + c]) for c in cols], not active)
            if j in where:
                r, k = where[j], self.params[s].logprobs
                read.logprobs = [float(lp[r, c]) for c in cols]
                read.top_logprobs = [list(zip(top_i[r, c, :k].tolist(), top_v[r, c, :k].tolist())) for c in cols]
            self._read_pos[s] = pos
            out.append(read)
        return out
