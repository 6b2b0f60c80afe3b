"""Attention over a paged KV cache.

Legend: T = tokens in the step, B = decoding sequences, H = query heads, K = KV heads,
D = head dim, S = KV slots in the pool (blocks * block size), L = context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillSeq:
    start: int
    """Offset of this sequence's new tokens in the step's token list."""
    length: int
    """New tokens computed this step."""
    context_slots: torch.Tensor | None
    """[L] KV slots of the whole context, new tokens included; None when nothing precedes the new tokens."""
    mask: torch.Tensor | None
    """[length, L] True where attention is allowed; None means plain causal over the new tokens."""


@dataclass
class AttentionMetadata:
    """What one engine step's attention needs; built once per step by the runner, read by every layer."""

    slot_mapping: torch.Tensor
    """[T] KV slot each new token writes to."""
    num_decodes: int
    """The first `num_decodes` tokens are single-token decodes, batched together."""
    decode_slots: torch.Tensor | None
    """[B, L] KV slots of each decode's context, padded."""
    decode_mask: torch.Tensor | None
    """[B, 1, 1, L] True where attention is allowed; None when no padding or window applies."""
    prefills: list[PrefillSeq]


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.kv_cache: torch.Tensor | None = None  # [2, S, K, D], bound by the runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q [T, H, D], k/v [T, K, D] -> [T, H * D]
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            qd = q[:nd].unsqueeze(2)  # [B, H, 1, D]
            kd = k_cache[meta.decode_slots].transpose(1, 2)  # [B, K, L, D]
            vd = v_cache[meta.decode_slots].transpose(1, 2)
            out[:nd] = self._sdpa(qd, kd, vd, meta.decode_mask, False).squeeze(2)
        for p in meta.prefills:
            qp = q[p.start : p.start + p.length].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if p.context_slots is None:
                kp = k[p.start : p.start + p.length].transpose(0, 1).unsqueeze(0)
                vp = v[p.start : p.start + p.length].transpose(0, 1).unsqueeze(0)
            else:
                kp = k_cache[p.context_slots].transpose(0, 1).unsqueeze(0)  # [1, K, L, D]
                vp = v_cache[p.context_slots].transpose(0, 1).unsqueeze(0)
            mask = None if p.mask is None else p.mask[None, None]
            out[p.start : p.start + p.length] = self._sdpa(qp, kp, vp, mask, p.mask is None)[0].transpose(0, 1)
        return out.flatten(1)

    def _sdpa(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
