"""SamplingParams: how one request decodes; validated on construction with errors a user can act on."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtrove.config import check_blend

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    """None -> until the context or the KV cache is full."""
    temperature: float = 1.0
    """0 -> greedy."""
    top_k: int = 0
    """0 -> off."""
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    """None -> no logprobs; k -> the sampled token's logprob and the k most likely tokens'."""
    prompt_logprobs: int | None = None
    """None -> none; k -> each prompt token's logprob given the tokens before it and the k most likely
    tokens' there (the first prompt token has none). The prompt is computed whole for it: its cached
    prefix is not reused."""
    skip_special_tokens: bool = True
    kv_blend: bool | None = None
    """Blend stored KV of known text into this prompt (approximate; `CacheConfig.kv_blend`); None -> the
    engine's setting. With it, kv_blend_ratio / kv_blend_check_layer / kv_blend_head_tokens (None -> the
    engine's) tune it."""
    kv_blend_ratio: float | None = None
    kv_blend_check_layer: int | None = None
    kv_blend_head_tokens: int | None = None
    cache_salt: str | None = None
    """A tenant's secret: this request reuses only KV cached under the same salt, and its own KV is found
    only under it (`kv.keys.salted_root`)."""
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        if self.kv_blend is not None and not isinstance(self.kv_blend, bool):
            raise ValueError(f"kv_blend must be true, false or null, got {self.kv_blend!r}")
        check_blend(
            0.0 if self.kv_blend_ratio is None else self.kv_blend_ratio,
            0 if self.kv_blend_check_layer is None else self.kv_blend_check_layer,
            0 if self.kv_blend_head_tokens is None else self.kv_blend_head_tokens,
        )
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {self.cache_salt!r}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check_int("top_k", self.top_k, 0)
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name))
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None:
            _check_int("seed", self.seed, None)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0)
                if value > MAX_LOGPROBS:
                    raise ValueError(f"{name} must be <= {MAX_LOGPROBS}, got {value}")
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_strings = list(self.stop)
        else:
            raise ValueError(
                f"stop must be a string or a list of strings, got {type(self.stop).__name__}: {self.stop!r}"
            )
        if any(s == "" for s in self.stop_strings):
            raise ValueError("stop strings must not be empty")
        ids = self.stop_token_ids
        if ids is not None and (
            not isinstance(ids, (list, tuple))
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
        ):
            raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_int(name: str, value, minimum: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}: {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
