"""Prefix cache under hostile use: the byte bound covers what the cache really holds, lookup cost does not grow
with the number of entries, and the block index answers exactly what a brute-force search over the keys does."""

from __future__ import annotations

import gc
import random
import time

import torch

from fastxlstm.serving import prefix_cache as pc
from fastxlstm.serving.prefix_cache import BLOCK, PrefixCache

from .test_serving_units import fake_state


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_bound_counts_the_keys():
    """Long prompts and small states: the process grows by about what ``cache.bytes`` says (the old cache
    counted states only; its token-tuple keys made real memory several times the bound)."""
    layer = (torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32), torch.zeros(1, 1))  # ~4 KB of state
    length, entries = 4000, 300
    warm = PrefixCache(10**9)
    for i in range(20):
        warm.insert([i] * 64, [layer])
    warm.clear()
    gc.collect()
    cache = PrefixCache(10**9)
    before = _rss()
    for i in range(entries):  # fresh int objects per prompt, as a parsed request has
        cache.insert([(i * 7919 + j * 31) % 50_000 + 300 for j in range(length)], [layer])
    gc.collect()
    grown = _rss() - before
    assert len(cache) == entries
    assert grown <= 1.25 * cache.bytes + 2 * 1024**2, (grown, cache.bytes)
    assert cache.bytes >= entries * 4 * length  # the stored tokens are counted


def test_bound_holds_with_long_keys():
    layer = (torch.zeros(4),)
    cache = PrefixCache(64 * 1024)
    for i in range(50):
        cache.insert([i] * 2000, [layer])
        assert cache.bytes <= cache.max_bytes
    assert 0 < len(cache) < 50 and cache.evictions == 50 - len(cache)
    assert cache.bytes == sum(pc.entry_nbytes([layer], None, 2000) for _ in range(len(cache)))


def _miss_time(cache: PrefixCache, probe: list[int]) -> float:
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        assert cache.lookup(probe, count=False) is None
        best = min(best, time.perf_counter() - t)
    return best


def test_lookup_cost_does_not_grow_with_entries():
    """2,000 cached lengths of one prompt; a prompt sharing none of them is looked up about as fast as in a cache
    of one entry (the old cache hashed one tuple per cached length: ~100x slower)."""
    state = [(torch.zeros(2),)]
    prompt = [7 + (j % 200) for j in range(2000)]
    probe = [250] * 4000
    few, many = PrefixCache(10**9), PrefixCache(10**9)
    few.insert(prompt, state)
    for n in range(1, len(prompt) + 1):
        many.insert(prompt[:n], state)
    assert len(many) == 2000
    t_few, t_many = _miss_time(few, probe), _miss_time(many, probe)
    assert t_many < 3 * t_few + 1e-3, (t_few, t_many)
    # and a hit at the longest of the 2,000 costs no more than hashing the prompt
    hit = many.lookup(prompt + [1], count=False)
    assert hit is not None and hit.length == 2000


def _brute(keys: dict[tuple, tuple], tokens: list[int], limit: int, need_logits: bool):
    best = None
    for key, (_, has_logits) in keys.items():
        n = len(key)
        if 0 < n <= limit and tuple(tokens[:n]) == key and not (n == len(tokens) and need_logits and not has_logits):
            if best is None or n > len(best):
                best = key
    return best


def test_index_agrees_with_brute_force():
    """Random prompts over a tiny alphabet (many shared blocks, remainders that differ in one token), lengths
    around block boundaries, ``max_length`` cuts and exact repeats with and without logits."""
    rng = random.Random(0)
    cache = PrefixCache(10**9)
    keys: dict[tuple, tuple] = {}
    base = [rng.randrange(3) for _ in range(5 * BLOCK)]
    for i in range(300):
        n = rng.choice([1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, rng.randrange(1, 5 * BLOCK)])
        toks = base[:n] if rng.random() < 0.5 else [rng.randrange(3) for _ in range(n)]
        with_logits = rng.random() < 0.5
        value = float(i)
        if cache.insert(toks, fake_state(value, layers=1), torch.full((3,), value) if with_logits else None):
            old = keys.get(tuple(toks))
            keys[tuple(toks)] = old if old and (old[1] or not with_logits) else (value, with_logits)  # kept as is
    for _ in range(600):
        n = rng.randrange(1, 6 * BLOCK)
        toks = base[:n] if rng.random() < 0.6 else [rng.randrange(3) for _ in range(n)]
        limit = rng.choice([None, rng.randrange(0, n + 2)])
        need = rng.random() < 0.7
        want = _brute(keys, toks, n if limit is None else min(limit, n), need)
        hit = cache.lookup(toks, max_length=limit, need_logits_at_end=need, count=False)
        if want is None:
            assert hit is None, (toks, limit)
            continue
        value, with_logits = keys[want]
        assert hit is not None and hit.length == len(want), (toks, limit)
        assert float(hit.state[0][0].max()) == value
        assert (hit.logits is not None) == (len(want) == len(toks) and with_logits)
    assert sorted(map(tuple, cache.keys())) == sorted(keys)


def test_hash_collisions_never_return_another_prefix(monkeypatch):
    """With every hash equal, a lookup still answers only its own prefix (tokens are compared on a hit)."""
    monkeypatch.setattr(pc, "hash", lambda _: 0, raising=False)
    cache = PrefixCache(10**9)
    cache.insert([1, 2, 3], fake_state(1.0))
    cache.insert([4, 5, 6], fake_state(2.0))  # same (length, hash): replaces [1, 2, 3]
    assert cache.lookup([1, 2, 3, 9]) is None
    assert float(cache.lookup([4, 5, 6, 9]).state[0][0].max()) == 2.0
    cache.insert([4, 5], fake_state(3.0))
    assert cache.lookup([4, 7, 7]) is None and cache.lookup([4, 5, 7]).length == 2
    assert [4, 5, 6] in cache and [1, 2, 3] not in cache and len(cache) == 2
