"""Prometheus metrics of one server: requests, tokens, TTFT and inter-token latency, queue depth, KV
blocks in use, and what the KV cache and store saved per tier; and, under vLLM's names, the scheduling
gauges inference gateways read (`vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`, labelled by model_name)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvtrove.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvtrove_requests", "Finished requests", ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("kvtrove_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("kvtrove_generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter(
            "kvtrove_cached_prompt_tokens", "Prompt tokens reused instead of computed, by tier", ["tier"], registry=r
        )
        self.blended_tokens = Counter(
            "kvtrove_blended_prompt_tokens", "Prompt tokens whose stored KV was blended in (kv_blend)", registry=r
        )
        self.blend_recomputed_tokens = Counter(
            "kvtrove_blend_recomputed_prompt_tokens",
            "Prompt tokens found stored that blending recomputed (they deviated most)",
            registry=r,
        )
        self.ttft = Histogram(
            "kvtrove_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "kvtrove_inter_token_latency_seconds", "Time between streamed tokens", buckets=LATENCY_BUCKETS, registry=r
        )
        r.register(_EngineState(engine, model_name))

    async def track(self, stream: AsyncIterator[RequestOutput], endpoint: str) -> AsyncIterator[RequestOutput]:
        """Pass a request's outputs through, counting what it did."""
        outcome, last_t = "error", None
        try:
            async for out in stream:
                now = time.perf_counter()
                new = sum(len(c.delta_token_ids) for c in out.outputs)
                if new and last_t is not None:
                    self.itl.observe((now - last_t) / new)
                if new:
                    last_t = now
                self.generation_tokens.inc(new)
                if out.finished:
                    outcome = "aborted" if any(c.finish_reason == "abort" for c in out.outputs) else "ok"
                    self.prompt_tokens.inc(out.prompt_tokens)
                    if out.ttft_s is not None:
                        self.ttft.observe(out.ttft_s)
                    self.blended_tokens.inc(out.blended_tokens)
                    self.blend_recomputed_tokens.inc(out.blend_recomputed_tokens)
                    for tier, n in out.cached_tokens_by_tier.items():
                        self.cached_tokens.labels(tier).inc(n)
                yield out
        except (GeneratorExit, asyncio.CancelledError):  # the client went away
            outcome = "disconnected"
            raise
        finally:
            self.requests.labels(endpoint, outcome).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineState:
    """Read at scrape time from the engine (plain int reads of another thread's state)."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        eng = self.engine.engine
        sched = eng.scheduler
        pool = eng.pool
        waiting, running, in_use = len(sched.waiting), len(sched.running), pool.num_blocks - pool.num_free_blocks
        yield GaugeMetricFamily("kvtrove_requests_waiting", "Requests queued", value=waiting)
        yield GaugeMetricFamily("kvtrove_requests_running", "Requests running", value=running)
        yield GaugeMetricFamily("kvtrove_kv_blocks", "Device KV blocks", value=pool.num_blocks)
        yield GaugeMetricFamily("kvtrove_kv_blocks_in_use", "Device KV blocks held by requests", value=in_use)
        for name, doc, value in (
            ("vllm:num_requests_waiting", "Requests queued (vLLM's name)", waiting),
            ("vllm:num_requests_running", "Requests running (vLLM's name)", running),
            ("vllm:kv_cache_usage_perc", "Share of device KV blocks in use, 0-1 (vLLM's name)", in_use / pool.num_blocks),
        ):
            fam = GaugeMetricFamily(name, doc, labels=["model_name"])
            fam.add_metric([self.model_name], value)
            yield fam
        if eng.store is None:
            return
        stats = eng.store.stats()
        for name, doc in (
            ("hits", "Chunks read from the tier"),
            ("misses", "Chunks asked for and not found"),
            ("evictions", "Chunks evicted"),
            ("rejected", "Bad chunks found and deleted"),
            ("errors", "Failed calls to the tier's medium (I/O errors, pool timeouts and connection failures)"),
            ("bytes_read", "Bytes read"),
            ("bytes_written", "Bytes written"),
            ("tokens_saved", "Prompt tokens loaded instead of recomputed"),
        ):
            fam = CounterMetricFamily(f"kvtrove_store_{name}", doc, labels=["tier"])
            for tier, st in stats.items():
                fam.add_metric([tier], st[name])
            yield fam
        fam = GaugeMetricFamily("kvtrove_store_bytes", "Bytes held by the tier", labels=["tier"])
        for tier, st in stats.items():
            fam.add_metric([tier], st["bytes"])
        yield fam
