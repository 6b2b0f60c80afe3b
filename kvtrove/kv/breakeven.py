"""When loading a stored chunk beats recomputing it.

Loading n tokens from a tier takes n * bytes_per_token / bandwidth; recomputing them takes
n / prefill_rate. Both are learned online: each tier read reports (bytes, seconds), each prefill
step reports (tokens, seconds); moving averages smooth them. Until a figure is known, loading is
assumed to win. A tier judged too slow is re-probed now and then so that a tier which speeds up
(a pool that was congested, a disk whose page cache warmed) is used again.
"""

from __future__ import annotations

import threading
import time

SMOOTHING = 0.3
REPROBE_S = 30.0
MIN_READ_BYTES = 1 << 20  # tiny reads measure latency, not bandwidth


class BreakEven:
    def __init__(self, bytes_per_token: int):
        self.bytes_per_token = bytes_per_token
        self.bandwidth: dict[str, float] = {}
        """Bytes/s per tier."""
        self.prefill_rate: float | None = None
        """Tokens/s of prefill."""
        self._probed: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe_read(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes < MIN_READ_BYTES or seconds <= 0:
            return
        with self._lock:
            self.bandwidth[tier] = _smooth(self.bandwidth.get(tier), nbytes / seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens < 1 or seconds <= 0:
            return
        with self._lock:
            self.prefill_rate = _smooth(self.prefill_rate, tokens / seconds)

    def load_rate(self, tier: str) -> float | None:
        """Tokens/s this tier delivers, if measured."""
        bw = self.bandwidth.get(tier)
        return None if bw is None else bw / self.bytes_per_token

    def worth_loading(self, tier: str) -> bool:
        with self._lock:
            rate = self.load_rate(tier)
            if rate is None or self.prefill_rate is None or rate > self.prefill_rate:
                return True
            now = time.monotonic()
            if now - self._probed.get(tier, 0.0) > REPROBE_S:
                self._probed[tier] = now
                return True
            return False


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new
