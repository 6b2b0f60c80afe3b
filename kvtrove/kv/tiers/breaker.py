"""A circuit breaker for a tier that can fail (a full disk, a pool that is down or frozen).

The first failure opens it: the tier is skipped (its reads miss, its writes are dropped) for a
cool-down, with one warning. After the cool-down the next call is a trial; success closes the
breaker (with a log line), failure opens it again for another cool-down. Skipping at once, instead
of after several failures, is what bounds the delay a broken tier adds to requests.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class Breaker:
    def __init__(self, what: str, cooldown_s: float):
        if cooldown_s < 0:
            raise ValueError(f"cool-down must be >= 0 s, got {cooldown_s}")
        self.what, self.cooldown_s = what, cooldown_s
        self.trips = 0
        """Times it opened."""
        self.failures = 0
        """Failed calls."""
        self._failed_at: float | None = None
        """When the last failure happened while open; None when closed."""
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._failed_at is not None

    def allow(self) -> bool:
        """Whether to call the tier now: closed, or open with its cool-down over (a trial call)."""
        with self._lock:
            return self._failed_at is None or time.monotonic() >= self._failed_at + self.cooldown_s

    def failed(self, op: str, error: BaseException | str) -> None:
        with self._lock:
            self.failures += 1
            if self._failed_at is None:
                self.trips += 1
                log.warning("%s failed at %s (%s); off for %g s, then retried", self.what, op, error, self.cooldown_s)
            self._failed_at = time.monotonic()

    def succeeded(self) -> None:
        with self._lock:
            if self._failed_at is not None:
                log.warning("%s is back", self.what)
            self._failed_at = None
