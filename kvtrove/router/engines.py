"""The engines behind the router: which are in rotation, and how loaded each is.

An engine leaves rotation at once when a request or a check cannot connect to it, or after
`DOWN_AFTER` failed health checks in a row (timeouts, non-200 answers); a passing check brings it
back. Every change of state calls `on_change`: what the router knew of the engine's cache is stale
(after a restart it is empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx

log = logging.getLogger(__name__)

DOWN_AFTER = 2
LOAD_GAUGES = ("kvtrove_requests_waiting", "kvtrove_requests_running")


class Engine:
    def __init__(self, url: str):
        self.url = url
        self.healthy = False  # until a check passes
        self.in_flight = 0  # requests the router sent it that have not finished
        self.others = 0  # requests from other clients (waiting + running at the last check, less ours)
        self.failed_checks = 0
        self.times_out = 0  # times it left rotation
        self.last_error: str | None = None

    @property
    def load(self) -> int:
        """Requests on the engine: the router's own, counted as they come and go, and other clients' as of
        the last health check."""
        return self.in_flight + self.others

    def state(self) -> dict:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "others": self.others,
            "times_out": self.times_out,
            "last_error": self.last_error,
        }


class EngineSet:
    def __init__(self, urls: list[str], on_change: Callable[[Engine], None] = lambda engine: None):
        self.engines = [Engine(u) for u in urls]
        self.on_change = on_change

    def healthy(self) -> list[Engine]:
        return [e for e in self.engines if e.healthy]

    def mark_down(self, engine: Engine, reason: str) -> None:
        engine.last_error = reason
        if engine.healthy:
            engine.healthy = False
            engine.times_out += 1
            log.warning("engine %s out of rotation: %s", engine.url, reason)
            self.on_change(engine)

    def mark_up(self, engine: Engine) -> None:
        engine.failed_checks, engine.last_error = 0, None
        if not engine.healthy:
            engine.healthy = True
            log.info("engine %s in rotation", engine.url)
            self.on_change(engine)

    async def check(self, client: httpx.AsyncClient, engine: Engine, timeout: float) -> None:
        """One health check: GET /health, then the queue gauges from /metrics."""
        try:
            r = await client.get(engine.url + "/health", timeout=timeout)
            failure = None if r.status_code == 200 else f"/health answered {r.status_code}"
        except httpx.ConnectError as e:
            engine.failed_checks, failure = DOWN_AFTER, f"cannot connect: {e!r}"
        except httpx.HTTPError as e:
            failure = f"/health failed: {e!r}"
        if failure is None:
            if (running := await self._running(client, engine, timeout)) is not None:
                engine.others = max(0, running - engine.in_flight)
            self.mark_up(engine)
            return
        engine.failed_checks += 1
        if engine.failed_checks >= DOWN_AFTER or not engine.healthy:
            self.mark_down(engine, failure)

    async def check_all(self, client: httpx.AsyncClient, timeout: float) -> None:
        await asyncio.gather(*(self.check(client, e, timeout) for e in self.engines))

    async def poll(self, client: httpx.AsyncClient, interval: float, timeout: float) -> None:
        """Check every engine every `interval` seconds, until cancelled."""
        while True:
            try:
                await self.check_all(client, timeout)
            except Exception:  # the poller must outlive any surprise
                log.exception("health check round failed")
            await asyncio.sleep(interval)

    @staticmethod
    async def _running(client: httpx.AsyncClient, engine: Engine, timeout: float) -> int | None:
        """Waiting + running requests, from the engine's /metrics (None if it does not say)."""
        try:
            r = await client.get(engine.url + "/metrics", timeout=timeout)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        total = 0
        for line in r.text.splitlines():
            name, _, value = line.partition(" ")
            if name in LOAD_GAUGES:
                with contextlib.suppress(ValueError):
                    total += int(float(value))
        return total
