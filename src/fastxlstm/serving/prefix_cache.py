"""Recurrent-state prefix cache: an LRU of model states keyed by token prefix, bounded by bytes.

A transformer server must keep a KV cache that grows with the prefix; an xLSTM keeps one
fixed-size state per prefix (for the 7B: 32 layers x (C 8x256x512 + n + m) float32 = 134 MB),
whatever the prefix length. A request whose prompt extends a cached prefix prefills only the
remaining tokens. Entries are cloned on insert and on lookup, so no caller can mutate a
cached state. Optionally an entry also keeps the logits after its last token, so that an exact
repeat of a prompt needs no prefill at all.

Index (as KV-block caches do): a prefix of length ``L = q * BLOCK + r`` sits under the chained hash of its
``q`` full blocks (``h_q = hash((h_{q-1}, block bytes))``, computed for the prompt once per lookup, outside
the lock) and its ``r`` remaining tokens. A lookup walks the prompt's block hashes from the longest down and
probes only the remainder lengths cached under that block, so its cost grows with the prompt's length,
never with the number of entries. Each entry keeps its tokens (int32 bytes) and a hit is compared with
them, so a hash collision can cost a probe but never return another prefix's state.

The byte bound counts everything an entry holds: state and logits tensors, their per-tensor overhead
(``TENSOR_OVERHEAD``), the stored tokens (4 bytes each) and the index's per-entry objects (``ENTRY_OVERHEAD``).
"""

from __future__ import annotations

import threading
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..state import ModelState, PackedState, clone_state, state_nbytes

BLOCK = 32  # tokens per hashed block
TENSOR_OVERHEAD = 640  # bytes per stored tensor besides its data (tensor objects, allocator rounding; measured)
ENTRY_OVERHEAD = 1024  # bytes per entry for the index (entry and key objects, dict slots, block counters)


def _tensor_cost(t: Tensor) -> int:
    return t.numel() * t.element_size() + TENSOR_OVERHEAD


def entry_nbytes(state: ModelState, logits: Tensor | None, length: int) -> int:
    """What one entry of ``length`` tokens holding ``state`` (and ``logits``) counts against the bound."""
    if isinstance(state, PackedState):  # the same count, without making the tensors' views
        tensors = state_nbytes(state) + TENSOR_OVERHEAD * 3 * len(state)
    else:
        tensors = sum(_tensor_cost(t) for layer in state for t in layer)
    return tensors + (_tensor_cost(logits) if logits is not None else 0) + 4 * length + ENTRY_OVERHEAD


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return array("i", tokens).tobytes()


