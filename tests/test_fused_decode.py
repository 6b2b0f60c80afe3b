"""The one-call decode step (engine/fused_decode.py) against the modules it stands in for: the same tokens
and the same log-probabilities, bit for bit, in every shape it covers; the models it does not cover run
the modules."""

from __future__ import annotations

import pytest
import torch

from kvtrove import LLM, SamplingParams

DENSE = ["llama", "llama-bias-headdim", "smollm-tied", "mistral", "qwen2", "qwen3"]


def decode_both_ways(llm: LLM, prompts: list[list[int]], n: int):
    """(tokens, logprobs) per prompt with the fused step, then with the modules, from a cold cache (the
    engine must have no KV store: loading stored blocks would change how the second run is scheduled)."""
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=5)
    runner, results = llm.engine.runner, []
    fused = runner.fused_decode
    assert fused is not None
    for path in (fused, None):
        runner.fused_decode = path
        llm.engine.pool.reset_cache()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        results.append([(o.token_ids, o.logprobs) for o in outs])
    runner.fused_decode = fused
    return results


def engine(path, dtype: str, quantize: str) -> LLM:
    """A small engine with no KV store (see `decode_both_ways`)."""
    return LLM(
        model=str(path), dtype=dtype, quantize=quantize, block_size=16, num_blocks=64, kv_host_gb=0, kv_disk_gb=0
    )


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
@pytest.mark.parametrize("arch", DENSE)
def test_fused_step_equals_the_modules(arch, quantize, tiny_model):
    """Three sequences of different lengths decode together (padded contexts; mistral's window of 48 is
    crossed), with float, int8 and int4 linear layers."""
    llm = engine(tiny_model(arch), "float32", quantize)
    fused, modules = decode_both_ways(llm, prompts([7, 40, 61], seed=3), 24)
    assert fused == modules
    assert all(len(lp) == 24 for _, lp in fused)


def test_default_model_runs_fused_and_equal(smollm_path):
    llm = LLM(model=smollm_path, kv_host_gb=0, kv_disk_gb=0, num_blocks=64)  # quantize=auto: int4 + int8
    fused, modules = decode_both_ways(llm, prompts([30, 90], seed=5), 12)
    assert fused == modules


class Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def covers(self, meta) -> bool:
        return self.inner.covers(meta)

    def __call__(self, *args):
        self.calls += 1
        return self.inner(*args)


def test_every_decode_only_step_runs_fused(tiny_model):
    """The kernels have one arithmetic for any number of tokens, so every decode-only step fuses, however
    many sequences it holds (here 24); steps with a prefill run the modules."""
    llm = LLM(model=str(tiny_model("llama")), dtype="float32", block_size=16, num_blocks=256)
    counting = llm.engine.runner.fused_decode = Counting(llm.engine.runner.fused_decode)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts([5] * 24, seed=7)],
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
    )
    assert all(len(o.token_ids) == 3 for o in outs)
    assert counting.calls == 2  # one prefill step, then two decode steps


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe", "qwen2-moe-32", "qwen3-moe"])
def test_fused_moe_step_equals_the_modules(arch, quantize, tiny_model):
    """Routed experts quantized (their bank), a float router, Qwen2-MoE's gated shared expert: three
    sequences decoding together route each token on its own, as the modules do."""
    llm = engine(tiny_model(arch), "float32", quantize)
    assert llm.engine.runner.fused_decode is not None
    fused, modules = decode_both_ways(llm, prompts([9, 33, 50], seed=4), 16)
    assert fused == modules


@pytest.mark.parametrize("arch, quantize", [("mixtral", "none"), ("qwen3-moe", "none"), ("deepseek-v2", "int4")])
def test_models_it_does_not_cover_run_the_modules(arch, quantize, tiny_model):
    """Float experts have no bank; DeepSeek's MLA attention is not in the stack."""
    llm = LLM(model=str(tiny_model(arch)), dtype="float32", quantize=quantize, block_size=16, num_blocks=64)
    assert llm.engine.runner.fused_decode is None


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_fused_bfloat16_step_equals_the_modules(arch, tiny_model):
    llm = engine(tiny_model(arch), "bfloat16", "none")
    fused, modules = decode_both_ways(llm, prompts([7, 40, 61], seed=3), 16)
    assert fused == modules


def test_quantized_bfloat16_and_no_kernels_run_the_modules(tiny_model):
    """The int8 / int4 kernels take float32 activations; without kernels there is nothing to fuse."""
    path = str(tiny_model("llama"))
    assert engine(path, "bfloat16", "int8").engine.runner.fused_decode is None
    assert LLM(model=path, dtype="float32", cpu_kernels=False, num_blocks=64).engine.runner.fused_decode is None
