"""KV pools shared by many engines (Redis-protocol servers, Mooncake Store): what every remote tier shares.

A pool is written by other processes, so its values are untrusted (the store checks every chunk),
and it can be down, slow or frozen. Every call runs on the tier's own threads and the caller waits
at most `timeout_s` for it, whatever the client library does; a dropped connection is retried once
within that bound; any failure opens the breaker, so the pool is skipped for the cool-down and a
request pays the timeout at most once before the breaker opens. Keys are `<namespace>:<model
fingerprint>:<chunk key>`, so one pool can serve several models and deployments.

`open_remote(url, ...)` picks the tier from the URL's scheme: redis://, rediss:// (TLS),
redis+cluster://, rediss+cluster:// (Redis Cluster), mooncake:// (Mooncake Store master).
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlsplit

from kvtrove.kv.tiers.base import Tier, TierStats
from kvtrove.kv.tiers.breaker import Breaker

SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "mooncake")
STREAM_BATCH = 8
"""Chunks per read while streaming: the next batch is fetched while the caller checks this one."""
PUT_BATCH_BYTES = 32 << 20
RETRY_PAUSE_S = 0.05


def check_url(url: str) -> None:
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES or not urlsplit(url).hostname:
        raise ValueError(f"kv_remote must be a URL like redis://host:6379/0 ({', '.join(SCHEMES)}), got {url!r}")


def open_remote(url: str, namespace: str, fingerprint: bytes, timeout_s: float, cooldown_s: float) -> RemoteTier:
    """The tier for `url`; never connects here (a pool that is down at start only opens the breaker)."""
    check_url(url)
    if urlsplit(url).scheme == "mooncake":
        from kvtrove.kv.tiers.mooncake import MooncakeTier

        return MooncakeTier(url, namespace, fingerprint, timeout_s, cooldown_s)
    from kvtrove.kv.tiers.redis import RedisTier

    return RedisTier(url, namespace, fingerprint, timeout_s, cooldown_s)


def redacted(url: str) -> str:
    """`url` without its password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


class RemoteTier(Tier):
    retryable: tuple[type[BaseException], ...] = (ConnectionError,)
    """Errors worth one immediate retry (a pooled connection the server closed)."""

    def __init__(self, url: str, namespace: str, fingerprint: bytes, timeout_s: float, cooldown_s: float):
        if timeout_s <= 0:
            raise ValueError(f"remote tier timeout must be > 0 s, got {timeout_s}")
        if not namespace or any(c.isspace() or c == ":" for c in namespace):
            raise ValueError(f"remote tier namespace must be a word without ':' or spaces, got {namespace!r}")
        self.url = redacted(url)
        self.prefix = f"{namespace}:{fingerprint.hex()[:32]}:".encode()
        self.timeout_s = timeout_s
        self.breaker = Breaker(f"KV pool {self.url}", cooldown_s)
        self._stats = TierStats()
        self._lock = threading.Lock()
        self._calls = ThreadPoolExecutor(4, thread_name_prefix=f"kvtrove-{self.name}")
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix=f"kvtrove-{self.name}-ahead")

    # ---- what each pool implements, on full keys; may block and raise ------------------------------

    @abstractmethod
    def _get(self, keys: list[bytes]) -> list[bytes | None]: ...

    @abstractmethod
    def _put(self, items: list[tuple[bytes, bytes]]) -> list[bool] | None:
        """Store values under keys that do not exist yet (an existing key keeps its value); which were
        stored, or None when the pool does not say."""

    @abstractmethod
    def _exists(self, keys: list[bytes]) -> list[bool]: ...

    @abstractmethod
    def _delete(self, keys: list[bytes]) -> None: ...

    def _close(self) -> None:
        """Release the client's connections."""

    # ---- Tier ---------------------------------------------------------------------------------------

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        values = self._call("get", self._get, self._keys(keys), default=[None] * len(keys))
        with self._lock:
            for v in values:
                if v is None:
                    self._stats.misses += 1
                else:
                    self._stats.hits += 1
                    self._stats.bytes_read += len(v)
        return values

    def stream(self, keys: Sequence[bytes]) -> Iterator[bytes | None]:
        batches = [keys[i : i + STREAM_BATCH] for i in range(0, len(keys), STREAM_BATCH)]
        if not batches:
            return
        ahead = self._ahead.submit(self.get, batches[0])
        for i in range(len(batches)):
            values = ahead.result()
            if i + 1 < len(batches):
                ahead = self._ahead.submit(self.get, batches[i + 1])
            yield from values

    def put(self, items: Sequence[tuple[bytes, bytes, float]]) -> None:
        batch, size = [], 0
        for key, value, _ in items:
            batch.append((key, value))
            size += len(value)
            if size >= PUT_BATCH_BYTES:
                self._put_batch(batch)
                batch, size = [], 0
        if batch:
            self._put_batch(batch)

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return self._call("exists", self._exists, self._keys(keys), default=[False] * len(keys))

    def delete(self, keys: Sequence[bytes], rejected: bool = False) -> None:
        self._call("delete", self._delete, self._keys(keys), default=None)
        if rejected:
            with self._lock:
                self._stats.rejected += len(keys)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(**self._stats.as_dict())

    def close(self) -> None:
        self._ahead.shutdown(wait=False, cancel_futures=True)
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._close()

    # ---- internals ----------------------------------------------------------------------------------

    def _keys(self, keys: Sequence[bytes]) -> list[bytes]:
        return [self.prefix + key.hex().encode() for key in keys]

    def _put_batch(self, batch: list[tuple[bytes, bytes]]) -> None:
        full = self._keys([k for k, _ in batch])
        stored = self._call("put", self._put, list(zip(full, (v for _, v in batch))), default=False)
        if stored is False:
            return
        with self._lock:
            self._stats.bytes_written += sum(len(v) for (_, v), new in zip(batch, stored or [True] * len(batch)) if new)

    def _call(self, op: str, fn, *args, default):
        """`fn(*args)` within the timeout (one retry of a dropped connection inside it); `default` when the
        breaker is open or the call fails, which opens it."""
        if not self.breaker.allow():
            return default
        deadline = time.monotonic() + self.timeout_s
        retried = False
        while True:
            try:
                out = self._calls.submit(fn, *args).result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                error: BaseException = TimeoutError(f"no answer within {self.timeout_s:g} s")
            except self.retryable as e:
                if not retried and time.monotonic() + RETRY_PAUSE_S < deadline:
                    retried = True
                    time.sleep(RETRY_PAUSE_S)
                    continue
                error = e
            except Exception as e:  # a pool must never fail a request
                error = e
            else:
                self.breaker.succeeded()
                return out
            with self._lock:
                self._stats.errors += 1
            self.breaker.failed(op, error)
            return default
