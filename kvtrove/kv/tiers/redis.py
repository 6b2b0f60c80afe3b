"""A Redis-protocol pool as a KV tier: Valkey, Redis, or a Redis Cluster for size.

The URL carries the rest: `redis://[:password@]host:port/db`, `rediss://` for TLS (certificate
options as redis-py's URL query parameters), `redis+cluster://host:port` for a cluster (any node;
the client learns the others). Each call is one pipelined round trip per batch (GET / SET NX /
EXISTS / DEL per key; a cluster pipeline splits by node). Writes set whole values, so a reader
sees a chunk or none. The server's own memory policy evicts (run it with `maxmemory` and
`maxmemory-policy allkeys-lru`); this tier keeps no index of what the pool holds.
"""

from __future__ import annotations

import threading

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from kvtrove.kv.tiers.remote import RemoteTier


class RedisTier(RemoteTier):
    name = "redis"
    retryable = (redis.ConnectionError,)

    def __init__(self, url: str, namespace: str, fingerprint: bytes, timeout_s: float, cooldown_s: float):
        super().__init__(url, namespace, fingerprint, timeout_s, cooldown_s)
        self._url = url
        self._client: redis.Redis | RedisCluster | None = None
        self._connecting = threading.Lock()

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """Made on first use (a cluster client asks the nodes for the slot map, which fails while they are
        down; a later call tries again)."""
        with self._connecting:
            if self._client is None:
                # our own retry policy (RemoteTier._call) bounds the wait; redis-py's would retry on its own
                options = dict(socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s)
                options["retry"] = Retry(NoBackoff(), 0)
                if "+cluster://" in self._url:
                    self._client = RedisCluster.from_url(self._url.replace("+cluster", "", 1), **options)
                else:
                    self._client = redis.Redis.from_url(self._url, **options)
        return self._client

    def _get(self, keys: list[bytes]) -> list[bytes | None]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return pipe.execute()

    def _put(self, items: list[tuple[bytes, bytes]]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value, nx=True)
        return [bool(ok) for ok in pipe.execute()]

    def _exists(self, keys: list[bytes]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [bool(n) for n in pipe.execute()]

    def _delete(self, keys: list[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)
        pipe.execute()

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
