"""What a request gives back: one RequestOutput per prompt, one CompletionOutput per sample (n)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """"stop" (EOS, stop string or stop token), "length" (max_tokens or context), "abort", or None while running."""
    logprobs: list[dict[int, float]] | None = None
    """Per generated token: token id -> logprob for the sampled token and the top-N."""
    delta_text: str = ""
    """Text added since the previous output of this request (for streaming)."""
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_tokens: int
    cached_tokens: int
    """Prompt tokens whose KV was reused instead of computed."""
    cached_tokens_by_tier: dict[str, int]
    """The same, per tier it came from: device, host, disk, ..."""
    blended_tokens: int
    """Prompt tokens whose stored KV was blended in at a new position (not exact; `kv_blend`)."""
    blend_recomputed_tokens: int
    """Prompt tokens found stored that blending recomputed anyway (they deviated most)."""
    ttft_s: float | None
    """Seconds from arrival to the first generated token."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """Per prompt token (`SamplingParams.prompt_logprobs`): token id -> logprob for it and the top-k at its
    position, None for the first token."""

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs
