"""DeepSeek-V2 / V3: multi-head latent attention (MLA) and mixture-of-experts MLPs on the Llama-family body.

- Attention caches the compressed latent (`layers/mla.py`), not per-head keys and values; the key
  up-projection is absorbed into the query and the value up-projection applied to the attended latent.
  RoPE pairs are interleaved in these checkpoints (V2 always, V3 with `rope_interleave`): we
  de-interleave query and key the same way, which leaves every score unchanged, and rotate half.
- Routing: V2 softmax scores, top-k, optionally group-limited (`group_limited_greedy`: keep the
  `topk_group` groups with the best expert); V3 sigmoid scores plus a per-expert bias for choosing only
  (groups ranked by their two best biased scores), weights from the unbiased scores, optionally
  renormalized; both scaled by `routed_scaling_factor`. Shared experts are one dense MLP of
  `n_shared_experts * moe_intermediate_size`. The first `first_k_dense_replace` layers are dense.

Legend: T = tokens, E = hidden size, H = heads, N/P/V = non-RoPE / RoPE / value head dims, R = KV latent dim.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from kvtrove.layers.attention import AttentionMetadata
from kvtrove.layers.linear import pack_weight
from kvtrove.layers.mla import LatentAttention
from kvtrove.layers.norm import RMSNorm
from kvtrove.layers.rotary import apply_rotary
from kvtrove.models.llama import LlamaForCausalLM, LlamaMLP
from kvtrove.models.moe import Experts

LORA_NORM_EPS = 1e-6
"""The q/kv latent norms use their own epsilon, not `rms_norm_eps` (as the reference code)."""


def softmax_scale(cfg) -> float:
    """1/sqrt(query head dim), times YaRN's mscale^2 when the RoPE is scaled with `mscale_all_dim`."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    params = getattr(cfg, "rope_parameters", None) or {}
    factor, mscale_all_dim = params.get("factor", 1.0), params.get("mscale_all_dim", 0)
    if params.get("rope_type", "default") != "default" and mscale_all_dim and factor > 1:
        m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= m * m
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class DeepseekAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, E = cfg.num_attention_heads, cfg.hidden_size
        self.num_heads, self.latent_dim = H, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        bias = bool(getattr(cfg, "attention_bias", False))
        q_out = H * (self.nope_dim + self.rope_dim)
        self.q_lora = bool(getattr(cfg, "q_lora_rank", None))
        if self.q_lora:
            self.q_a_proj = nn.Linear(E, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(E, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(E, self.latent_dim + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.latent_dim, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, E, bias=bias)
        self.interleaved = cfg.model_type == "deepseek_v2" or bool(getattr(cfg, "rope_interleave", False))
        self.attn = LatentAttention(H, self.latent_dim, self.rope_dim, softmax_scale(cfg))
        self.absorbed = None
        """(W_UK as [H, R, N], W_UV as [H, V, R]) per head, packed for the linear kernel (`pack_for_kernels`)."""

    kernels = None  # kvtrove's C++ CPU kernels, bound by `use_cpu_kernels`

    def pack_for_kernels(self) -> None:
        H, N = self.num_heads, self.nope_dim
        w = self.kv_b_proj.weight.view(H, N + self.v_dim, self.latent_dim)
        self.absorbed = pack_weight(w[:, :N].transpose(1, 2)), pack_weight(w[:, N:])
        del self.kv_b_proj  # only the torch-ops path reads it: the absorbed copies replace it

    def forward(self, x: torch.Tensor, cos_sin, meta: AttentionMetadata) -> torch.Tensor:
        T, H, N, P, R = x.shape[0], self.num_heads, self.nope_dim, self.rope_dim, self.latent_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_rope = q.view(T, H, N + P).split([N, P], -1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([R, P], -1)
        latent = self.kv_a_layernorm(latent.contiguous())
        k_rope = k_rope.unsqueeze(1)  # [T, 1, P]
        if self.interleaved:  # pairs (x0, x1), (x2, x3).. -> x0, x2, .., x1, x3, ..: rotate-half's layout
            q_rope, k_rope = deinterleave(q_rope), deinterleave(k_rope)
        cos, sin = cos_sin
        q_rope, k_rope = apply_rotary(q_rope, cos, sin), apply_rotary(k_rope, cos, sin)
        k = self.kernels
        if k is None:
            w = self.kv_b_proj.weight.view(H, N + self.v_dim, R)
            q_latent = torch.bmm(q_nope.transpose(0, 1), w[:, :N]).transpose(0, 1)  # [T, H, R]: W_UK absorbed
            out = self.attn(torch.cat([q_latent, q_rope], -1), torch.cat([latent, k_rope[:, 0]], -1), meta)
            out = torch.bmm(out.transpose(0, 1), w[:, N:].transpose(1, 2)).transpose(0, 1)  # [T, H, V]: W_UV
        else:  # per head through the linear kernel: a token's numbers do not depend on the step's other tokens
            uk, uv = self.absorbed
            q_latent = torch.stack([k.linear(q_nope[:, h].contiguous(), uk[h], R, None) for h in range(H)], 1)
            out = self.attn(torch.cat([q_latent, q_rope], -1), torch.cat([latent, k_rope[:, 0]], -1), meta)
            out = torch.stack([k.linear(out[:, h].contiguous(), uv[h], self.v_dim, None) for h in range(H)], 1)
        return self.o_proj(out.reshape(T, H * self.v_dim))


class DeepseekRouter(nn.Module):
    """Picks each token's experts and their weights (V2: softmax; V3: sigmoid with a choice-only bias)."""

    kernels = None  # kvtrove's C++ CPU kernels, bound by `use_cpu_kernels`

    def __init__(self, cfg):
        super().__init__()
        self.num_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.v3 = cfg.model_type == "deepseek_v3"
        self.method = "noaux_tc" if self.v3 else (getattr(cfg, "topk_method", None) or "greedy")
        if self.method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"topk_method {self.method!r} is not supported (greedy, group_limited_greedy)")
        self.num_groups = getattr(cfg, "n_group", None) or 1
        self.topk_groups = getattr(cfg, "topk_group", None) or self.num_groups
        if self.num_experts % self.num_groups:
            raise ValueError(f"{self.num_experts} experts do not split into n_group={self.num_groups} groups")
        self.renormalize = self.v3 and bool(getattr(cfg, "norm_topk_prob", False))
        self.scaling = float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0)
        self.weight = nn.Parameter(torch.empty(self.num_experts, cfg.hidden_size), requires_grad=False)
        if self.v3:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.num_experts), requires_grad=False)
        self.packed = None
        """The weights in float32, packed for the linear kernel (`pack_for_kernels`)."""

    def pack_for_kernels(self) -> None:
        self.packed = pack_weight(self.weight.float())

    def _keep_groups(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        """`scores` with every expert outside each token's `topk_group` best groups set to `fill`."""
        best = group_scores.topk(self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keep = keep.repeat_interleave(self.num_experts // self.num_groups, dim=1)
        return scores.masked_fill(~keep, fill)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, E] -> weights [T, k] (float32) and chosen experts [T, k]."""
        k = self.kernels
        logits = F.linear(x.float(), self.weight.float()) if k is None else k.linear(x.float(), self.packed, self.num_experts, None)
        T, G = logits.shape[0], self.num_groups
        if self.v3:
            scores = logits.sigmoid() if k is None else k.sigmoid(logits)
            choice = scores + self.e_score_correction_bias.float()
            if G > 1:
                group_scores = choice.view(T, G, -1).topk(2, dim=-1).values.sum(-1)
                choice = self._keep_groups(choice, group_scores, float("-inf"))
            chosen = choice.topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, chosen)
            if self.renormalize:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        else:
            scores = logits.softmax(-1)
            if self.method == "group_limited_greedy":
                scores = self._keep_groups(scores, scores.view(T, G, -1).amax(-1), 0.0)
            weights, chosen = scores.topk(self.top_k, dim=-1)
        return weights * self.scaling, chosen


class DeepseekMoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = DeepseekRouter(cfg)
        leaves = ("gate_proj", "up_proj", "down_proj")
        inter = cfg.moe_intermediate_size
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, inter, cfg.num_experts_per_tok, leaves)
        shared = getattr(cfg, "n_shared_experts", None) or 0
        self.shared_experts = LlamaMLP(cfg, inter * shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.gate(x)
        out = self.experts(x, weights.to(x.dtype), chosen)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekForCausalLM(LlamaForCausalLM):
    packed_modules = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    make_attention = DeepseekAttention

    def __init__(self, cfg, max_positions: int, dtype: torch.dtype):
        super().__init__(cfg, max_positions, dtype)
        self.num_layers = cfg.num_hidden_layers

    def unused_tensor(self, name: str) -> bool:
        """V3 checkpoints carry their multi-token-prediction module as layers past `num_hidden_layers`."""
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return super().unused_tensor(name) or (m is not None and int(m[1]) >= self.num_layers)

    @staticmethod
    def make_mlp(cfg, layer: int) -> nn.Module:
        freq = getattr(cfg, "moe_layer_freq", None) or 1
        sparse = cfg.n_routed_experts and layer >= (cfg.first_k_dense_replace or 0) and layer % freq == 0
        return DeepseekMoE(cfg) if sparse else LlamaMLP(cfg)
