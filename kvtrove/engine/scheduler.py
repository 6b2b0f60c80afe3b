"""Continuous batching: decodes and chunked prefills share one token budget per step.

FCFS; when the pool runs out of blocks the most recently admitted request is preempted and
recomputed later (its blocks stay in the prefix cache, so recomputation is mostly a cache hit).
At admission a request reuses its longest cached prefix: device blocks first, then chunks that the
KV store loads into fresh device blocks; only the rest is prefilled. A request whose stored prefix
the pool cannot take now waits (at the head of the queue) while running requests free blocks, rather
than start recomputing it in the room one prefill chunk needs.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import wait
from dataclasses import dataclass

from kvtrove.config import SchedulerConfig
from kvtrove.engine import blend
from kvtrove.engine.kv_cache_manager import KVCacheManager
from kvtrove.engine.request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request]
    num_new_tokens: list[int]
    preempted: list[Request]

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        out = ScheduledBatch([], [], [])
        # running requests first, oldest first; preempt from the newest end when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_new_tokens.append(n)
                budget -= n
                i += 1
        if out.preempted:
            return out
        # then admit waiting requests in arrival order
        bs = self.kv.block_size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.prefetch is not None:
                if not req.prefetch.done() and out.requests:
                    break  # the store is still reading ahead for it; step the others meanwhile
                wait([req.prefetch])
                req.prefetch = None
            if req.needs_prompt_rows:  # prompt logprobs need every prompt row's logits: nothing reused
                cached, stored = [], ([], [])
            else:
                cached = self.kv.cached_prefix(req)
                stored = self.kv.load_stored(req, cached, budget)
            if stored is None and self.running:
                break  # its stored prefix needs room that running requests will free: wait, not recompute
            loaded, tiers = stored or ([], [])
            reused = cached + loaded
            rest = req.num_tokens - req.num_computed_tokens - len(reused) * bs
            n = min(rest, budget)
            starts = self.kv.find_segments(req, req.num_computed_tokens + len(reused) * bs) if req.blend else []
            if starts:  # a blended prefill runs the whole rest of the prompt in one step
                cost = math.ceil(rest * blend.compute_fraction(req.blend, self.kv.num_layers, rest, starts, bs))
                if cost > budget and any(n > 1 for n in out.num_new_tokens):
                    break  # not beside another prefill: the next step (beside decodes it may exceed the budget)
                if self.kv.allocate(req, rest, reused):
                    if self.kv.assemble(req, starts, req.blend):
                        n = rest  # (else nothing usable was loaded: an ordinary prefill in these blocks)
                elif not self.kv.allocate(req, n, reused):  # no room for the whole prompt: an ordinary prefill
                    break
            elif not self.kv.allocate(req, n, reused):
                break  # loaded blocks stay in the device cache for the next try
            self.waiting.popleft()
            req.num_reused_blocks = len(reused)
            if req.cached_by_tier is None:
                req.cached_by_tier = dict.fromkeys(("device", *self.kv.tier_names), 0)
                req.cached_by_tier["device"] = len(cached) * bs
                for tier in tiers:
                    req.cached_by_tier[tier] += bs
            req.status = Status.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_new_tokens.append(n)
            budget -= n
        return out

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.exact_until = req.blend_covered = None  # planned afresh when admitted again
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.kv.free(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
