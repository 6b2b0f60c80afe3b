"""Host DRAM tier: chunks as bytes in a dict, within a byte capacity."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from kvtrove.kv.eviction import Eviction
from kvtrove.kv.tiers.base import Tier, TierStats

OnEvict = Callable[[bytes, bytes, float], None]


class HostTier(Tier):
    """`on_evict(key, value, cost)` receives each evicted chunk (the store moves it down a tier)."""

    name = "host"
    trusted = True  # process memory, filled only by the store with chunks it encoded or verified

    def __init__(self, capacity_bytes: int, eviction: str = "lru", on_evict: OnEvict | None = None):
        if capacity_bytes < 0:
            raise ValueError(f"host tier capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.on_evict = on_evict
        self._data: dict[bytes, tuple[bytes, float]] = {}
        self._order = Eviction(eviction)
        self._stats = TierStats(capacity_bytes=capacity_bytes)
        self._lock = threading.Lock()

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._lock:
            out = []
            for key in keys:
                entry = self._data.get(key)
                if entry is None:
                    self._stats.misses += 1
                    out.append(None)
                    continue
                self._stats.hits += 1
                self._stats.bytes_read += len(entry[0])
                self._order.touch(key)
                out.append(entry[0])
            return out

    def put(self, items: Sequence[tuple[bytes, bytes, float]]) -> None:
        evicted = []
        with self._lock:
            for key, value, cost in items:
                if key in self._data:
                    self._order.touch(key)
                    continue
                if len(value) > self.capacity:
                    continue
                while self._stats.bytes + len(value) > self.capacity:
                    victim = self._order.victim()
                    evicted.append((victim, *self._data[victim]))
                    self._drop(victim)
                    self._stats.evictions += 1
                self._data[key] = (value, cost)
                self._order.add(key, len(value), cost)
                self._stats.bytes += len(value)
                self._stats.bytes_written += len(value)
        if self.on_evict is not None:
            for key, value, cost in evicted:
                self.on_evict(key, value, cost)

    def entries(self, keys: Sequence[bytes]) -> list[tuple[bytes, float] | None]:
        """(value, recompute cost) per key, None where absent; neither a hit nor a touch (the store's own
        housekeeping)."""
        with self._lock:
            return [self._data.get(key) for key in keys]

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._data for key in keys]

    def delete(self, keys: Sequence[bytes], rejected: bool = False) -> None:
        with self._lock:
            for key in keys:
                if key in self._data:
                    self._drop(key)
                    self._stats.rejected += rejected

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.entries = len(self._data)
            return TierStats(**self._stats.as_dict())

    def _drop(self, key: bytes) -> None:
        self._stats.bytes -= len(self._data.pop(key)[0])
        self._order.remove(key)
