"""RouterConfig: everything the router needs, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from kvtrove.router.policy import POLICIES


@dataclass
class RouterConfig:
    engines: list[str]
    policy: str = "prefix"
    # prefix policy: the best-matching engine is used when it holds at least this fraction of the request's
    # text and has at most `max_imbalance` more requests in flight than the least-loaded engine
    min_match: float = 0.25
    max_imbalance: int = 4
    chunk_chars: int = 128  # prefix index unit
    index_entries: int = 1 << 20  # most chunks the prefix index remembers (least recently used go first)
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    api_key: str | None = None  # clients must send it; it is forwarded to the engines as is
    max_body_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if not self.engines:
            raise ValueError("the router needs at least one engine URL (--engine http://host:port)")
        urls = []
        for url in self.engines:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"engine URL {url!r} is not http(s)://host:port")
            urls.append(url.rstrip("/").removesuffix("/v1"))
        if len(set(urls)) != len(urls):
            raise ValueError(f"engine URLs repeat: {urls}")
        self.engines = urls
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0 <= self.min_match <= 1:
            raise ValueError(f"min_match is a fraction of the request, 0..1, got {self.min_match}")
        if self.max_imbalance < 0:
            raise ValueError(f"max_imbalance must be >= 0, got {self.max_imbalance}")
        for name in ("chunk_chars", "index_entries", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("health_interval_s", "health_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
