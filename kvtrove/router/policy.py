"""Routing policies: given the healthy engines, their load and how much of the request each probably holds,
pick one. Pure decisions: no I/O, no clocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Candidate:
    engine: str
    load: int  # requests on it: the router's in flight and other clients' (see Engine.load)
    matched: int = 0  # characters of the request's text it probably holds the KV of


@dataclass(frozen=True)
class Choice:
    engine: str
    reason: str  # "prefix" | "least-loaded" | "round-robin" (a metrics label)


class Policy(Protocol):
    uses_prefix: bool  # whether `choose` reads Candidate.matched (else the router keeps no index)

    def choose(self, candidates: list[Candidate], text_chars: int) -> Choice: ...


class RoundRobin:
    uses_prefix = False

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: list[Candidate], text_chars: int) -> Choice:
        self._turn += 1
        return Choice(candidates[(self._turn - 1) % len(candidates)].engine, "round-robin")


class LeastLoaded:
    """The engine with the fewest requests in flight; ties go round robin."""

    uses_prefix = False

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: list[Candidate], text_chars: int) -> Choice:
        low = min(c.load for c in candidates)
        tied = [c for c in candidates if c.load == low]
        self._turn += 1
        return Choice(tied[(self._turn - 1) % len(tied)].engine, "least-loaded")


class PrefixAware:
    """The engine holding the longest prefix of the request, if it holds at least `min_match` of the text
    and has at most `max_imbalance` more requests in flight than the least-loaded engine; otherwise the
    least-loaded engine (a new prefix then lands where there is room)."""

    uses_prefix = True

    def __init__(self, min_match: float = 0.25, max_imbalance: int = 4):
        self.min_match, self.max_imbalance = min_match, max_imbalance
        self._fallback = LeastLoaded()

    def choose(self, candidates: list[Candidate], text_chars: int) -> Choice:
        best = max(candidates, key=lambda c: (c.matched, -c.load))
        low = min(c.load for c in candidates)
        if best.matched > 0 and best.matched >= self.min_match * text_chars and best.load <= low + self.max_imbalance:
            return Choice(best.engine, "prefix")
        return self._fallback.choose(candidates, text_chars)


POLICIES = {
    "prefix": lambda min_match, max_imbalance: PrefixAware(min_match, max_imbalance),
    "round-robin": lambda *_: RoundRobin(),
    "least-loaded": lambda *_: LeastLoaded(),
}


def make_policy(name: str, min_match: float = 0.25, max_imbalance: int = 4) -> Policy:
    return POLICIES[name](min_match, max_imbalance)