class _Prompt:
    """A prompt's int32 bytes and the chained hashes of its full blocks (``hashes[q]``: the first ``q``)."""

    def __init__(self, tokens: Sequence[int], limit: int):
        self.data = _token_bytes(tokens[:limit])
        step = 4 * BLOCK
        self.hashes = [0]
        for q in range(limit // BLOCK):
            self.hashes.append(hash((self.hashes[-1], self.data[q * step:(q + 1) * step])))

    def key(self, length: int) -> tuple[int, int]:
        q = length // BLOCK
        return length, hash((self.hashes[q], self.data[q * BLOCK * 4:length * 4]))


def block_hashes(tokens: Sequence[int]) -> list[int]:
    """The chained hashes of the full blocks of ``tokens`` (``[h_1, ..., h_q]``; also what the data-parallel
    router indexes prompts by)."""
    return _Prompt(tokens, len(tokens)).hashes[1:]


@dataclass
class CacheHit:
    length: int  # number of prompt tokens covered by the cached state
    state: ModelState  # a private clone
    logits: Tensor | None  # logits after the last covered token, when stored


@dataclass
class _Entry:
    tokens: bytes  # int32 token ids of the prefix
    block: tuple[int, int]  # (q, h_q): the block-index node it is counted under
    state: ModelState
    logits: Tensor | None
    nbytes: int


class PrefixCache:
    """Byte-bounded LRU mapping token prefixes to recurrent states (thread-safe)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, int], _Entry] = OrderedDict()  # (length, hash) -> entry
        self._blocks: dict[tuple[int, int], Counter[int]] = {}  # (q, h_q) -> remainder lengths cached under it
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.hit_tokens = self.inserts = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: Sequence[int]) -> bool:
        if not tokens:
            return False
        prompt = _Prompt(tokens, len(tokens))
        entry = self._entries.get(prompt.key(len(tokens)))
        return entry is not None and entry.tokens == prompt.data

    def keys(self) -> list[list[int]]:
        """The cached prefixes, least recently used first."""
        with self._lock:
            data = [e.tokens for e in self._entries.values()]
        return [array("i", d).tolist() for d in data]

    def lookup(self, tokens: Sequence[int], max_length: int | None = None, need_logits_at_end: bool = True,
               count: bool = True) -> CacheHit | None:
        """Longest cached prefix of ``tokens`` no longer than ``max_length``.

        A prefix covering all of ``tokens`` is only returned when it has stored logits (when
        ``need_logits_at_end``), since the caller must sample from the logits after the prompt.
        """
        limit = len(tokens) if max_length is None else min(max_length, len(tokens))
        prompt = _Prompt(tokens, max(limit, 0))  # hashing outside the lock
        found = None
        with self._lock:
            for q in range(len(prompt.hashes) - 1, -1, -1):
                rests = self._blocks.get((q, prompt.hashes[q]))
                if not rests:
                    continue
                for r in sorted(rests, reverse=True):
                    length = q * BLOCK + r
                    if not 0 < length <= limit:
                        continue
                    key = prompt.key(length)
                    entry = self._entries.get(key)
                    if entry is None or entry.tokens != prompt.data[: 4 * length]:
                        continue
                    if length == len(tokens) and need_logits_at_end and entry.logits is None:
                        continue
                    self._entries.move_to_end(key)
                    found = length, entry
                    break
                if found is not None:
                    break
            if count:
                if found is None:
                    self.misses += 1
                else:
                    self.hits += 1
                    self.hit_tokens += found[0]
        if found is None:
            return None
        length, entry = found  # entries are never changed in place: cloning outside the lock is safe
        logits = entry.logits.clone() if entry.logits is not None and length == len(tokens) else None
        return CacheHit(length, clone_state(entry.state, packed=True), logits)

    def insert(self, tokens: Sequence[int], state: ModelState, logits: Tensor | None = None) -> bool:
        """Store a clone of ``state`` (and ``logits``) under ``tokens``; returns whether it was stored."""
        if not tokens:
            return False
        nbytes = entry_nbytes(state, logits, len(tokens))
        if nbytes > self.max_bytes:
            return False
        prompt = _Prompt(tokens, len(tokens))
        key = prompt.key(len(tokens))
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.tokens == prompt.data:
                self._entries.move_to_end(key)
                if old.logits is not None or logits is None:
                    return True  # nothing new to keep
        block = (len(tokens) // BLOCK, prompt.hashes[len(tokens) // BLOCK])
        entry = _Entry(prompt.data, block, clone_state(state, packed=True),
                       logits.clone() if logits is not None else None, nbytes)
        with self._lock:
            if key in self._entries:  # the same prefix (raced with another insert), or a hash collision
                self._remove(key)
            while self._entries and self.bytes + nbytes > self.max_bytes:
                self._remove(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key] = entry
            self._blocks.setdefault(block, Counter())[key[0] % BLOCK] += 1
            self.bytes += nbytes
            self.inserts += 1
        return True

    def _remove(self, key: tuple[int, int]) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes
        rests = self._blocks[entry.block]
        rests[key[0] % BLOCK] -= 1
        if not rests[key[0] % BLOCK]:
            del rests[key[0] % BLOCK]
            if not rests:
                del self._blocks[entry.block]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._blocks.clear()
            self.bytes = 0
