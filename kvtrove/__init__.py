"""kvtrove: an LLM inference engine that never computes the same KV twice."""

from kvtrove.llm import LLM
from kvtrove.outputs import CompletionOutput, RequestOutput
from kvtrove.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
