"""The C++ paged decode kernel against the torch-ops path, and engine output with it on and off."""

from __future__ import annotations

import pytest
import torch

from kvtrove import LLM, SamplingParams
from kvtrove.layers.attention import AttentionMetadata, PagedAttention
from kvtrove.layers.kernels import paged_decode


def _meta(slots: torch.Tensor, lens: torch.Tensor, window: int | None) -> AttentionMetadata:
    L = slots.shape[1]
    q_pos = lens - 1
    k_pos = torch.arange(L)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        num_decodes=len(lens),
        decode_slots=slots,
        decode_lens=lens,
        decode_mask=~allowed,
        prefills=[],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, window", [(64, None), (128, None), (24, None), (64, 37)])
def test_kernel_matches_torch_ops(dtype, head_dim, window):
    kernel = paged_decode()
    assert kernel is not None, "the C++ kernel must build on the CI machine (gcc + ninja are installed)"
    K, G, S, bs = 2, 3, 4096, 16
    attn = PagedAttention(K * G, K, head_dim, head_dim**-0.5, window)
    attn.kv_cache = torch.randn(2, K, S, head_dim).to(dtype)
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([1, 17, 100, 63])
    width = int(lens.max())
    blocks = torch.randperm(S // bs, generator=g)[: len(lens) * (-(-width // bs))].view(len(lens), -1)
    slots = (blocks[:, :, None] * bs + torch.arange(bs)).flatten(1)[:, :width].contiguous()
    q = torch.randn(len(lens), K * G, head_dim, generator=g).to(dtype)
    meta = _meta(slots, lens, window)
    k_cache, v_cache = attn.kv_cache[0], attn.kv_cache[1]
    ref = attn._decode(q, k_cache, v_cache, meta)
    attn.decode_kernel = kernel
    got = attn._decode(q, k_cache, v_cache, meta)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got.float() - ref.float()).abs().max().item() < tol


def test_engine_output_same_with_and_without_kernel(smollm_path):
    prompts = ["The capital of France is", "A long time ago, in a galaxy far away,", "def add(a, b):"]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    on = LLM(model=smollm_path, num_blocks=64, decode_kernel=True)
    off = LLM(model=smollm_path, num_blocks=64, decode_kernel=False)
    assert on.engine.model.attention_layers[0].decode_kernel is not None
    assert off.engine.model.attention_layers[0].decode_kernel is None
    assert [o.token_ids for o in on.generate(prompts, params)] == [o.token_ids for o in off.generate(prompts, params)]
