"""Llama-family decoders: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm), SmolLM; the body of the
MoE models too (`moe.py` swaps the MLPs).

Legend: T = tokens in the step, E = hidden size, H/K = query/KV heads, D = head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from kvtrove.layers.activation import SiluAndMul
from kvtrove.layers.attention import AttentionMetadata, PagedAttention
from kvtrove.layers.linear import MergedLinear
from kvtrove.layers.norm import RMSNorm
from kvtrove.layers.rotary import RotaryEmbedding


def sliding_window(cfg) -> int | None:
    window = getattr(cfg, "sliding_window", None)
    return int(window) if window and getattr(cfg, "use_sliding_window", True) else None


class LlamaAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rope_dim = self.head_dim
        bias = bool(getattr(cfg, "attention_bias", False))
        qkv_bias = bias or cfg.model_type in ("qwen2", "qwen2_moe")
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [q, kv, kv], bias=qkv_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=bias)
        self.qk_norm = cfg.model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, sliding_window(cfg)
        )

    def forward(self, x: torch.Tensor, cos_sin, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (H + 2K) * D]: q, k and v heads side by side
        if self.qk_norm:
            T, H, K = x.shape[0], self.num_heads, self.num_kv_heads
            q, k, v = qkv.view(T, H + 2 * K, self.head_dim).split([H, K, K], 1)
            qkv = torch.cat([self.q_norm(q.contiguous()), self.k_norm(k.contiguous()), v], 1).view(T, -1)
        return self.o_proj(self.attn(qkv, *cos_sin, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg, intermediate_size: int | None = None):
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [inter] * 2, bias=bias)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=bias)
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (only silu)")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos_sin, meta: AttentionMetadata):
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds them."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos_sin, meta), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, max_positions: int, dtype: torch.dtype, make_attention, make_mlp):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(cfg, make_attention(cfg), make_mlp(cfg, i)) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg, self.layers[0].self_attn.rope_dim, max_positions, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, E]
        cos_sin = self.rotary(positions)
        residual = None
        for i, layer in enumerate(self.layers):
            if meta.blend is not None and i == meta.blend.select_at:  # a blended prefill: fewer tokens on
                x, residual, cos_sin, meta = meta.blend.select(x, residual, cos_sin)
            x, residual = layer(x, residual, cos_sin, meta)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    renames: dict[str, str] = {}
    """Checkpoint name parts -> ours (e.g. Mixtral's `.block_sparse_moe.` is our `.mlp.`)."""

    make_attention = LlamaAttention

    @staticmethod
    def make_mlp(cfg, layer: int) -> nn.Module:
        return LlamaMLP(cfg)

    def __init__(self, cfg, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.model = LlamaModel(cfg, max_positions, dtype, self.make_attention, self.make_mlp)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.tie_weights()

    def unused_tensor(self, name: str) -> bool:
        """Checkpoint tensors this model has no use for (older checkpoints store RoPE's inverse frequencies)."""
        return name.endswith("rotary_emb.inv_freq")

    def tie_weights(self) -> None:
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
