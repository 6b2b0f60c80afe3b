"""The tier policy: where stored KV chunks are looked up, loaded from, written to, and moved on eviction.

Tiers are ordered fastest first (host DRAM, then disk, later remote pools). A lookup takes the
longest consecutive run of keys across the tiers (a chunk may sit in any of them); each chunk is
decoded and verified (`kv.format`) before use, and a bad one is deleted from its tier, counted, and
ends the run, so the rest is recomputed. A tier whose reads are slower than recomputing
(`kv.breakeven`) is not read. Hits from a slower tier are copied into the faster ones; `prefetch`
does that ahead of time for a queued request. Chunks are written by one background thread (the
caller never waits for a write), to every tier or to the fastest only (the engine's write policy
decides which, and when); until its write is done a queued chunk is found and loaded from the queue
itself (it is this process's own copy of device blocks), so a block evicted a step ago is never
recomputed. A chunk that the host tier evicts moves to the next tier instead of being lost, and
`sync_down` copies the host tier's chunks down while the engine is idle.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvtrove.kv.breakeven import BreakEven
from kvtrove.kv.format import ChunkError, ChunkHeader, decode, encode
from kvtrove.kv.tiers.base import Tier
from kvtrove.kv.tiers.host import HostTier

log = logging.getLogger(__name__)
Sink = Callable[[int, "LoadedChunk"], None]
MAX_ORIGINS = 1 << 16


@dataclass
class LoadedChunk:
    header: ChunkHeader
    kv: torch.Tensor
    """[layers, parts, heads, tokens, dim] (the engine's block layout)"""
    tier: str


class KVStore:
    def __init__(
        self,
        tiers: Sequence[Tier],
        fingerprint: bytes,
        dtype: torch.dtype,
        break_even: BreakEven | None = None,
        max_backlog_bytes: int = 2**30,
        shape: tuple[int, ...] | None = None,
    ):
        """`shape`: the exact shape every chunk must have (the engine's block shape); None checks only that
        the shape is well formed."""
        self.tiers = list(tiers)
        self.fingerprint, self.dtype, self.shape = fingerprint, dtype, shape
        self.break_even = break_even
        self.rejected: Counter[str] = Counter()
        """Bad chunks found on load, by reason (checksum, truncated, foreign, key, ...)."""
        self.tokens_loaded: Counter[str] = Counter()
        """Tokens served (loaded instead of recomputed), per tier."""
        self.skipped: Counter[str] = Counter()
        """Runs of chunks not read because recomputing was judged faster, per tier."""
        self.dropped_writes = 0
        """Chunks not stored because `max_backlog_bytes` of writes were already queued."""
        self._backlog = Backlog(max_backlog_bytes)
        self._down: OrderedDict[bytes, None] = OrderedDict()
        """Keys written to the host tier only, oldest first, until `sync_down` copies them lower or the
        host tier evicts them (which moves them down); the writer thread's alone."""
        self._origin: OrderedDict[bytes, str] = OrderedDict()
        """Chunks that prefetch copied up -> the tier they came from."""
        self._lock = threading.Lock()
        self._queued = Queued(self.tiers[0].name if self.tiers else "")
        self._jobs: queue.Queue = queue.Queue()
        for upper, lower in zip(self.tiers, self.tiers[1:]):
            if isinstance(upper, HostTier):
                upper.on_evict = functools.partial(_demote, self._jobs, lower, self._down)
        self._writer = threading.Thread(target=_write_loop, args=(self._jobs,), name="kvtrove-kv-writer", daemon=True)
        self._writer.start()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kvtrove-kv-prefetch")
        self._closer = weakref.finalize(self, _shut_down, self._jobs, self._writer, self._reader, self.tiers)

    # ---- reads -------------------------------------------------------------------------------------

    def find(self, keys: Sequence[bytes]) -> list[tuple[Tier, int]]:
        """Where the longest stored run of `keys`, from the first, lies: (tier, count) runs in order, each
        in the fastest tier that holds its first chunk (one lookup; `load` reads what it found)."""
        runs: list[tuple[Tier | Queued, int]] = []
        done = 0
        while done < len(keys):
            rest = keys[done:]
            for tier in (self._queued, *self.tiers):
                n = tier.prefix_hits(rest)
                if n:
                    runs.append((tier, n))
                    done += n
                    break
            else:
                break
        return runs

    def present(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether any tier (or the write queue) holds each of `keys`, in any order (one batched query per
        tier, each asked only for what the faster ones lack)."""
        found = self._queued.present(keys)
        for tier in self.tiers:
            todo = [i for i, f in enumerate(found) if not f]
            if not todo:
                break
            for i, f in zip(todo, tier.exists([keys[i] for i in todo])):
                found[i] = f
        return found

    def load(
        self,
        keys: Sequence[bytes],
        sink: Sink | None = None,
        runs: list[tuple[Tier | Queued, int]] | None = None,
        count: bool = True,
    ) -> list[LoadedChunk]:
        """The chunks of the longest run of `keys`, from the first, that the tiers hold and that verify
        (`runs`: what `find` said of these keys, not asked again).

        `sink(i, chunk)` receives each chunk as soon as it is verified (copying it while its bytes are
        still in the CPU cache). Hits from slower tiers are copied into the faster ones in the
        background. A chunk that `prefetch` brought up is reported (and counted) as coming from the
        tier it was read from. `count=False` leaves the chunks out of the tiers' tokens saved (blending
        counts what it reused itself).
        """
        out = self._load(keys, prefetching=False, sink=sink, runs=runs)
        with self._lock:
            for c in out:
                c.tier = self._origin.pop(c.header.key, c.tier)
                if count:
                    self.tokens_loaded[c.tier] += c.header.shape[3]
        return out

    def _load(
        self,
        keys: Sequence[bytes],
        prefetching: bool,
        sink: Sink | None = None,
        runs: list[tuple[Tier | Queued, int]] | None = None,
    ) -> list[LoadedChunk | None]:
        """`load`; when `prefetching`, chunks already in the fastest tier are skipped (None) instead of read."""
        out: list[LoadedChunk] = []
        plan = list(self.find(keys) if runs is None else runs)
        asked_again = False
        while plan:
            tier, n = plan.pop(0)
            rest = keys[len(out) :]
            if prefetching and tier in (self._queued, self.tiers[0]):  # nothing to copy up
                out.extend([None] * n)
                continue
            if tier is self._queued:
                got = self._queued.take(rest[:n])
                for chunk in got:
                    if sink is not None:
                        sink(len(out), chunk)
                    out.append(chunk)
                if len(got) < n:  # written since `find`: the tiers are asked once more for the rest
                    if asked_again:
                        return out
                    asked_again = True
                    plan = self.find(keys[len(out) :])
                continue
            if self.break_even is not None and not self.break_even.worth_loading(tier.name):
                self.skipped[tier.name] += 1
                return out
            got = self._verified(tier, rest[:n], sink, len(out))
            out.extend(chunk for chunk, _ in got)
            faster = self.tiers[: self.tiers.index(tier)]
            if got and faster:
                items = [(c.header.key, data, 0.0) for c, data in got]
                if prefetching:
                    with self._lock:
                        for c, _ in got:
                            self._origin[c.header.key] = tier.name
                            if len(self._origin) > MAX_ORIGINS:
                                self._origin.popitem(last=False)
                    _put_all(faster, items)
                else:
                    self._jobs.put(functools.partial(_put_all, faster, items))
            if len(got) < n:  # a bad or vanished chunk ends the run
                return out
        return out

    def prefetch(self, keys: Sequence[bytes]) -> Future | None:
        """Start copying the stored run of `keys` into the fastest tier; None if there is nothing to do."""
        if len(self.tiers) < 2 or not keys:
            return None
        return self._reader.submit(self._load, list(keys), True)

    # ---- writes (queued; one background thread) ----------------------------------------------------

    def save(self, chunks: Sequence[tuple[ChunkHeader, torch.Tensor, float]], first_tier_only: bool = False) -> None:
        """Queue (header, kv, recompute cost) chunks for storing in every tier (`first_tier_only`: in the
        fastest, whose evictions and `sync_down` move them down); returns at once. `kv` must not change
        afterwards (pass a copy of device blocks)."""
        if not chunks or not self.tiers:
            return
        nbytes = sum(kv.nbytes for _, kv, _ in chunks)
        if not self._backlog.take(nbytes):  # the tiers cannot keep up: drop rather than grow without bound
            self.dropped_writes += len(chunks)
            return
        only_first = first_tier_only and len(self.tiers) > 1
        tiers = self.tiers[:1] if only_first else self.tiers
        down = self._down if only_first and isinstance(self.tiers[0], HostTier) else None
        chunks = list(chunks)
        self._queued.add(chunks)
        self._jobs.put(functools.partial(_save, tiers, chunks, self._backlog, nbytes, down, self._queued))

    def sync_down(self, still_idle: Callable[[], bool] = lambda: True) -> None:
        """Queue copying the chunks that only the host tier holds into the tiers below, a batch at a time
        for as long as `still_idle()` holds (the engine's idle time; a later call resumes)."""
        if self.tiers and isinstance(self.tiers[0], HostTier) and len(self.tiers) > 1:
            self._jobs.put(functools.partial(_sync_down, self._down, self.tiers[0], self.tiers[1:], still_idle))

    def flush(self) -> None:
        """Wait until every queued write is done."""
        self._jobs.join()

    def close(self) -> None:
        """Finish queued writes and stop the background threads."""
        self._closer()

    def stats(self) -> dict[str, dict[str, int]]:
        out = {}
        for tier in self.tiers:
            st = tier.stats().as_dict()
            st["tokens_saved"] = self.tokens_loaded[tier.name]
            out[tier.name] = st
        return out

    # ---- internals ---------------------------------------------------------------------------------

    def _verified(
        self, tier: Tier, keys: Sequence[bytes], sink: Sink | None, start: int
    ) -> list[tuple[LoadedChunk, bytes]]:
        out = []
        t0 = time.perf_counter()
        nbytes = 0
        values = tier.stream(keys)
        try:
            for key, data in zip(keys, values):
                if data is None:  # deleted since `exists` (another engine evicted it)
                    break
                try:
                    header, kv = decode(data, key, self.fingerprint, self.dtype, self.shape, checksum=not tier.trusted)
                except ChunkError as e:
                    log.warning("dropping a bad KV chunk %s from the %s tier: %s", key.hex(), tier.name, e)
                    tier.delete([key], rejected=True)
                    self.rejected[e.reason] += 1
                    break
                nbytes += len(data)
                chunk = LoadedChunk(header, kv, tier.name)
                if sink is not None:
                    sink(start + len(out), chunk)
                out.append((chunk, data))
        finally:
            values.close()  # stops reads ahead of a bad chunk
        if self.break_even is not None:
            self.break_even.observe_read(tier.name, nbytes, time.perf_counter() - t0)
        return out


# The background writer holds the queue and the tiers, never the store, so a dropped store is collected.


def _write_loop(jobs: queue.Queue) -> None:
    while True:
        job: Callable[[], None] | None = jobs.get()
        try:
            if job is None:
                return
            job()
        except Exception:  # a write must never take the engine down
            log.exception("KV store write failed")
        finally:
            jobs.task_done()


def _shut_down(jobs: queue.Queue, writer: threading.Thread, reader: ThreadPoolExecutor, tiers: list[Tier]) -> None:
    reader.shutdown(wait=True, cancel_futures=True)
    jobs.put(None)
    writer.join(timeout=60)
    for tier in tiers:
        tier.close()


def _demote(jobs: queue.Queue, lower: Tier, down: OrderedDict, key: bytes, value: bytes, cost: float) -> None:
    down.pop(key, None)  # moving down now: nothing left for sync_down (so `down` never outgrows the host tier)
    jobs.put(functools.partial(lower.put, [(key, value, cost)]))


SYNC_BATCH = 16
"""Chunks `sync_down` copies between two checks that the engine is still idle."""


def _sync_down(down: OrderedDict, host: HostTier, lower: Sequence[Tier], still_idle: Callable[[], bool]) -> None:
    while down and still_idle():
        batch = list(itertools.islice(down, SYNC_BATCH))
        items = [(k, *entry) for k, entry in zip(batch, host.entries(batch)) if entry is not None]
        if items:  # (what the host tier evicted meanwhile has moved down already)
            _put_all(lower, items)
        for k in batch:
            down.pop(k, None)


def _put_all(tiers: Sequence[Tier], items: list[tuple[bytes, bytes, float]]) -> None:
    for tier in tiers:
        tier.put(items)


class Queued:
    """Chunks handed to `save` whose write is not done yet, readable meanwhile (thread-safe)."""

    def __init__(self, name: str):
        self.name = name
        """Reads from here count as reads from the tier the chunks are going to."""
        self._chunks: dict[bytes, tuple[ChunkHeader, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def add(self, chunks: Sequence[tuple[ChunkHeader, torch.Tensor, float]]) -> None:
        with self._lock:
            for h, kv, _ in chunks:
                self._chunks[h.key] = (h, kv)

    def discard(self, chunks: Sequence[tuple[ChunkHeader, torch.Tensor, float]]) -> None:
        with self._lock:
            for h, kv, _ in chunks:
                if self._chunks.get(h.key, (None, None))[1] is kv:  # a later save of the same key stays
                    del self._chunks[h.key]

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        with self._lock:
            n = 0
            while n < len(keys) and keys[n] in self._chunks:
                n += 1
            return n

    def present(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [key in self._chunks for key in keys]

    def take(self, keys: Sequence[bytes]) -> list[LoadedChunk]:
        """The leading run of `keys` still queued, as loaded chunks."""
        out = []
        with self._lock:
            for key in keys:
                entry = self._chunks.get(key)
                if entry is None:
                    break
                out.append(LoadedChunk(entry[0], entry[1], self.name))
        return out


class Backlog:
    """Bytes of KV queued for writing, within a bound."""

    def __init__(self, limit: int):
        self.limit, self.bytes = limit, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.bytes + n > self.limit:
                return False
            self.bytes += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.bytes -= n


def _save(
    tiers: Sequence[Tier],
    chunks: list[tuple[ChunkHeader, torch.Tensor, float]],
    backlog: Backlog,
    n: int,
    down: OrderedDict | None,
    queued: Queued,
):
    try:
        if down is not None:  # first: the host tier's evictions during the put take theirs off again
            for h, _, _ in chunks:
                down[h.key] = None
        _store_all(tiers, chunks)
    finally:
        queued.discard(chunks)
        backlog.give(n)


def _store_all(tiers: Sequence[Tier], chunks: list[tuple[ChunkHeader, torch.Tensor, float]]) -> None:
    encoded = {}
    for tier in tiers:
        todo = [c for c, present in zip(chunks, tier.exists([h.key for h, _, _ in chunks])) if not present]
        items = []
        for h, kv, cost in todo:
            if h.key not in encoded:
                encoded[h.key] = encode(h, kv)
            items.append((h.key, encoded[h.key], cost))
        if items:
            tier.put(items)
