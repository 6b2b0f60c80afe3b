"""The tier policy: where stored KV chunks are looked up, loaded from, written to, and moved on eviction.

Tiers are ordered fastest first (host DRAM, then disk, later remote pools). A lookup takes the
longest consecutive run of keys across the tiers (a chunk may sit in any of them); each chunk is
decoded and verified (`kv.format`) before use, and a bad one is deleted from its tier, counted, and
ends the run, so the rest is recomputed. Hits from a slower tier are copied into the faster ones.
New chunks are written by one background thread: the caller never waits for a write. A chunk that
a tier evicts moves to the next tier instead of being lost.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvtrove.kv.format import ChunkError, ChunkHeader, decode, encode
from kvtrove.kv.tiers.base import Tier
from kvtrove.kv.tiers.host import HostTier

log = logging.getLogger(__name__)


@dataclass
class LoadedChunk:
    header: ChunkHeader
    kv: torch.Tensor
    """[layers, 2, KV heads, tokens, head dim]"""
    tier: str


class KVStore:
    def __init__(self, tiers: Sequence[Tier], fingerprint: bytes, dtype: torch.dtype):
        self.tiers = list(tiers)
        self.fingerprint, self.dtype = fingerprint, dtype
        self.rejected: Counter[str] = Counter()
        """Bad chunks found on load, by reason (checksum, truncated, foreign, key, ...)."""
        for upper, lower in zip(self.tiers, self.tiers[1:]):
            if isinstance(upper, HostTier):
                upper.on_evict = self._demoter(lower)
        self._jobs: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="kvtrove-kv-writer", daemon=True)
        self._writer.start()

    # ---- reads (the caller's thread) --------------------------------------------------------------

    def load(self, keys: Sequence[bytes]) -> list[LoadedChunk]:
        """The chunks of the longest run of `keys`, from the first, that the tiers hold and that verify."""
        out: list[LoadedChunk] = []
        while len(out) < len(keys):
            rest = keys[len(out) :]
            for tier in self.tiers:
                n = tier.prefix_hits(rest)
                if n:
                    break
            else:
                return out
            got = self._verified(tier, rest[:n])
            out.extend(chunk for chunk, _ in got)
            faster = self.tiers[: self.tiers.index(tier)]
            if got and faster:  # keep the hit in the faster tiers too
                self._jobs.put(("promote", faster, [(c.header.key, data, 0.0) for c, data in got]))
            if len(got) < n:  # a bad or vanished chunk ends the run
                return out
        return out

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        found = [False] * len(keys)
        for tier in self.tiers:
            for i, present in enumerate(tier.exists(keys)):
                found[i] = found[i] or present
        return found

    # ---- writes (queued; one background thread) ----------------------------------------------------

    def save(self, chunks: Sequence[tuple[ChunkHeader, torch.Tensor, float]]) -> None:
        """Queue (header, kv, recompute cost) chunks for storing; returns at once. `kv` must not change
        afterwards (pass a copy of device blocks)."""
        if chunks and self.tiers:
            self._jobs.put(("save", list(chunks)))

    def flush(self) -> None:
        """Wait until every queued write is done."""
        self._jobs.join()

    def close(self) -> None:
        self.flush()
        self._jobs.put(None)
        self._writer.join(timeout=10)

    def stats(self) -> dict[str, dict[str, int]]:
        return {tier.name: tier.stats().as_dict() for tier in self.tiers}

    # ---- internals ---------------------------------------------------------------------------------

    def _verified(self, tier: Tier, keys: Sequence[bytes]) -> list[tuple[LoadedChunk, bytes]]:
        out = []
        for key, data in zip(keys, tier.get(keys)):
            if data is None:  # deleted since `exists` (another engine evicted it)
                break
            try:
                header, kv = decode(data, key, self.fingerprint, self.dtype)
            except ChunkError as e:
                log.warning("dropping a bad KV chunk %s from the %s tier: %s", key.hex(), tier.name, e)
                tier.delete([key], rejected=True)
                self.rejected[e.reason] += 1
                break
            out.append((LoadedChunk(header, kv, tier.name), data))
        return out

    def _demoter(self, lower: Tier):
        def demote(key: bytes, value: bytes, cost: float) -> None:
            self._jobs.put(("put", lower, [(key, value, cost)]))

        return demote

    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                self._run(job)
            except Exception:  # a write must never take the engine down
                log.exception("KV store write failed")
            finally:
                self._jobs.task_done()

    def _run(self, job) -> None:
        kind = job[0]
        if kind == "put":
            _, tier, items = job
            tier.put(items)
        elif kind == "save":
            chunks = job[1]
            present = self.contains([h.key for h, _, _ in chunks])
            items = [(h.key, encode(h, kv), cost) for (h, kv, cost), p in zip(chunks, present) if not p]
            if items:
                self.tiers[0].put(items)
        elif kind == "promote":
            _, tiers, items = job
            for tier in tiers:
                tier.put(items)
