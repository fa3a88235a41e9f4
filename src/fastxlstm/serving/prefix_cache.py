"""Recurrent-state prefix cache: an LRU of model states keyed by token prefix, bounded by bytes.

A transformer server must keep a KV cache that grows with the prefix; an xLSTM keeps one
fixed-size state per prefix (for the 7B: 32 layers x (C 8x256x512 + n + m) float32 = 134 MB),
whatever the prefix length. A request whose prompt extends a cached prefix prefills only the
remaining tokens. Entries are cloned on insert and on lookup, so no caller can mutate a
cached state. Optionally an entry also keeps the logits after its last token, so that an exact
repeat of a prompt needs no prefill at all.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..model import ModelState


def state_nbytes(state: ModelState) -> int:
    return sum(t.numel() * t.element_size() for layer in state for t in layer)


def clone_state(state: ModelState) -> ModelState:
    return [tuple(t.clone() for t in layer) for layer in state]


@dataclass
class CacheHit:
    length: int  # number of prompt tokens covered by the cached state
    state: ModelState  # a private clone
    logits: Tensor | None  # logits after the last covered token, when stored


@dataclass
class _Entry:
    state: ModelState
    logits: Tensor | None
    nbytes: int


class PrefixCache:
    """Byte-bounded LRU mapping token prefixes to recurrent states (thread-safe)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._lengths: Counter[int] = Counter()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.hit_tokens = self.inserts = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: Sequence[int]) -> bool:
        return tuple(tokens) in self._entries

    def lookup(self, tokens: Sequence[int], max_length: int | None = None, need_logits_at_end: bool = True,
               count: bool = True) -> CacheHit | None:
        """Longest cached prefix of ``tokens`` no longer than ``max_length``.

        A prefix covering all of ``tokens`` is only returned when it has stored logits (when
        ``need_logits_at_end``), since the caller must sample from the logits after the prompt.
        """
        limit = len(tokens) if max_length is None else min(max_length, len(tokens))
        with self._lock:
            for length in sorted((n for n in self._lengths if 0 < n <= limit), reverse=True):
                key = tuple(tokens[:length])
                entry = self._entries.get(key)
                if entry is None:
                    continue
                if length == len(tokens) and need_logits_at_end and entry.logits is None:
                    continue
                self._entries.move_to_end(key)
                if count:
                    self.hits += 1
                    self.hit_tokens += length
                logits = entry.logits.clone() if entry.logits is not None and length == len(tokens) else None
                return CacheHit(length, clone_state(entry.state), logits)
            if count:
                self.misses += 1
        return None

    def insert(self, tokens: Sequence[int], state: ModelState, logits: Tensor | None = None) -> bool:
        """Store a clone of ``state`` (and ``logits``) under ``tokens``; returns whether it was stored."""
        key = tuple(tokens)
        if not key:
            return False
        nbytes = state_nbytes(state) + (logits.numel() * logits.element_size() if logits is not None else 0)
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                self._entries.move_to_end(key)
                if old.logits is not None or logits is None:
                    return True  # nothing new to keep
                self._remove(key)
        entry = _Entry(clone_state(state), logits.clone() if logits is not None else None, nbytes)
        with self._lock:
            if key in self._entries:  # raced with another insert of the same key
                self._remove(key)
            while self._entries and self.bytes + nbytes > self.max_bytes:
                self._remove(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key] = entry
            self._lengths[len(key)] += 1
            self.bytes += nbytes
            self.inserts += 1
        return True

    def _remove(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes
        self._lengths[len(key)] -= 1
        if not self._lengths[len(key)]:
            del self._lengths[len(key)]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._lengths.clear()
            self.bytes = 0
