"""Which stored chunk a full tier gives up first.

- `lru`: the least recently used.
- `cost`: the one whose recomputation is cheapest per byte, least recently used among equals. A
  chunk's cost is what the store says it is (prefill time of its tokens at their depth: a chunk deep
  in a long prompt attends over more context and costs more to recompute than one near the start).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict

POLICIES = ("lru", "cost")


class Eviction:
    """Orders a tier's entries; `victim()` names the next to evict. Not thread-safe (tiers lock)."""

    def __init__(self, policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"eviction policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self._lru: OrderedDict[bytes, None] = OrderedDict()
        self._heap: list[tuple[float, int, bytes]] = []  # (cost per byte, tick, key); stale items skipped
        self._score: dict[bytes, tuple[float, int]] = {}
        self._tick = itertools.count()

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: bytes) -> bool:
        return key in self._lru

    def add(self, key: bytes, size: int, cost: float = 0.0) -> None:
        self._lru[key] = None
        self._lru.move_to_end(key)
        if self.policy == "cost":
            self._push(key, cost / max(size, 1))

    def touch(self, key: bytes) -> None:
        if key not in self._lru:
            return
        self._lru.move_to_end(key)
        if self.policy == "cost":
            self._push(key, self._score[key][0])

    def remove(self, key: bytes) -> None:
        self._lru.pop(key, None)
        self._score.pop(key, None)

    def victim(self) -> bytes | None:
        if self.policy == "lru":
            return next(iter(self._lru), None)
        while self._heap:
            per_byte, tick, key = self._heap[0]
            if self._score.get(key) == (per_byte, tick):
                return key
            heapq.heappop(self._heap)  # superseded by a later touch, or removed
        return None

    def _push(self, key: bytes, per_byte: float) -> None:
        score = (per_byte, next(self._tick))
        self._score[key] = score
        heapq.heappush(self._heap, (*score, key))
        if len(self._heap) > 4 * len(self._score) + 64:  # drop stale entries now and then
            self._heap = [(s, t, k) for s, t, k in self._heap if self._score.get(k) == (s, t)]
            heapq.heapify(self._heap)
