"""Attention over a paged KV cache.

Legend: T = tokens in the step, B = decoding sequences, H = query heads, K = KV heads,
D = head dim, S = KV slots in the pool (blocks * block size), L = context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvtrove.layers.rotary import apply_rotary


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
    positions: torch.Tensor | None = None
    """[length] positions of the new tokens when they are not the last `length` of the context (a blended
    step's selection; ascending); `mask` then says the same for the torch path."""


@dataclass
class AttentionMetadata:
    """What one engine step's attention needs; built once per step by the runner, read by every layer."""

    slot_mapping: torch.Tensor
    """[T] KV slot each new token writes to."""
    num_decodes: int
    """The first `num_decodes` tokens are single-token decodes, batched together."""
    decode_slots: torch.Tensor | None
    """[B, L] KV slots of each decode's context, padded."""
    decode_lens: torch.Tensor | None
    """[B] context length of each decode (new token included)."""
    decode_mask: torch.Tensor | None
    """[B, L] True where attention is NOT allowed (padding, outside the window); None when nothing is masked."""
    prefills: list[PrefillSeq]
    blend: object | None = None
    """A blended prefill (`engine.blend.BlendStep`): from its `select_at` layer on, the model runs only the
    tokens it selects."""


class PagedAttention(nn.Module):
    """RoPE, the KV cache write and attention over the paged cache: the first two fuse into one kernel."""

    kernels = None  # kvtrove's C++ CPU kernels, bound by `use_cpu_kernels`

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window = sliding_window
        self.cache_layout = (2, num_kv_heads, head_dim)
        """Per token: k and v, each [K, D]."""
        self.rope_dims = slice(0, head_dim)
        """The numbers of a cached key (part 0) that RoPE rotated, in rotate-half layout."""
        self.context_flops = 4 * num_heads * head_dim
        """FLOPs per new token per earlier token attended to (QK^T and PV)."""
        self.kv_cache: torch.Tensor | None = None  # [2, K, S, D], bound by the runner

    def forward(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """qkv [T, (H + 2K) * D] (projected, not yet rotated); cos/sin [T, D] -> [T, H * D]."""
        q, k, v = self._rotate_and_store(qkv, cos, sin, meta)
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        nd = meta.num_decodes
        if not meta.prefills:
            return self._decode(q, k_cache, v_cache, meta).flatten(1)
        out = torch.empty(q.shape, dtype=q.dtype)
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta)
        for p in meta.prefills:
            qp = q[p.start : p.start + p.length]  # [n, H, D]
            if p.context_slots is None:
                kp, vp = k[p.start : p.start + p.length], v[p.start : p.start + p.length]  # [n, K, D]
            else:  # the whole cache seen slot-major, [S, K, D]; the context is its rows p.context_slots
                kp, vp = k_cache.transpose(0, 1), v_cache.transpose(0, 1)
            out[p.start : p.start + p.length] = self._prefill(qp, kp, vp, p.mask, p.context_slots, p.positions)
        return out.flatten(1)

    def _rotate_and_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata):
        """q [T, H, D] and k/v [T, K, D] with RoPE applied; k and v also written to their cache slots."""
        T, H, K, D = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]  # [K, S, D]: head-major, so gathers are contiguous
        if self.kernels is not None and qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous():
            self.kernels.rope_store(qkv, cos, sin, meta.slot_mapping, k_cache, v_cache, H)
            q, k, v = qkv.view(T, H + 2 * K, D).split([H, K, K], 1)
            return q, k, v
        qk, v = qkv.view(T, H + 2 * K, D).split([H + K, K], 1)
        q, k = apply_rotary(qk, cos, sin).split([H, K], 1)
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        return q, k, v

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Single-token queries against their contexts in the paged cache."""
        B, L = meta.decode_slots.shape
        if self.kernels is not None:
            return self.kernels.paged_decode(
                q, k_cache, v_cache, meta.decode_slots, meta.decode_lens, self.scale, self.sliding_window or 0
            )
        # torch ops: gather each context, then two batched matmuls
        K, G, D = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        slots = meta.decode_slots.flatten()
        k = k_cache.index_select(1, slots).view(K, B, L, D)
        v = v_cache.index_select(1, slots).view(K, B, L, D)
        q = q.reshape(B, K, G, D).transpose(0, 1)  # [K, B, G, D]
        if q.dtype != torch.float32:  # small matmuls: float32 kernels are far faster on CPUs
            q, k, v = q.float(), k.float(), v.float()
        scores = torch.matmul(q, k.transpose(2, 3)).mul_(self.scale)  # [K, B, G, L]
        if meta.decode_mask is not None:
            scores.masked_fill_(meta.decode_mask.view(1, B, 1, L), float("-inf"))
        out = torch.matmul(scores.softmax(-1), v)  # [K, B, G, D]
        return out.transpose(0, 1).reshape(B, K * G, D).to(k_cache.dtype)

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        slots: torch.Tensor | None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [n, H, D] of the last n positions of a context of L; k/v [L, K, D], or with `slots` [L] the
        rows of k/v [S, K, D] that hold the context (the kernel reads them in place); `mask` [n, L] (None:
        plain causal) is causal within the sliding window, which the C++ kernel derives from the
        positions (the last n of L, or `positions` [n] when the new tokens are scattered). The kernel computes in float32 with the decode kernel's arithmetic (a token's output is
        the same whether it is prefilled or decoded); bf16 keys and values are widened as read, which is
        exact."""
        if self.kernels is not None and k.dtype in (torch.float32, torch.bfloat16):
            out = self.kernels.prefill_attention(q.float(), k, v, self.scale, self.sliding_window or 0, slots, positions)
            return out.to(q.dtype)
        if slots is not None:
            k, v = k.index_select(0, slots), v.index_select(0, slots)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=None if mask is None else mask[None, None],
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out[0].transpose(0, 1)
