"""Which data-parallel replica gets a request: the one that holds the longest cached prefix of its prompt (so a
chat's next turn lands where the previous turn's recurrent state is cached), else the least-loaded one.

The router cannot see the replicas' prefix caches (they live in the worker processes); it remembers instead which
replica it sent each prompt block to: the chained hashes of a prompt's full 32-token blocks (the prefix cache's
own :func:`~fastxlstm.serving.prefix_cache.block_hashes`), in an LRU of at most ``max_blocks`` hashes, each
pointing at the replica that last received a prompt with that block prefix. A lookup walks the prompt's block
hashes from the longest down (cost in proportion to the prompt's length). A hit is a hint, not a promise: the
replica's own cache decides (it may have evicted the state); a prompt shorter than one block has no affinity.

Affinity yields to load: when the replica it points at has ``slack`` (the slots of one replica) or more choices in
flight beyond the least-loaded replica, the least-loaded one gets the request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from .prefix_cache import block_hashes


class PrefixRouter:
    """Block-hash -> replica index (an LRU) and the routing rule (see the module docstring). Not thread-safe:
    the caller holds its lock."""

    def __init__(self, replicas: int, slack: int, max_blocks: int = 1 << 16):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.replicas, self.slack, self.max_blocks = replicas, slack, max_blocks
        self._owner: OrderedDict[int, int] = OrderedDict()
        self._turn = 0  # ties between equally loaded replicas go round-robin

    def __len__(self) -> int:
        return len(self._owner)

    def choose(self, hashes: Sequence[int], loads: dict[int, int]) -> tuple[int, bool]:
        """The replica for a prompt with block ``hashes`` among those in ``loads`` (index -> choices in flight;
        at least one), and whether it was picked by prefix affinity."""
        least = min(loads.values())
        for h in reversed(hashes):
            owner = self._owner.get(h)
            if owner is not None and owner in loads:
                if loads[owner] < least + self.slack:
                    return owner, True
                break  # the replica holding the longest prefix is too busy: least-loaded instead
        tied = sorted(i for i, load in loads.items() if load == least)
        pick = next((i for i in tied if i >= self._turn), tied[0])
        self._turn = (pick + 1) % self.replicas
        return pick, False

    def record(self, hashes: Sequence[int], replica: int) -> None:
        """``replica`` got a prompt with these block hashes (its cache will hold those prefixes)."""
        owner = self._owner
        for h in hashes:
            owner[h] = replica
            owner.move_to_end(h)
        while len(owner) > self.max_blocks:
            owner.popitem(last=False)

    def forget(self, replica: int) -> None:
        """``replica`` restarted with an empty cache."""
        self._owner = OrderedDict((h, r) for h, r in self._owner.items() if r != replica)


__all__ = ["PrefixRouter", "block_hashes"]
