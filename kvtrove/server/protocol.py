"""OpenAI request bodies (validated with pydantic) and how they map onto SamplingParams.

Fields OpenAI defines that kvtrove does not implement (tools, logit_bias, echo, best_of > n, ...)
are refused with a 400 naming them, rather than silently ignored.
"""

from __future__ import annotations

import dataclasses

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvtrove.sampling_params import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # kvtrove (and vLLM) extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    kv_blend: bool | None = None
    kv_blend_ratio: float | None = None
    kv_blend_check_layer: int | None = None
    kv_blend_head_tokens: int | None = None
    cache_salt: str | None = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ()

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        bad = [k for k in self.UNSUPPORTED if extra.get(k) not in (None, False, [], {}, "text", {"type": "text"})]
        if bad:
            raise ValueError(f"unsupported parameter(s): {', '.join(sorted(bad))}")

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        self.refuse_unsupported()
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            kv_blend=self.kv_blend,
            kv_blend_ratio=self.kv_blend_ratio,
            kv_blend_check_layer=self.kv_blend_check_layer,
            kv_blend_head_tokens=self.kv_blend_head_tokens,
            cache_salt=self.cache_salt,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    segments: list[str | list[int]] | None = None
    """kvtrove extension: the prompt as segments (strings or token-id lists), each a unit of blending."""
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    """Return the prompt before the completion (and, with logprobs, its tokens' logprobs; max_tokens 0:
    the prompt alone)."""
    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("suffix", "logit_bias", "best_of")

    def completion_sampling(self) -> SamplingParams:
        """The request's sampling; with echo, prompt logprobs too and max_tokens 0 run as 1 (the token is
        dropped from the answer)."""
        if not self.echo:
            return self.sampling(self.max_tokens, self.logprobs)
        max_tokens = 1 if self.max_tokens == 0 else self.max_tokens
        params = self.sampling(max_tokens, self.logprobs)
        return dataclasses.replace(params, prompt_logprobs=self.logprobs)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt is an empty list")
        return v

    def prompts(self) -> list[str | dict]:
        if (self.prompt is None) == (self.segments is None):
            raise ValueError("give either prompt or segments")
        if self.segments is not None:
            return [{"segments": self.segments}]
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": list(p)}]
        return [x if isinstance(x, str) else {"prompt_token_ids": list(x)} for x in p]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "logit_bias",
        "response_format",
        "audio",
    )

    def chat_messages(self) -> list[dict]:
        """Messages for the chat template; content-part lists stay lists (each part is a segment)."""
        return [
            {
                "role": "system" if m.role == "developer" else m.role,
                "content": [p.model_dump() for p in m.content] if isinstance(m.content, list) else m.text(),
            }
            for m in self.messages
        ]

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): a prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def chat_messages(self) -> list[dict]:
        return ChatCompletionRequest(model="", messages=self.messages).chat_messages()


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
