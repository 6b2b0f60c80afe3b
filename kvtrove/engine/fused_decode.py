"""Decode steps of Llama-family models as one C++ call (`layers/csrc/decode_stack.cpp`).

A decode step of a small model is dozens of microsecond-scale kernels; run as ~10 nn.Module calls per
layer, the Python between them costs a third of the step on SmolLM2-135M. The stack holds the modules'
own tensors (no copies) and calls the same kernels in the same order, so its numbers are the modules'
numbers. It is built only for what it covers: a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3,
SmolLM) whose every piece runs kvtrove's CPU kernels - float32 with float, int8 or int4 linear layers
(and Mixtral, Qwen2-MoE, Qwen3-MoE with their routed experts quantized, int8 or int4), or bf16 with
bf16 linear layers; any other model (DeepSeek's MLA, float experts), and any step with a prefill, runs
the modules.
"""

from __future__ import annotations

import torch
from torch import nn

from kvtrove.layers.attention import AttentionMetadata
from kvtrove.layers.linear import CpuLinear
from kvtrove.layers.norm import RMSNorm
from kvtrove.layers.quant import Int4Linear, Int8Linear, QuantizedExperts
from kvtrove.models.llama import LlamaAttention, LlamaMLP, LlamaModel
from kvtrove.models.moe import SparseMoE


class FusedDecode:
    """`stack.forward(...)` for the steps it covers; see `build`."""

    def __init__(self, stack, banks: list):
        self.stack = stack
        self.banks = banks
        """The experts' C++ banks the stack points to, kept alive as long as it is."""

    @staticmethod
    def covers(meta: AttentionMetadata) -> bool:
        return not meta.prefills

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.stack.forward(ids, positions, meta.slot_mapping, meta.decode_slots, meta.decode_lens)


def build(model: nn.Module) -> FusedDecode | None:
    """The fused decode path of `model` (its KV caches already bound), or None where it does not apply."""
    body = getattr(model, "model", None)
    if type(body) is not LlamaModel or type(body.embed_tokens) is not nn.Embedding:
        return None
    embed = body.embed_tokens
    dtype = embed.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16) or embed.weight.device.type != "cpu":
        return None
    if not _runs_kernels(body.norm, dtype):
        return None
    kernels = body.norm.kernels
    rotary = body.rotary
    stack = kernels.DecodeStack(embed.weight, rotary.cos, rotary.sin, body.norm.weight, body.norm.eps)
    banks = []
    for layer in body.layers:
        spec = _layer(layer, body.norm.eps, dtype)
        mlp = _mlp(layer.mlp, dtype)
        if spec is None or mlp is None:
            return None
        dense, moe = mlp
        stack.add_layer(*spec[:6], *dense, *spec[6:])
        if moe is not None:
            stack.set_moe(*moe)
            banks.append(moe[3])
    return FusedDecode(stack, banks)


def _layer(layer: nn.Module, eps: float, dtype: torch.dtype) -> tuple | None:
    attn = layer.self_attn
    if type(attn) is not LlamaAttention:
        return None
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if attn.qk_norm:
        norms += [attn.q_norm, attn.k_norm]
    if not all(_runs_kernels(n, dtype) for n in norms) or attn.attn.kernels is None:
        return None
    if any(n.eps != eps for n in norms):  # the stack has one
        return None
    linears = [_linear(m, dtype) for m in (attn.qkv_proj, attn.o_proj)]
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


def _mlp(mlp: nn.Module, dtype: torch.dtype) -> tuple[tuple, tuple | None] | None:
    """((gate_up, down) of a dense MLP, or (None, None)), and the `set_moe` arguments of a sparse one (float32
    only: the expert bank takes float32 activations)."""
    if type(mlp) is LlamaMLP:
        dense = _dense(mlp, dtype)
        return None if dense is None else (dense, None)
    if type(mlp) is not SparseMoE or type(mlp.experts) is not QuantizedExperts or mlp.experts.bank is None:
        return None
    if dtype != torch.float32:
        return None
    router = _linear(mlp.gate, dtype)
    if router is None or not router[0].is_floating_point():  # a float router (its logits pick the experts)
        return None
    shared = (None, None, None)
    if mlp.shared_expert is not None:
        dense, gate = _dense(mlp.shared_expert, dtype), _linear(mlp.shared_expert_gate, dtype)
        if dense is None or gate is None:
            return None
        shared = (*dense, gate)
    return (None, None), (router, mlp.top_k, mlp.norm_topk, mlp.experts.bank, *shared)


def _dense(mlp: nn.Module, dtype: torch.dtype) -> tuple | None:
    """(gate_up, down) of a SiLU MLP whose pieces run kernels."""
    if type(mlp) is not LlamaMLP or mlp.act.kernels is None:
        return None
    linears = (_linear(mlp.gate_up_proj, dtype), _linear(mlp.down_proj, dtype))
    return None if None in linears else linears


def _runs_kernels(norm: nn.Module, dtype: torch.dtype) -> bool:
    return type(norm) is RMSNorm and norm.kernels is not None and norm.weight.dtype == dtype


def _linear(m: nn.Module, dtype: torch.dtype) -> tuple | None:
    """(the kernel's packed weights, bias, outputs) of a linear layer that runs a kernel, else None (the
    quantized kernels return float32, which a bf16 model's modules round)."""
    if type(m) is CpuLinear and m.kernels is not None and m.dtype == dtype:
        return m.packed, m.bias, m.out_features
    quantized = type(m) in (Int8Linear, Int4Linear) and m.kernels is not None
    if quantized and dtype == torch.float32:
        return m.packed, m.bias, m.out_features
    return None
