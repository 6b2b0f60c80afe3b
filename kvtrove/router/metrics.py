"""Prometheus metrics of the router: requests routed per engine and reason, retries, refusals, and the
engines' state at scrape time."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvtrove.router.engines import EngineSet
from kvtrove.router.prefix_index import PrefixIndex


class RouterMetrics:
    def __init__(self, engines: EngineSet, index: PrefixIndex):
        self.registry = r = CollectorRegistry()
        self.routed = Counter(
            "kvtrove_router_requests",
            "Requests sent to an engine, by why it was chosen (prefix, least-loaded, round-robin)",
            ["engine", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "kvtrove_router_retries",
            "Requests this engine could not take (unreachable, or full: 429); each goes on to another engine",
            ["engine"],
            registry=r,
        )
        self.unavailable = Counter(
            "kvtrove_router_unavailable", "Requests refused with 503: no engine could take them", registry=r
        )
        r.register(_State(engines, index))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _State:
    def __init__(self, engines: EngineSet, index: PrefixIndex):
        self.engines, self.index = engines, index

    def collect(self):
        engines = self.engines.engines
        yield GaugeMetricFamily(
            "kvtrove_router_engines_healthy", "Engines in rotation", value=len(self.engines.healthy())
        )
        for name, doc, value in (
            ("kvtrove_router_engine_healthy", "1 if the engine is in rotation", lambda e: int(e.healthy)),
            ("kvtrove_router_in_flight", "Requests in flight from the router", lambda e: e.in_flight),
            ("kvtrove_router_engine_load", "Requests in flight plus other clients' on the engine", lambda e: e.load),
        ):
            fam = GaugeMetricFamily(name, doc, labels=["engine"])
            for e in engines:
                fam.add_metric([e.url], value(e))
            yield fam
        fam = CounterMetricFamily("kvtrove_router_engine_out", "Times the engine left rotation", labels=["engine"])
        for e in engines:
            fam.add_metric([e.url], e.times_out)
        yield fam
        yield GaugeMetricFamily("kvtrove_router_index_chunks", "Chunks in the prefix index", value=len(self.index))
