"""One sequence being generated: its tokens, its progress, its KV blocks."""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future

import torch

from kvtrove.engine.block_pool import Block
from kvtrove.engine.detokenizer import Detokenizer
from kvtrove.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        detokenizer: Detokenizer,
        seed: int | None,
        cache_root: bytes,
        segments: list[tuple[int, int]] | None = None,
        blend=None,
    ):
        self.request_id = request_id
        self.index = index
        """Which of the n samples of its prompt this is."""
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.detokenizer = detokenizer
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0
        self.blocks: list[Block] = []
        self.block_keys: list[bytes] = []
        """Keys of the full blocks of all_token_ids, filled lazily."""
        self.cache_root = cache_root
        """What its keys chain from: the model fingerprint, or the salted root of its cache salt (`kv.keys`)."""
        self.cached_by_tier: dict[str, int] | None = None
        """Prompt tokens reused instead of computed when first scheduled, per tier (device, host, disk, ...)."""
        self.num_reused_blocks = 0
        """Leading blocks found cached (device or store) at the last admission; the rest were computed here."""
        self.segments = segments
        """Explicit segments of the prompt, as [start, end) token ranges; None: the prompt is one text."""
        self.blend = blend
        """`engine.blend.BlendOptions` when this request blends stored KV into its prompt; None: exact."""
        self.blend_plan = None
        """The loaded KV of a blended prefill, between admission and its step (`engine.blend.BlendPlan`)."""
        self.blend_covered: torch.Tensor | None = None
        """Positions of the last blended prefill that hold loaded (not recomputed) KV."""
        self.exact_until: int | None = None
        """Positions from here on hold blended KV (never registered or stored as exact); None: all exact."""
        self.blend_counts: tuple[int, int] | None = None
        """(prompt tokens reused by blending, loaded ones recomputed anyway) of the last blended prefill."""
        self.segments_saved = False
        self.prefetch: Future | None = None
        """The store's copy of this request's stored prefix into its fastest tier, while queued."""
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, float] | None] | None = None if params.prompt_logprobs is None else [None]
        """Per prompt token so far: its logprob and the top-k at its position (None for the first)."""
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.sent_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def needs_prompt_rows(self) -> bool:
        """Whether prompt positions still need their logits computed (prompt logprobs): no cached prefix."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
