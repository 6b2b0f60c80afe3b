"""Token sampling for a batch of rows with per-row parameters.

Legend: N = rows (sequences sampling this step), V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [N] float, 0 = greedy
    top_k: torch.Tensor | None  # [N] long, 0 = off
    top_p: torch.Tensor | None  # [N] float
    min_p: torch.Tensor | None  # [N] float
    repetition_penalty: torch.Tensor | None  # [N] float
    presence_penalty: torch.Tensor | None  # [N] float
    frequency_penalty: torch.Tensor | None  # [N] float
    seen_mask: torch.Tensor | None  # [N, V] bool, prompt or output tokens (repetition penalty)
    output_counts: torch.Tensor | None  # [N, V] float, output token counts (presence/frequency)
    generators: list[torch.Generator | None]
    num_logprobs: int | None  # the largest top-N asked for in the batch; None = no logprobs


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per row: sampled token + top-N -> logprob


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    if b.repetition_penalty is not None:
        p = b.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(b.seen_mask, penalised, logits)
    if b.frequency_penalty is not None:
        logits = logits - b.frequency_penalty[:, None] * b.output_counts
    if b.presence_penalty is not None:
        logits = logits - b.presence_penalty[:, None] * (b.output_counts > 0)
    return logits


def filter_logits(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Mask everything outside top-k, top-p and min-p with -inf."""
    if b.top_k is not None or b.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if b.top_k is not None:
            k = torch.where(b.top_k > 0, b.top_k, logits.shape[-1])
            drop |= torch.arange(logits.shape[-1])[None, :] >= k[:, None]
        if b.top_p is not None:
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
            before = probs.cumsum(-1) - probs  # probability mass strictly before each token
            drop |= before >= b.top_p[:, None]
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if b.min_p is not None:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < b.min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(logits: torch.Tensor, b: SamplingBatch) -> SampleResult:
    # logits [N, V] float32
    raw_logprobs = logits.log_softmax(-1) if b.num_logprobs is not None else None
    logits = apply_penalties(logits, b)
    greedy = b.temperature == 0
    tokens = logits.argmax(-1)
    if not bool(greedy.all()):
        temp = torch.where(greedy, torch.ones_like(b.temperature), b.temperature)
        probs = filter_logits(logits / temp[:, None], b).softmax(-1)
        noise = torch.empty_like(probs)
        for i, g in enumerate(b.generators):
            noise[i].exponential_(generator=g)
        sampled = (probs / noise).argmax(-1)  # Gumbel-style: argmax(p / Exp(1)) draws from p
        tokens = torch.where(greedy, tokens, sampled)
    token_list = tokens.tolist()
    logprobs = None
    if raw_logprobs is not None:
        chosen = raw_logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
        logprobs = []
        top = raw_logprobs.topk(b.num_logprobs, dim=-1) if b.num_logprobs else None
        for i, t in enumerate(token_list):
            d = {}
            if top is not None:
                d.update(zip(top.indices[i].tolist(), top.values[i].tolist()))
            d[t] = chosen[i]
            logprobs.append(d)
    return SampleResult(token_list, logprobs)
