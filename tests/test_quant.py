"""Weight-only int8 / int4 linear layers against their float reference, and SmolLM2 quantized at load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvtrove import LLM, SamplingParams
from kvtrove.layers.kernels import cpu_kernels
from kvtrove.layers.quant import (
    Int4Linear,
    Int8Linear,
    int4_parts,
    int8_parts,
    pack_int4,
    pack_int8,
    unpack_int4,
    unpack_int8,
)
from kvtrove.placement import plan
from tests.helpers import assert_all_blocks_free, prompt_logits

LICENSE = Path("/usr/share/common-licenses/Apache-2.0")
TEXT = LICENSE if LICENSE.exists() else Path(__file__).parent.parent / "README.md"


def _layer_error(layer, w, b, x) -> float:
    ref = F.linear(x, w, b)
    return ((layer(x) - ref).norm() / ref.norm()).item()


def _exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (96, 64), (40, 48)])
def test_int8_layer_is_close_to_float(shape):
    torch.manual_seed(0)
    w, b = torch.randn(shape) * 0.05, torch.randn(shape[0])
    layer = Int8Linear(w, b, cpu_kernels())
    assert layer.kernels is not None, "the C++ kernels did not build"
    plain = Int8Linear(w, b)  # no kernels: the dequantized weight and F.linear
    groups = -(-shape[1] // 32)  # a scale per 32 along the input: max|w| / 127
    g = torch.nn.functional.pad(w, (0, groups * 32 - shape[1])).view(shape[0], groups, 32)
    scale = (g.abs().amax(-1) / 127).repeat_interleave(32, 1)[:, : shape[1]]
    assert ((layer.dequantized() - w).abs() <= scale / 2 + 1e-7).all()
    for tokens in (1, 7, 16, 64):
        x = torch.randn(tokens, shape[1])
        exact = _exact(x, layer.dequantized(), b)  # float32 activations on the stored weights
        torch.testing.assert_close(layer(x).double(), exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(x), layer(x), rtol=1e-5, atol=1e-5)
        assert _layer_error(layer, w, b, x) < 0.01  # 8-bit weights
    assert layer(torch.randn(2, 3, shape[1])).shape == (2, 3, shape[0])
    rows = torch.randn(24, shape[1])
    alone = torch.cat([layer(r[None]) for r in rows])
    for m in (2, 5, 16, 24):  # a decode batch (weights expanded once per few tokens) and a prefill
        assert torch.equal(layer(rows[:m]), alone[:m])  # a token alone = batched = in a prefill, bit for bit


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_layer_is_close_to_float(group):
    torch.manual_seed(0)
    w, b = torch.randn(1536, 1024) * 0.05, None
    layer = Int4Linear(w, b, group, cpu_kernels())
    assert layer.kernels is not None, "the C++ kernels did not build"
    deq = layer.dequantized()
    g = w.view(1536, -1, group)  # within half a step (the group's range / 15); scales are float32
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(group, 1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    plain = Int4Linear(w, torch.ones(1536), group)  # no kernels: the dequantized weight and F.linear
    for tokens in (1, 3, 5, 16, 40):
        x = torch.randn(tokens, 1024)
        got = layer(x)
        torch.testing.assert_close(got.double(), _exact(x, deq, None), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(x), got + 1, rtol=1e-5, atol=1e-5)
        assert _layer_error(layer, w, b, x) < {32: 0.08, 64: 0.1, 128: 0.12}[group]
    rows = torch.randn(40, 1, 1024)
    alone = torch.cat([layer(r) for r in rows])
    for m in (2, 7, 16, 40):  # a decode batch (weights expanded once per few tokens) and a prefill
        assert torch.equal(layer(rows[:m, 0]), alone[:m])  # a token alone = batched = in a prefill, bit for bit


def test_bad_quantization_options():
    with pytest.raises(ValueError, match="multiple of the group size"):
        Int4Linear(torch.randn(8, 48), None, 32)
    with pytest.raises(ValueError, match="group size"):
        Int4Linear(torch.randn(8, 64), None, 48)
    with pytest.raises(ValueError, match="quantize must be one of"):
        LLM(model="unused.gguf", quantize="int3")
    with pytest.raises(ValueError, match="quantize_group_size"):
        LLM(model="unused.gguf", quantize="int4", quantize_group_size=100)
    model = torch.nn.Sequential(torch.nn.Linear(48, 8), torch.nn.Linear(8, 64))
    plan.apply(model, plan.plan(model, None, "int4", 32), 32)  # 48 and 8 inputs do not fit groups of 32: int8
    assert all(isinstance(m, Int8Linear) for m in model)
    head = torch.nn.ModuleDict({"lm_head": torch.nn.Linear(64, 16), "proj": torch.nn.Linear(64, 16)})
    plan.apply(head, plan.plan(head, None, "int4", 32), 32)
    assert isinstance(head["lm_head"], Int8Linear) and isinstance(head["proj"], Int4Linear)


def _nll(llm: LLM, ids: list[int]) -> float:
    logits = prompt_logits(llm, ids).float()
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()


@pytest.fixture(scope="module")
def text_ids(smollm_path):
    llm = LLM(model=smollm_path, quantize="none", num_blocks=64, kv_host_gb=0, kv_disk_gb=0)
    ids = llm.engine.tokenizer(TEXT.read_text())["input_ids"][:768]
    return ids, _nll(llm, ids), llm.engine.fingerprint


@pytest.mark.parametrize("scheme,bound", [("int8", 1.02), ("int4", 1.08), ("auto", 1.02)])
def test_smollm_quantized_nll_and_answers(smollm_path, text_ids, scheme, bound):
    ids, float_nll, float_fingerprint = text_ids
    llm = LLM(model=smollm_path, quantize=scheme, num_blocks=64, kv_host_gb=0, kv_disk_gb=0)
    assert llm.engine.fingerprint != float_fingerprint  # its KV is never mixed with the float model's
    nll = _nll(llm, ids)
    assert nll <= float_nll * bound, f"{scheme} NLL {nll:.4f} vs float {float_nll:.4f}"
    greedy = SamplingParams(temperature=0, max_tokens=16)  # the float model's answers
    for question, answer in (
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Germany?", "Berlin"),
        ("What is 2 + 2?", "4"),
    ):
        out = llm.chat([{"role": "user", "content": question}], greedy)[0]
        assert answer in out.text, (scheme, question, out.text)


# gate * up then down: three projections' errors compound (int4 on Gaussian weights is ~8% per layer)
@pytest.mark.parametrize("scheme,bound", [("int8", 0.02), ("int4", 0.2)])
def test_quantized_experts_are_close_to_float(scheme, bound):
    from kvtrove.layers.quant import QuantizedExperts
    from kvtrove.models.moe import Experts

    torch.manual_seed(0)
    experts = Experts(8, 64, 96, 2, ("gate_proj", "up_proj", "down_proj"))
    experts.w13.data.normal_(0, 0.05)
    experts.w2.data.normal_(0, 0.05)
    x = torch.randn(20, 64)
    weights, chosen = torch.randn(20, 8).softmax(-1).topk(2)
    ref = experts(x, weights, chosen)
    got = QuantizedExperts(experts, scheme, 32, cpu_kernels())(x, weights, chosen)
    assert ((got - ref).norm() / ref.norm()).item() < bound


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("hidden, inter", [(64, 96), (96, 160)])  # 2 / 3 / 5 groups of 32: unpaired tails
def test_expert_bank_equals_the_expert_modules(scheme, hidden, inter):
    """A decode token through the C++ expert bank: bit for bit what the per-expert modules give."""
    from kvtrove.layers.quant import QuantizedExperts
    from kvtrove.models.moe import Experts

    torch.manual_seed(1)
    experts = Experts(8, hidden, inter, 3, ("gate_proj", "up_proj", "down_proj"))
    experts.w13.data.normal_(0, 0.05)
    experts.w2.data.normal_(0, 0.05)
    q = QuantizedExperts(experts, scheme, 32, cpu_kernels())
    assert q.bank is not None
    bank = q.bank
    for _ in range(10):
        x = torch.randn(1, hidden)
        weights, chosen = torch.randn(1, 8).softmax(-1).topk(3)
        q.bank = bank
        got = q(x, weights, chosen)
        q.bank = None
        assert torch.equal(got, q(x, weights, chosen))
    with pytest.raises(RuntimeError, match="out of range"):
        bank.forward(x, [0, 8, 1], weights[0])
    xs = torch.randn(5, hidden)  # a batch of decode tokens (grouped per expert): each row as if alone
    weights, chosen = torch.randn(5, 8).softmax(-1).topk(3)
    q.bank = bank
    together = q(xs, weights, chosen)
    for t in range(5):
        assert torch.equal(together[t : t + 1], q(xs[t : t + 1], weights[t : t + 1], chosen[t : t + 1]))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3"])
def test_moe_model_quantized_end_to_end(tiny_model, arch):
    from kvtrove.layers.quant import QuantizedExperts

    llm = LLM(model=str(tiny_model(arch)), quantize="int4", num_blocks=16, kv_host_gb=0, kv_disk_gb=0)
    mlps = [layer.mlp for layer in llm.engine.model.model.layers if hasattr(layer.mlp, "experts")]
    assert mlps and all(isinstance(m.experts, QuantizedExperts) for m in mlps)
    assert not any(isinstance(m.gate, Int8Linear | Int4Linear) for m in mlps)  # routers stay float
    outs = llm.generate(["one two three", "four five"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in outs)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("k", [32, 96, 160, 224, 256])  # 1, 3, 5, 7, 8 groups: paired, unpaired tails
def test_kernels_on_odd_group_counts(k):
    torch.manual_seed(k)
    w = torch.randn(40, k) * 0.05
    for layer in (Int4Linear(w, None, 32, cpu_kernels()), Int8Linear(w, None, cpu_kernels())):
        assert layer.kernels is not None, "the C++ kernels did not build"
        deq = layer.dequantized()
        for tokens in range(1, 7):
            x = torch.randn(tokens, k)
            torch.testing.assert_close(layer(x).double(), _exact(x, deq, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, k", [(1, 32), (8, 64), (13, 96), (40, 48), (17, 40)])  # partial panels, short groups
def test_packed_panels_unpack_to_themselves(n, k):
    torch.manual_seed(n * k)
    w = torch.randn(n, k)
    parts8 = int8_parts(w)
    packed8 = pack_int8(*parts8)
    assert packed8.shape == (-(-n // 8), -(-k // 32), 288) and packed8.dtype == torch.int8
    assert all(torch.equal(a, b) for a, b in zip(unpack_int8(packed8, n, k), parts8))
    if k % 32 == 0:
        parts4 = int4_parts(w, 32)
        packed4 = pack_int4(*parts4)
        assert packed4.shape == (-(-n // 8), k // 32, 192) and packed4.dtype == torch.uint8
        assert all(torch.equal(a, b) for a, b in zip(unpack_int4(packed4, n), parts4))
        # the module keeps only the panels, and gives the same weights back
        layer = Int4Linear(w, None, 32, cpu_kernels())
        assert torch.equal(layer.dequantized(), Int4Linear(w, None, 32).dequantized())


def test_quantized_kernels_reject_bad_panels():
    kernels = cpu_kernels()
    assert kernels is not None, "the C++ kernels did not build"
    w = torch.randn(20, 64)
    packed4 = pack_int4(*int4_parts(w, 32))
    packed8 = pack_int8(*int8_parts(w))
    with pytest.raises(RuntimeError, match="3 panels cannot hold 25 outputs"):
        kernels.q4_linear(torch.randn(2, 64), packed4, 25)
    with pytest.raises(RuntimeError, match="2 groups do not fit 96 inputs"):
        kernels.q8_linear(torch.randn(2, 96), packed8, 20)
    with pytest.raises(RuntimeError, match="uint8 panels"):
        kernels.q4_linear(torch.randn(2, 64), packed8, 20)
    with pytest.raises(RuntimeError, match="x \\[M, K\\] expected"):
        kernels.q8_linear(torch.randn(64), packed8, 20)
