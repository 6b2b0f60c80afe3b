"""The C++ CPU kernels against the torch ops they replace (paged decode attention, few-token linear,
fused norm / RoPE + KV write / SiLU), and engine output with them on and off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvtrove import LLM, SamplingParams
from kvtrove.layers.activation import SiluAndMul
from kvtrove.layers.attention import AttentionMetadata, PagedAttention
from kvtrove.layers.kernels import cpu_kernels
from kvtrove.layers.linear import CpuLinear, pack_weight, unpack_weight
from kvtrove.layers.norm import RMSNorm
from kvtrove.layers.rotary import RotaryEmbedding


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
    kernel = cpu_kernels()
    assert kernel is not None, "the C++ kernels must build on the CI machine (gcc + ninja are installed)"
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
    attn.kernels = kernel
    got = attn._decode(q, k_cache, v_cache, meta)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got.float() - ref.float()).abs().max().item() < tol


def test_engine_output_same_with_and_without_kernels(smollm_path):
    prompts = ["The capital of France is", "A long time ago, in a galaxy far away,", "def add(a, b):"]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    on = LLM(model=smollm_path, num_blocks=64, cpu_kernels=True)
    off = LLM(model=smollm_path, num_blocks=64, cpu_kernels=False)
    assert on.engine.model.attention_layers[0].kernels is not None
    assert off.engine.model.attention_layers[0].kernels is None
    assert on.engine.model.lm_head.kernels is not None
    assert [o.token_ids for o in on.generate(prompts, params)] == [o.token_ids for o in off.generate(prompts, params)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 17, 64, 100])
@pytest.mark.parametrize("out_features, in_features, bias", [(96, 64, False), (37, 100, True), (5, 7, True)])
def test_linear_matches_torch(dtype, tokens, out_features, in_features, bias):
    """Every token count (kernel tiles of 4 and their tails), odd shapes (K not a multiple of 8), bias."""
    kernel = cpu_kernels()
    assert kernel is not None
    g = torch.Generator().manual_seed(tokens)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    x = torch.randn(tokens, in_features, generator=g).to(dtype)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    direct = kernel.linear(x, pack_weight(w), out_features, b)
    layer = CpuLinear(w, b, kernel)(x)  # the module on the same kernel
    assert direct.dtype == layer.dtype == dtype and direct.shape == layer.shape == ref.shape
    # float32: summation order only; bfloat16: one rounding of the output
    rtol, atol = (1e-5, 1e-4) if dtype == torch.float32 else (8e-3, 1e-2)
    torch.testing.assert_close(direct.float(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.float(), ref, rtol=rtol, atol=atol)


def test_linear_rejects_bad_shapes():
    kernel = cpu_kernels()
    with pytest.raises(RuntimeError, match="packed for \\[4, 8\\] expected"):
        kernel.linear(torch.randn(2, 8), pack_weight(torch.randn(4, 9)), 4, None)
    with pytest.raises(RuntimeError, match="packed for \\[20, 9\\] expected"):  # 20 rows need two panels
        kernel.linear(torch.randn(2, 9), pack_weight(torch.randn(4, 9)), 20, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (16, 8), (17, 9), (3, 4, 33, 7)])
def test_packed_weights_unpack_to_themselves(dtype, shape):
    w = torch.randn(*shape).to(dtype)
    packed = pack_weight(w)
    assert packed.shape[-1] == (16 if dtype == torch.float32 else 32)
    assert torch.equal(unpack_weight(packed, *shape[-2:]), w)
    if w.dim() == 2:
        assert torch.equal(CpuLinear(w, None, cpu_kernels()).weight, w)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (1.6e-2, 1e-2)  # bf16: one ulp of rounding
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_fused_norm_matches_torch(dtype, tokens):
    kernel = cpu_kernels()
    g = torch.Generator().manual_seed(tokens)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data = torch.randn(96, generator=g)
    norm = norm.to(dtype)
    x = torch.randn(tokens, 96, generator=g).to(dtype)
    res = torch.randn(tokens, 96, generator=g).to(dtype)
    ref_plain = norm(x)
    ref_res = res.clone()
    ref_out, _ = norm(x, ref_res)
    norm.kernels = kernel
    _close(norm(x), ref_plain, dtype)
    got_res = res.clone()
    got_out, returned = norm(x, got_res)
    assert returned is got_res  # the residual is updated in place, as the model relies on
    _close(got_res, ref_res, dtype)
    _close(got_out, ref_out, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_store_matches_torch(dtype):
    kernel = cpu_kernels()
    H, K, D, S, T = 6, 2, 32, 64, 5
    cfg = SimpleNamespace(rope_theta=10000.0)
    rope = RotaryEmbedding(cfg, D, 128, dtype)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(T, (H + 2 * K) * D, generator=g).to(dtype)
    cos, sin = rope(torch.tensor([0, 7, 8, 9, 100]))
    meta = _meta(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), None)
    meta.slot_mapping = torch.tensor([3, 17, 18, 40, 63])
    results = []
    for kernels in (None, kernel):
        attn = PagedAttention(H, K, D, D**-0.5, None)
        attn.kv_cache = torch.zeros(2, K, S, D, dtype=dtype)
        attn.kernels = kernels
        q, k, v = attn._rotate_and_store(qkv.clone(), cos, sin, meta)
        results.append((q, k, v, attn.kv_cache))
    for ref, got in zip(*results):
        assert ref.shape == got.shape
        _close(got, ref, dtype)
    assert results[1][3][:, :, meta.slot_mapping].abs().sum() > 0  # the new tokens' K/V landed in their slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_mul_matches_torch(dtype):
    act = SiluAndMul()
    gate_up = torch.randn(7, 2 * 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = act(gate_up)
    act.kernels = cpu_kernels()
    _close(act(gate_up), ref, dtype)


@pytest.mark.parametrize(
    "n, L, H, K, D, window",
    [
        (512, 512, 9, 3, 64, 0),  # SmolLM2's prefill: 3 query heads per KV head, 8 full token blocks
        (37, 100, 4, 2, 64, 0),  # new tokens after a cached prefix, partial blocks
        (5, 5, 8, 8, 128, 0),  # no GQA, wide heads
        (100, 300, 6, 2, 80, 0),  # head dim not a multiple of 16
        (200, 200, 4, 1, 64, 50),  # sliding window inside the prompt
        (70, 170, 4, 4, 64, 33),  # window and a cached prefix
        (1, 9, 2, 1, 16, 0),  # one token
        (16, 1000, 9, 3, 64, 0),  # few tokens over a long context: small token blocks
        (16, 1000, 4, 1, 64, 300),  # the same within a window
    ],
)
def test_prefill_attention_matches_torch_sdpa(n, L, H, K, D, window):
    kernel = cpu_kernels()
    assert kernel is not None, "the C++ kernels did not build"
    torch.manual_seed(n + L)
    qkv = torch.randn(L, (H + 2 * K) * D)  # the layout attention gets: heads side by side in each row
    q, k, v = qkv.view(L, H + 2 * K, D).split([H, K, K], 1)
    q = q[L - n :]
    pos, kpos = torch.arange(L - n, L), torch.arange(L)
    allowed = kpos[None] <= pos[:, None]
    if window:
        allowed &= kpos[None] > pos[:, None] - window
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=allowed[None, None], scale=0.3, enable_gqa=True
    )[0].transpose(0, 1)
    got = kernel.prefill_attention(q, k, v, 0.3, window)
    assert got.shape == (n, H, D)
    assert (got - ref).abs().max() < 1e-5, (got - ref).abs().max()
    ctx = kernel.prefill_attention(q, k.transpose(0, 1).contiguous().transpose(0, 1), v.clone(), 0.3, window)
    assert torch.allclose(ctx, got, atol=1e-7)  # head-major context (the gathered cache) reads the same


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_reads_the_paged_cache_in_place(dtype):
    """With slots, the context is read where the cache holds it: the numbers of a gathered copy, widened
    from bf16 exactly; and a few tokens over a long context (keys split across threads) get the same
    bits as the same tokens at the end of a long prefill (one item per token block)."""
    kernel = cpu_kernels()
    torch.manual_seed(0)
    S, L, H, K, D = 3000, 1100, 6, 1, 64
    k_cache, v_cache = torch.randn(K, S, D).to(dtype), torch.randn(K, S, D).to(dtype)  # head-major, as bound
    slots = torch.randperm(S)[:L]
    q = torch.randn(200, H, D)
    k_ctx = k_cache.index_select(1, slots).transpose(0, 1).float()
    v_ctx = v_cache.index_select(1, slots).transpose(0, 1).float()
    want = kernel.prefill_attention(q, k_ctx, v_ctx, 0.2, 0)
    got = kernel.prefill_attention(q, k_cache.transpose(0, 1), v_cache.transpose(0, 1), 0.2, 0, slots)
    assert torch.equal(got, want)
    few = kernel.prefill_attention(q[-16:], k_cache.transpose(0, 1), v_cache.transpose(0, 1), 0.2, 0, slots)
    assert torch.equal(few, want[-16:])
    with pytest.raises(RuntimeError, match="slot outside"):
        kernel.prefill_attention(q, k_cache.transpose(0, 1), v_cache.transpose(0, 1), 0.2, 0, slots + S)


@pytest.mark.parametrize("window", [0, 100])
def test_prefill_attention_at_scattered_positions(window):
    """Queries at given positions (a blended step's selection) get the bits the same queries get as rows
    of a full prefill of the context."""
    kernel = cpu_kernels()
    torch.manual_seed(1)
    L, H, K, D = 700, 6, 2, 64
    q, k, v = torch.randn(L, H, D), torch.randn(L, K, D), torch.randn(L, K, D)
    full = kernel.prefill_attention(q, k, v, 0.2, window)
    pos = torch.sort(torch.randperm(L)[:90]).values
    got = kernel.prefill_attention(q[pos], k, v, 0.2, window, None, pos)
    assert torch.equal(got, full[pos])
    with pytest.raises(RuntimeError, match="ascend"):
        kernel.prefill_attention(q[pos], k, v, 0.2, window, None, pos.flip(0))


def test_prefill_attention_rejects_bad_shapes():
    kernel = cpu_kernels()
    q, kv = torch.randn(4, 6, 64), torch.randn(3, 2, 64)
    with pytest.raises(RuntimeError, match="shapes"):
        kernel.prefill_attention(q, kv, kv, 1.0, 0)  # more new tokens than context
    with pytest.raises(RuntimeError, match="float32"):
        kernel.prefill_attention(q.bfloat16(), kv, kv, 1.0, 0)
