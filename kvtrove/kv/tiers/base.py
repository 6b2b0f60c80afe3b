"""The interface every KV storage tier implements: batched, bytes in and bytes out.

Values are encoded chunks (`kv.format`); tiers store and return them as opaque bytes and never
interpret them. The store decodes what a tier returns (checksum, key, model) and tells the tier to
delete what fails.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass


@dataclass
class TierStats:
    entries: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0
    """Values refused by the store (corrupt, truncated, foreign) and deleted."""
    errors: int = 0
    """Failed calls to the medium (I/O errors, timeouts, connection failures)."""
    bytes_read: int = 0
    bytes_written: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Tier(ABC):
    name: str
    trusted = False
    """True for a tier whose bytes never leave this process and only ever come from the store's own
    encoder or from chunks it verified: the store skips the checksum on its reads (never for disk or
    pools, which other processes can write)."""

    @abstractmethod
    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The value of each key, None where absent."""

    @abstractmethod
    def put(self, items: Sequence[tuple[bytes, bytes, float]]) -> None:
        """Store (key, value, recompute cost) items, evicting as needed; a value larger than the
        whole tier is skipped. Existing keys keep their value (same key, same content)."""

    @abstractmethod
    def exists(self, keys: Sequence[bytes]) -> list[bool]: ...

    @abstractmethod
    def delete(self, keys: Sequence[bytes], rejected: bool = False) -> None:
        """Remove keys; `rejected` counts them as bad values found by the store."""

    @abstractmethod
    def stats(self) -> TierStats: ...

    def close(self) -> None:  # noqa: B027 (optional: most tiers hold nothing to release)
        """Release connections and threads (after the last call)."""

    def stream(self, keys: Sequence[bytes]) -> Iterator[bytes | None]:
        """`get` one value at a time, so the caller can use each while later ones are still being read."""
        yield from self.get(keys)

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, are all present."""
        n = 0
        for present in self.exists(keys):
            if not present:
                break
            n += 1
        return n
