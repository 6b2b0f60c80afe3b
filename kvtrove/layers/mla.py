"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of compressed latents.

Each token caches one row shared by every head: its normalized KV latent and its rotated RoPE key,
[R + P] numbers instead of 2 * heads * head dim. Queries arrive absorbed: the caller multiplies each
head's non-positional query by that head's key up-projection, so a score is one dot product
[q_latent | q_rope] . [latent | k_rope], and the output is the attention-weighted latent, which the
caller maps through each head's value up-projection. Attention itself is then multi-query attention
with a single key "head" of width R + P whose values are its first R numbers.

Legend: T = tokens in the step, B = decoding sequences, H = query heads, R = latent dim, P = RoPE dim,
S = cache slots, L = context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvtrove.layers.attention import AttentionMetadata


class LatentAttention(nn.Module):
    kernels = None  # kvtrove's C++ CPU kernels, bound by `use_cpu_kernels`

    def __init__(self, num_heads: int, latent_dim: int, rope_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.latent_dim, self.scale = num_heads, latent_dim, scale
        self.sliding_window = None
        self.cache_layout = (1, 1, latent_dim + rope_dim)
        """Per token: one row, latent then rotated RoPE key."""
        self.rope_dims = slice(latent_dim, latent_dim + rope_dim)
        """The numbers of a cached row that RoPE rotated (de-interleaved: rotate-half layout)."""
        self.context_flops = 2 * num_heads * (2 * latent_dim + rope_dim)
        """FLOPs per new token per earlier token attended to (scores over R + P, then the latent sum)."""
        self.kv_cache: torch.Tensor | None = None  # [1, 1, S, R + P], bound by the runner

    def forward(self, q: torch.Tensor, rows: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, R + P] (absorbed, rotated); rows [T, R + P] the new tokens' cache rows -> [T, H, R]."""
        cache = self.kv_cache[0, 0]  # [S, R + P]
        cache.index_copy_(0, meta.slot_mapping, rows)
        nd = meta.num_decodes
        if not meta.prefills:
            return self._decode(q, cache, meta)
        out = q.new_empty(q.shape[0], self.num_heads, self.latent_dim)
        if nd:
            out[:nd] = self._decode(q[:nd], cache, meta)
        for p in meta.prefills:
            if self.kernels is not None:  # the decode kernel's arithmetic (layers/csrc/attention.cpp)
                # one key head, [L, 1, R + P] (or the whole cache, read at the context's slots); values are
                # the first R numbers of each key row
                ctx = (rows[p.start : p.start + p.length] if p.context_slots is None else cache)[:, None]
                qp = q[p.start : p.start + p.length].float()
                o = self.kernels.prefill_attention(
                    qp, ctx, ctx[..., : self.latent_dim], self.scale, 0, p.context_slots, p.positions
                )
                out[p.start : p.start + p.length] = o.to(out.dtype)
                continue
            if p.context_slots is None:
                ctx = rows[p.start : p.start + p.length]
            else:
                ctx = cache.index_select(0, p.context_slots)  # [L, R + P]
            qp = q[p.start : p.start + p.length].transpose(0, 1).unsqueeze(0)  # [1, H, n, R + P]
            k = ctx[None, None]
            v = k[..., : self.latent_dim]
            mask = None if p.mask is None else p.mask[None, None]
            o = F.scaled_dot_product_attention(
                qp, k, v, attn_mask=mask, is_causal=p.mask is None, scale=self.scale, enable_gqa=True
            )
            out[p.start : p.start + p.length] = o[0].transpose(0, 1)
        return out

    def _decode(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Single-token queries [B, H, R + P] against their contexts -> [B, H, R]."""
        B, L = meta.decode_slots.shape
        if self.kernels is not None:
            k = cache[None]  # [1, S, R + P]
            return self.kernels.paged_decode(
                q, k, k[..., : self.latent_dim], meta.decode_slots, meta.decode_lens, self.scale, 0
            ).to(q.dtype)
        ctx = cache.index_select(0, meta.decode_slots.flatten()).view(B, L, -1)
        dtype = q.dtype
        if dtype != torch.float32:  # small matmuls: float32 kernels are far faster on CPUs
            q, ctx = q.float(), ctx.float()
        scores = torch.matmul(q, ctx.transpose(1, 2)).mul_(self.scale)  # [B, H, L]
        if meta.decode_mask is not None:
            scores.masked_fill_(meta.decode_mask.unsqueeze(1), float("-inf"))
        return torch.matmul(scores.softmax(-1), ctx[..., : self.latent_dim]).to(dtype)
