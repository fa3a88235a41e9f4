"""Prefill planning, pure: what the device computes for a prefill of (batch, padded length), which waiting
prompts share one forward, where the next piece of a long prompt ends. No backend calls and no state: the
scheduler's :meth:`~fastxlstm.serving.core.SchedulerCore._prefill` asks these questions and runs the answers."""

from __future__ import annotations

from .requests import GenerationRequest


class PrefillPlanner:
    """Answers the prefill questions for a backend (duck-typed: its optional ``prefill_cost(b, n)``,
    ``prefill_max_batch`` and ``prefill_padded``) and a per-iteration budget of ``chunk`` device tokens."""

    def __init__(self, backend, chunk: int, pad_ratio: float = 1.3):
        if pad_ratio < 1.0:
            raise ValueError(f"prefill_pad_ratio must be >= 1, got {pad_ratio}")
        self.backend = backend
        self.chunk = chunk
        self.pad_ratio = pad_ratio  # padded / real tokens allowed in one batched prefill
        # what a prefill of (batch, padded length) costs the device: the backend's graph bucket, else b * n
        self.cost = getattr(backend, "prefill_cost", None) or (lambda b, n: b * n)
        self.max_batch: int | None = getattr(backend, "prefill_max_batch", None)

    @staticmethod
    def whole(req: GenerationRequest) -> bool:
        """Whether the remaining prompt can go in one forward (no cache point inside it)."""
        n = len(req.prompt)
        return req.pos < n and not any(req.pos < p < n for p in req.cache_points)

    def piece_end(self, req: GenerationRequest, budget: int) -> int | None:
        """Where the next prefill piece of ``req`` ends: at its end or next cache point, cut to the longest
        piece whose cost fits ``budget`` (None: none fits; a fresh budget always makes progress)."""
        limit = min([len(req.prompt), *(p for p in req.cache_points if p > req.pos)]) - req.pos
        n = min(limit, budget)
        if self.cost(1, n) > budget:  # e.g. rounded up to a graph bucket: the longest piece that fits
            lo, hi = 0, n
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self.cost(1, mid) <= budget else (lo, mid - 1)
            n = lo
        if n == 0:
            return None if budget < self.chunk else req.pos + min(limit, budget)
        return req.pos + n

    def bucket(self, req: GenerationRequest, pool: list[GenerationRequest], budget: int,
               done: set[int]) -> list[GenerationRequest]:
        """``req`` and the prompts of ``pool`` (those prefilling, ``id`` not in ``done``) of lengths nearest to
        its own that share its forward: same start-state kind, whole remaining prompts, at most the backend's
        ``prefill_max_batch`` of them, and a cost (:attr:`cost` of the group padded to its longest) at most
        ``budget`` and at most ``pad_ratio`` x what the prompts cost one by one (1: no extra device work; a
        backend without ``prefill_padded`` gets equal lengths only). The largest such run of neighbours in
        length order, the cheapest of those."""
        padded = getattr(self.backend, "prefill_padded", False)
        ratio = self.pad_ratio if padded else 1.0
        kind = req.state is None
        pool = sorted((r for r in pool if r is req or (
            id(r) not in done and (r.state is None) == kind and self.whole(r) and r.prompt_logprobs is None)),
            key=lambda r: len(r.prompt) - r.pos)
        lens = [len(r.prompt) - r.pos for r in pool]
        alone = [0]  # prefix sums of the one-by-one costs
        for n in lens:
            alone.append(alone[-1] + self.cost(1, n))
        i = pool.index(req)
        for k in range(min(len(pool), self.max_batch or len(pool)), 1, -1):
            if self.cost(k, lens[i]) > budget:  # every run holding req is at least this long
                continue
            runs = []  # (cost, length spread, start) of each run of k holding req that may share a forward
            for lo in range(max(0, i - k + 1), min(i, len(pool) - k) + 1):
                hi = lo + k
                if not padded and lens[lo] != lens[hi - 1]:
                    continue
                cost = self.cost(k, lens[hi - 1])
                if cost <= budget and cost <= ratio * (alone[hi] - alone[lo]) + 1e-9:
                    runs.append((cost, lens[hi - 1] - lens[lo], lo))
            if runs:
                lo = min(runs)[2]
                return pool[lo:lo + k]
        return [req]
