"""Shared fixtures: the real default model, and tiny random-weight HF checkpoints per architecture."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from kvtrove.config import default_model_path

warnings.filterwarnings("ignore", category=UserWarning)


def pytest_configure(config):
    # converted models and stored KV go to a fresh folder, never the user's cache
    os.environ["KVTROVE_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvtrove-test-cache-")


TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
)

# name -> (transformers config class name, extra config)
ARCHS = {
    "llama": ("LlamaConfig", {}),
    "llama-rope-llama3": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "llama-rope-linear": (
        "LlamaConfig",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    "llama-bias-headdim": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
    "smollm-tied": ("LlamaConfig", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "mistral": ("MistralConfig", {"sliding_window": 48}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 96,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [1],
            "use_sliding_window": False,
        },
    ),
    # experts in whole groups of 32 (their C++ bank and the one-call decode step run), shared expert of 96
    "qwen2-moe-32": (
        "Qwen2MoeConfig",
        {
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 96,
            "norm_topk_prob": False,
            "use_sliding_window": False,
        },
    ),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        {
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 32,
            "head_dim": 24,
            "norm_topk_prob": True,
        },
    ),
    "deepseek-v2": (
        "DeepseekV2Config",
        {
            "q_lora_rank": None,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 24,
            "n_routed_experts": 8,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 32,
            "n_shared_experts": 2,
            "first_k_dense_replace": 1,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 1.5,
        },
    ),
    "deepseek-v3": (
        "DeepseekV3Config",
        {
            "num_key_value_heads": 4,
            "q_lora_rank": 24,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
        },
    ),
}


@pytest.fixture(scope="session")
def smollm_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, smollm_path) -> Path:
    """The default model's tokenizer saved as HF tokenizer files, to pair with tiny random models."""
    from transformers import AutoTokenizer

    p = Path(smollm_path)
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


def make_tiny_model(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import transformers

    cls_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(
        **{**TINY, **extra, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir):
    """Factory: tiny_model(arch) -> directory of a saved random-weight HF checkpoint (cached per arch)."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(arch), tokenizer_dir)
        return made[arch]

    return get


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """One engine over the real default model, shared by the tests that only read from it."""
    from kvtrove import LLM

    return LLM(model=smollm_path, dtype="float32")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))
