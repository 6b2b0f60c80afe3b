"""kvtrove: an LLM inference engine that never computes the same KV twice."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtrove.llm import LLM
    from kvtrove.outputs import CompletionOutput, RequestOutput
    from kvtrove.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

_HOMES = {"LLM": "kvtrove.llm", "CompletionOutput": "kvtrove.outputs", "RequestOutput": "kvtrove.outputs"}
_HOMES["SamplingParams"] = "kvtrove.sampling_params"


def __getattr__(name: str):
    """Load the engine (and torch) on first use, so that `kvtrove router` and `kvtrove cache` start light."""
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'kvtrove' has no attribute {name!r}")
