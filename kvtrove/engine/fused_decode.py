"""Decode steps of Llama-family models as one C++ call (`layers/csrc/decode_stack.cpp`).

A decode step of a small model is dozens of microsecond-scale kernels; run as ~10 nn.Module calls per
layer, the Python between them costs a third of the step on SmolLM2-135M. The stack holds the modules'
own tensors (no copies) and calls the same kernels in the same order, so its numbers are the modules'
numbers. It is built only for what it covers: a float32 Llama-family decoder (Llama, Mistral, Qwen2,
Qwen3, SmolLM) whose every piece runs kvtrove's CPU kernels (float, int8 or int4 linear layers); any
other model, and any step with a prefill or more than `MAX_TOKENS` decodes, runs the modules.
"""

from __future__ import annotations

import torch
from torch import nn

from kvtrove.layers.attention import AttentionMetadata
from kvtrove.layers.linear import FEW_TOKENS as FLOAT_FEW_TOKENS
from kvtrove.layers.linear import CpuLinear
from kvtrove.layers.norm import RMSNorm
from kvtrove.layers.quant import FEW_TOKENS, Int4Linear, Int8Linear, kernel_parts
from kvtrove.models.llama import LlamaAttention, LlamaMLP, LlamaModel

MAX_TOKENS = min(FEW_TOKENS, FLOAT_FEW_TOKENS[torch.float32])
"""Decodes per step up to which every linear layer runs its kernel (beyond, the modules' GEMMs)."""


class FusedDecode:
    """`stack.forward(...)` for the steps it covers; see `build`."""

    def __init__(self, stack):
        self.stack = stack

    @staticmethod
    def covers(meta: AttentionMetadata, num_tokens: int) -> bool:
        return not meta.prefills and num_tokens <= MAX_TOKENS

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.stack.forward(ids, positions, meta.slot_mapping, meta.decode_slots, meta.decode_lens)


def build(model: nn.Module) -> FusedDecode | None:
    """The fused decode path of `model` (its KV caches already bound), or None where it does not apply."""
    body = getattr(model, "model", None)
    if type(body) is not LlamaModel or not _runs_kernels(body.norm):
        return None
    kernels = body.norm.kernels
    embed = body.embed_tokens
    if type(embed) is not nn.Embedding or embed.weight.dtype != torch.float32 or embed.weight.device.type != "cpu":
        return None
    rotary = body.rotary
    stack = kernels.DecodeStack(embed.weight, rotary.cos, rotary.sin, body.norm.weight, body.norm.eps)
    for layer in body.layers:
        spec = _layer(layer, body.norm.eps)
        if spec is None:
            return None
        stack.add_layer(*spec)
    return FusedDecode(stack)


def _layer(layer: nn.Module, eps: float) -> tuple | None:
    attn, mlp = layer.self_attn, layer.mlp
    if type(attn) is not LlamaAttention or type(mlp) is not LlamaMLP:
        return None
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if attn.qk_norm:
        norms += [attn.q_norm, attn.k_norm]
    if not all(_runs_kernels(n) for n in norms) or attn.attn.kernels is None or mlp.act.kernels is None:
        return None
    if any(n.eps != eps for n in norms):  # the stack has one
        return None
    linears = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if None in linears:
        return None
    pa = attn.attn
    return (
        layer.input_layernorm.weight,
        layer.post_attention_layernorm.weight,
        attn.q_norm.weight if attn.qk_norm else None,
        attn.k_norm.weight if attn.qk_norm else None,
        *linears,
        pa.kv_cache[0],
        pa.kv_cache[1],
        pa.num_heads,
        pa.scale,
        pa.sliding_window or 0,
    )


def _runs_kernels(norm: nn.Module) -> bool:
    return type(norm) is RMSNorm and norm.kernels is not None and norm.weight.dtype == torch.float32


def _linear(m: nn.Module) -> tuple | None:
    """(the kernel's tensors, bias) of a linear layer that runs a kernel for few tokens, else None."""
    if type(m) is CpuLinear and m.kernels is not None and m.weight.dtype == torch.float32:
        return [m.weight], m.bias
    if type(m) in (Int8Linear, Int4Linear) and m.kernels is not None and m.in_features % 32 == 0:
        return kernel_parts(m), m.bias
    return None
