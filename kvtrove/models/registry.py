"""Hugging Face `architectures` names -> model classes, and weight loading by HF parameter name."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from kvtrove.models.deepseek import DeepseekForCausalLM
from kvtrove.models.llama import LlamaForCausalLM
from kvtrove.models.moe import MoEForCausalLM

EXPERT_TENSOR = re.compile(r"(.+)\.experts\.(\d+)\.(\w+)\.weight$")

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MoEForCausalLM,
    "Qwen2MoeForCausalLM": MoEForCausalLM,
    "Qwen3MoeForCausalLM": MoEForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,
}
# For configs without `architectures` (e.g. built from GGUF metadata).
MODEL_TYPES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "mixtral": MoEForCausalLM,
    "qwen2_moe": MoEForCausalLM,
    "qwen3_moe": MoEForCausalLM,
    "deepseek_v2": DeepseekForCausalLM,
    "deepseek_v3": DeepseekForCausalLM,
}


def model_class(hf_config) -> type[nn.Module]:
    archs = getattr(hf_config, "architectures", None) or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    model_type = getattr(hf_config, "model_type", None)
    if not archs and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise ValueError(f"unknown architecture {archs or model_type!r}; supported: {sorted(ARCHITECTURES)}")


def build_model(
    hf_config,
    weights: Iterable[tuple[str, torch.Tensor]],
    max_positions: int,
    dtype: torch.dtype,
) -> nn.Module:
    """The model with its weights, as torch modules (`layers/linear.py` use_cpu_kernels moves it onto
    the C++ kernels once it is placed)."""
    cls = model_class(hf_config)
    with torch.device("meta"):
        model = cls(hf_config, max_positions, dtype)
    model = model.to_empty(device="cpu").to(dtype)
    model.tie_weights()
    for module in model.modules():  # buffers computed at init were made on meta
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    load_weights(model, weights)
    return model.eval().requires_grad_(False)


def apply_renames(model: nn.Module, name: str) -> str:
    for theirs, ours in getattr(model, "renames", {}).items():
        name = name.replace(theirs, ours)
    return name


def param_target(model: nn.Module, name: str) -> tuple[str, str, int | None]:
    """(module path, parameter, shard) a checkpoint tensor (renamed) loads into: the shard of a fused
    projection (q/k/v -> qkv_proj, gate/up -> gate_up_proj), or None for a plain parameter."""
    module_name, _, param = name.rpartition(".")
    parent, _, leaf = module_name.rpartition(".")
    packed = getattr(model, "packed_modules", {})
    if leaf in packed:
        target, shard = packed[leaf]
        return f"{parent}.{target}" if parent else target, param, shard
    return module_name, param, None


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy each (HF name, tensor) into the model, splitting fused projections into their shards."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name, tensor in weights:
        name = apply_renames(model, name)
        expert = EXPERT_TENSOR.match(name)
        if expert and hasattr(experts := model.get_submodule(f"{expert[1]}.experts"), "load_expert"):
            experts.load_expert(int(expert[2]), expert[3], tensor)
            loaded.add(f"{expert[1]}.experts#{expert[2]}.{expert[3]}")
            continue
        fused, param, shard = param_target(model, name)
        if shard is not None:
            model.get_submodule(fused).load_shard(param, shard, tensor)
            loaded.add(f"{fused}.{param}#{shard}")
            continue
        if name not in params:
            if model.unused_tensor(name):
                continue
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        if params[name].shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(params[name].shape)}"
            )
        params[name].data.copy_(tensor)
        loaded.add(name)
    missing = []
    for name, _ in model.named_parameters(remove_duplicate=False):
        module_name, _, param = name.rpartition(".")
        mod = model.get_submodule(module_name)
        if hasattr(mod, "load_expert"):
            n = mod.w13.shape[0]
            if not all(f"{module_name}#{e}.{leaf}" in loaded for e in range(n) for leaf in mod.leaves):
                missing.append(name)
        elif hasattr(mod, "offsets"):
            if not all(f"{name}#{i}" in loaded for i in range(len(mod.offsets) - 1)):
                missing.append(name)
        elif name not in loaded and not _is_tied(model, name):
            missing.append(name)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")


def _is_tied(model: nn.Module, name: str) -> bool:
    return name == "lm_head.weight" and getattr(model, "tied", False)
