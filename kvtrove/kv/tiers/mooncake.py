"""A Mooncake Store pool as a KV tier: `mooncake://master-host:port` (default port 50051).

The pool is the memory that its clients lend it: each engine's tier mounts a segment of its own DRAM
(`segment_mb`, default 256) and the master places every value in one of the mounted segments. What
a segment holds goes when its engine stops; for a pool that outlives the engines, run
`mooncake_client --global_segment_size=...` (the standalone store) beside the master and give the
engines `?segment_mb=0`. Query parameters: `segment_mb` (0, or at least 16), `buffer_mb` (default
64: the client's transfer buffer; a call carries at most a quarter of it, and one read of 8 chunks
must fit), `local_hostname` (the address other clients reach this one at; default: the one this host
uses to reach the master). Data moves over TCP; peers find each other by handshake (`P2PHANDSHAKE`),
so nothing but `mooncake_master` has to run.

Mooncake's semantics, and what this tier does about them:
- `get` returns b"" both for a miss and for a failure, so an empty value is looked up again with
  `batch_is_exist`: an error there is a failed call (the breaker opens), absent is a miss, and present
  but unreadable (its segment's engine died, the transfer buffer was full) is a miss counted as an
  error. An empty value is never returned as a chunk.
- `put` keeps an existing value, which is the Tier contract (same key, same content), so writes use
  `put_batch` rather than `upsert`, which would rewrite a chunk other engines may be reading; keys are
  checked first (`batch_is_exist`), so only new values are sent and counted. A full pool refuses writes
  (`NO_AVAILABLE_HANDLE`) until the master evicts; they are dropped, not errors.
- Reads and existence checks take a lease (`--default_kv_lease_ttl`, 10 s) during which a value can be
  neither evicted nor removed, so deletes force.
- Calls to the master wait 30 s by default: `MC_RPC_TIMEOUT_MS` (and the connect timeout) are set
  from `timeout_s` before the client is made; these are process-wide, so the last tier made sets them.
- The client is made at the first call, not in the constructor. Its `setup` and `close` hold the GIL
  while they wait on the master (seconds when it is down), so the first call checks that the master
  accepts a connection (within the timeout) before `setup`, and `setup` tries once
  (`MC_STORE_CLIENT_SETUP_RETRIES`, unless set): a failed try opens the breaker and a later call tries
  again. A pool that restarts empty is joined again by the client on its own.

Needs the `mooncake-transfer-engine-non-cuda` wheel (`pip install 'kvtrove[mooncake]'`; the plain
`mooncake-transfer-engine` wheel is the CUDA build and needs `libcuda.so.1`) and the system library
libibverbs1 (`apt-get install libibverbs1`), also libnuma1 and libcurl4. Without them the
constructor raises ImportError naming what is missing.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kvtrove.kv.tiers.remote import RemoteTier

log = logging.getLogger(__name__)

DEFAULT_PORT = 50051
DEFAULT_SEGMENT_MB = 256
DEFAULT_BUFFER_MB = 64
MIN_SEGMENT_MB = 16
"""Mooncake refuses smaller segments."""
SETUP_RETRIES = "1"
"""Tries to join the pool inside one `setup` (the library's default, 20, holds the GIL for ~90 s when the
master is down); the breaker retries later."""

OK, NO_AVAILABLE_HANDLE, OBJECT_NOT_FOUND, OBJECT_ALREADY_EXISTS = 0, -200, -704, -705
SYSTEM_PACKAGES = {"libibverbs.so.1": "libibverbs1", "libnuma.so.1": "libnuma1", "libcurl.so.4": "libcurl4"}


class MooncakeError(RuntimeError):
    """The store answered with an error code."""


class MooncakeUnreachable(MooncakeError, ConnectionError):
    """The master did not answer (RPC error codes), or the client has not joined the pool yet."""


def import_store() -> type:
    """`MooncakeDistributedStore`, or an ImportError that says what to install."""
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        raise ImportError(f"{install_hint(e)}: {e}") from e
    return MooncakeDistributedStore


def install_hint(error: ImportError) -> str:
    """What to install, from the error of `import mooncake.store`."""
    if isinstance(error, ModuleNotFoundError):
        return (
            "the mooncake:// KV pool needs the mooncake-transfer-engine-non-cuda wheel (pip install kvtrove[mooncake])"
        )
    missing = re.match(r"([^:\s]+\.so[.\d]*): cannot open shared object file", str(error))
    lib = missing.group(1) if missing else ""
    if lib == "libcuda.so.1" or lib.startswith("libcudart"):
        return (
            "this is the CUDA build of Mooncake, which needs an NVIDIA driver; without one install "
            "mooncake-transfer-engine-non-cuda instead of mooncake-transfer-engine"
        )
    if lib in SYSTEM_PACKAGES:
        return f"Mooncake needs the system library {SYSTEM_PACKAGES[lib]} (apt-get install {SYSTEM_PACKAGES[lib]})"
    return "Mooncake Store could not be loaded"


class MooncakeTier(RemoteTier):
    name = "mooncake"
    retryable = (MooncakeUnreachable,)

    def __init__(self, url: str, namespace: str, fingerprint: bytes, timeout_s: float, cooldown_s: float):
        super().__init__(url, namespace, fingerprint, timeout_s, cooldown_s)
        self._store_class = import_store()
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"segment_mb", "buffer_mb", "local_hostname"}
        if unknown:
            raise ValueError(f"kv_remote: unknown mooncake:// parameters {sorted(unknown)} in {self.url}")
        self.master = f"{parts.hostname}:{parts.port or DEFAULT_PORT}"
        segment_mb = _number(query, "segment_mb", DEFAULT_SEGMENT_MB)
        buffer_mb = _number(query, "buffer_mb", DEFAULT_BUFFER_MB)
        if segment_mb and segment_mb < MIN_SEGMENT_MB:
            raise ValueError(f"kv_remote: segment_mb must be 0 or >= {MIN_SEGMENT_MB}, got {segment_mb}")
        if buffer_mb < MIN_SEGMENT_MB:
            raise ValueError(f"kv_remote: buffer_mb must be >= {MIN_SEGMENT_MB}, got {buffer_mb}")
        self.segment_bytes, self.buffer_bytes = segment_mb << 20, buffer_mb << 20
        self.max_call_bytes = self.buffer_bytes // 4
        """What one call may move: the transfer buffer is shared by up to 4 concurrent calls."""
        self.local_hostname = query.get("local_hostname")
        # read by the library when the client is made
        ms = str(max(1, round(timeout_s * 1000)))
        os.environ["MC_RPC_TIMEOUT_MS"] = ms
        os.environ["MC_RPC_CONNECT_TIMEOUT_MS"] = ms
        os.environ.setdefault("MC_STORE_CLIENT_SETUP_RETRIES", SETUP_RETRIES)
        self._client: Any = None
        self._closed = False
        self._state = threading.Lock()

    # ---- the client ---------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The client, joined to the pool on first use (again after a failed try)."""
        with self._state:
            if self._client is None:
                if self._closed:
                    raise MooncakeError("tier is closed")
                self._client = self._join()
            return self._client

    def _join(self) -> Any:
        host, port = self.master.rsplit(":", 1)
        try:  # setup would hold the GIL for seconds if nothing answers
            with socket.create_connection((host, int(port)), timeout=self.timeout_s) as probe:
                local = probe.getsockname()[0]
        except OSError as e:
            raise MooncakeUnreachable(f"no Mooncake master at {self.master}: {e}") from e
        store = self._store_class()
        hostname = self.local_hostname or local
        rc = store.setup(hostname, "P2PHANDSHAKE", self.segment_bytes, self.buffer_bytes, "tcp", "", self.master)
        if rc != OK:
            raise MooncakeUnreachable(f"could not join the Mooncake pool at {self.master} (setup returned {rc})")
        return store

    # ---- RemoteTier ---------------------------------------------------------------------------------

    def _get(self, keys: list[bytes]) -> list[bytes | None]:
        client = self.client
        names = [k.decode() for k in keys]
        values = client.get_batch(names)
        empty = [i for i, v in enumerate(values) if not v]
        if empty:  # a miss or a failure: get cannot tell
            codes = client.batch_is_exist([names[i] for i in empty])
            _check("exists", [c for c in codes if c < 0])
            unreadable = sum(c == 1 for c in codes)
            if unreadable:
                log.debug("%d value(s) in %s present but unreadable; read as misses", unreadable, self.url)
                with self._lock:
                    self._stats.errors += unreadable
        return [bytes(v) if v else None for v in values]

    def _put(self, items: list[tuple[bytes, bytes]]) -> list[bool]:
        client = self.client
        names = [k.decode() for k, _ in items]
        codes = client.batch_is_exist(names)  # put_batch does not say which keys were new
        _check("exists", [c for c in codes if c < 0])
        stored = [False] * len(items)
        batch: list[int] = []
        size = 0
        for i, ((_, value), code) in enumerate(zip(items, codes)):
            if code == 1 or not value or len(value) > self.max_call_bytes:  # Mooncake refuses b""
                continue
            if size + len(value) > self.max_call_bytes:
                self._put_now(client, names, items, batch, stored)
                batch, size = [], 0
            batch.append(i)
            size += len(value)
        if batch:
            self._put_now(client, names, items, batch, stored)
        return stored

    def _put_now(
        self, client: Any, names: list[str], items: list[tuple[bytes, bytes]], batch: list[int], stored: list[bool]
    ) -> None:
        rc = client.put_batch([names[i] for i in batch], [items[i][1] for i in batch])
        if rc == NO_AVAILABLE_HANDLE:  # some may have been stored; counted as not
            log.debug("Mooncake pool %s is full; chunks not stored", self.url)
            return
        if rc not in (OK, OBJECT_ALREADY_EXISTS):
            _check("put", [rc])
        for i in batch:
            stored[i] = True

    def _exists(self, keys: list[bytes]) -> list[bool]:
        codes = self.client.batch_is_exist([k.decode() for k in keys])
        _check("exists", [c for c in codes if c < 0])
        return [c == 1 for c in codes]

    def _delete(self, keys: list[bytes]) -> None:
        codes = self.client.batch_remove([k.decode() for k in keys], True)  # force: reads hold leases
        _check("remove", [c for c in codes if c not in (OK, OBJECT_NOT_FOUND)])

    def _close(self) -> None:
        with self._state:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            self._calls.shutdown(wait=True)  # no call may still be inside the client as it closes
            client.close()  # leaves the pool: what this tier's segment held is gone


def _check(op: str, codes: list[int]) -> None:
    """Raise for error codes: RPC failures (-9xx) as unreachable (retried once), the rest as errors."""
    if not codes:
        return
    if any(-1000 < c <= -900 for c in codes):
        raise MooncakeUnreachable(f"{op}: master unreachable (codes {sorted(set(codes))})")
    raise MooncakeError(f"{op} failed with codes {sorted(set(codes))}")


def _number(query: dict[str, str], name: str, default: int) -> int:
    if name not in query:
        return default
    try:
        return int(query[name])
    except ValueError:
        raise ValueError(f"kv_remote: {name} must be a whole number of MB, got {query[name]!r}") from None
