"""Local disk tier: one file per chunk in a directory, within a byte capacity; survives restarts.

Layout: `<dir>/<first 2 hex of key>/<key hex>.kvc`. Writes go to a temp file in the same folder and
are renamed into place (atomic on POSIX), so a reader — this process or another engine sharing the
directory — sees a whole chunk or none. The index (sizes, LRU order) is rebuilt from the directory
at start and learns files other engines add when it meets them. A failing directory (full,
read-only, removed) logs one warning and switches the tier off for a cool-down, then it retries
(recreating the directory); no call raises.
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvtrove.kv.eviction import Eviction
from kvtrove.kv.tiers.base import Tier, TierStats
from kvtrove.kv.tiers.breaker import Breaker

SUFFIX = ".kvc"
PARALLEL_READS = 4
READ_AHEAD = 8
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _readers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(PARALLEL_READS, thread_name_prefix="kvtrove-disk-read")
        return _pool


def _read(path: Path) -> bytes | OSError:
    try:
        return path.read_bytes()
    except OSError as e:
        return e


class DiskTier(Tier):
    name = "disk"

    def __init__(self, directory: str | os.PathLike, capacity_bytes: int, eviction: str = "lru", cooldown_s=30.0):
        if capacity_bytes < 0:
            raise ValueError(f"disk tier capacity must be >= 0 bytes, got {capacity_bytes}")
        self.root = Path(directory).expanduser()
        self.capacity = capacity_bytes
        self.breaker = Breaker(f"KV disk tier {self.root}", cooldown_s)
        self._sizes: dict[bytes, int] = {}
        self._bytes = 0
        self._order = Eviction(eviction)
        self._stats = TierStats(capacity_bytes=capacity_bytes)
        self._lock = threading.Lock()
        with self._lock:
            self._guard("open", self._scan)

    # ---- Tier -----------------------------------------------------------------------------------

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return list(self.stream(keys))

    def stream(self, keys: Sequence[bytes]) -> Iterator[bytes | None]:
        """Reads keep READ_AHEAD files in flight (one at a time leaves most of an SSD idle) while the
        caller checks the chunks already read; closing the iterator early cancels the rest."""
        with self._lock:
            on = self._on()
            if not on:
                self._stats.misses += len(keys)
        if not on:
            yield from [None] * len(keys)
            return
        pool, pending = _readers(), deque()
        todo = iter(keys)
        try:
            for key in itertools.islice(todo, READ_AHEAD):
                pending.append((key, pool.submit(_read, self._path(key))))
            for i in range(len(keys)):
                key, fut = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(_read, self._path(nxt))))
                data = fut.result()
                with self._lock:
                    if isinstance(data, FileNotFoundError):
                        self._forget(key)
                        self._stats.misses += 1
                        data = None
                    elif isinstance(data, OSError):
                        self._fail("read", data)
                        self._stats.misses += len(keys) - i
                        break
                    else:
                        self._stats.hits += 1
                        self._stats.bytes_read += len(data)
                        self._know(key, len(data))
                        self._order.touch(key)
                yield data
            else:
                return
            yield from [None] * (len(keys) - i)
        finally:
            for _, fut in pending:
                fut.cancel()

    def put(self, items: Sequence[tuple[bytes, bytes, float]]) -> None:
        with self._lock:
            if not self._on():
                return
            for key, value, cost in items:
                if len(value) <= self.capacity and not self._guard("write", self._write, key, value, cost):
                    break  # the tier is off for its cool-down

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            if not self._on():
                return [False] * len(keys)
            return [self._present(key) for key in keys]

    def delete(self, keys: Sequence[bytes], rejected: bool = False) -> None:
        with self._lock:
            for key in keys:
                self._unlink(key)
                self._stats.rejected += rejected

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.entries = len(self._sizes)
            self._stats.bytes = self._bytes
            return TierStats(**self._stats.as_dict())

    def clear(self) -> None:
        """Delete every stored chunk (other engines' too: the directory is shared)."""
        with self._lock:
            self._guard("clear", self._scan)
            for key in list(self._sizes):
                self._unlink(key)

    # ---- internals (called with the lock held) ---------------------------------------------------

    def _path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / (h + SUFFIX)

    def _scan(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        found = []
        for sub in self.root.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for f in sub.iterdir():
                if f.suffix != SUFFIX:
                    continue
                try:
                    st = f.stat()
                    found.append((st.st_mtime, bytes.fromhex(f.stem), st.st_size))
                except (OSError, ValueError):
                    continue
        for _, key, size in sorted(found):  # oldest first: the LRU order survives a restart
            self._know(key, size)

    def _write(self, key: bytes, value: bytes, cost: float) -> None:
        path = self._path(key)
        if self._present(key):
            self._order.touch(key)
            return
        while self._bytes + len(value) > self.capacity:
            victim = self._order.victim()
            if victim is None:
                break
            self._unlink(victim)
            self._stats.evictions += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(value)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._sizes[key] = len(value)
        self._bytes += len(value)
        self._order.add(key, len(value), cost)
        self._stats.bytes_written += len(value)

    def _present(self, key: bytes) -> bool:
        """Whether the file is there (the index alone can be stale: other engines evict, directories
        get removed); brings the index in line."""
        try:
            size = self._path(key).stat().st_size
        except FileNotFoundError:
            self._forget(key)
            return False
        except OSError as e:
            self._fail("stat", e)
            return False
        self._know(key, size)
        return True

    def _know(self, key: bytes, size: int) -> None:
        if key not in self._sizes:
            self._sizes[key] = size
            self._bytes += size
            self._order.add(key, size)

    def _forget(self, key: bytes) -> None:
        self._bytes -= self._sizes.pop(key, 0)
        self._order.remove(key)

    def _unlink(self, key: bytes) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            self._fail("delete", e)
        self._forget(key)

    def _on(self) -> bool:
        if not self.breaker.is_open:
            return True
        if self.breaker.allow() and self._guard("reopen", self._scan):
            self.breaker.succeeded()
            return True
        return False

    def _guard(self, what: str, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except OSError as e:
            self._fail(what, e)
            return False

    def _fail(self, what: str, e: OSError) -> None:
        self.breaker.failed(what, e)
        self._stats.errors += 1
