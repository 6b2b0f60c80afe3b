"""Prompt logprobs (`SamplingParams.prompt_logprobs`): each prompt token's logprob given the tokens before it.

Checked against HF transformers on the same weights; the same numbers however the prompt is chunked,
whether it was cached before, and on an engine that blends; bad values refused.
"""

from __future__ import annotations

import pytest
import torch

from kvtrove import LLM, SamplingParams
from tests.helpers import assert_all_blocks_free, run_until_done

TOP = 5


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prompt_logprobs(llm: LLM, ids: list[int]):
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=TOP))[0]
    return out, out.prompt_logprobs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek-v2"])
def test_prompt_logprobs_match_hf(arch, tiny_model):
    from transformers import AutoModelForCausalLM

    path = tiny_model(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(model=str(path), dtype="float32", block_size=16, num_blocks=64)
    ids = prompt(70)
    _, got = prompt_logprobs(llm, ids)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # row p predicts token p + 1
    assert len(got) == len(ids) and got[0] is None
    for p in range(1, len(ids)):
        entry = got[p]
        assert abs(entry[ids[p]] - want[p - 1, ids[p]].item()) <= 1e-3
        top = sorted(entry.values(), reverse=True)[:TOP]  # the top 5, and the prompt token if not among them
        torch.testing.assert_close(torch.tensor(top), want[p - 1].topk(TOP).values, atol=1e-3, rtol=0)
    assert_all_blocks_free(llm)


def test_prompt_logprobs_are_the_same_chunked_cached_or_beside_blending(tiny_model, tmp_path):
    path = tiny_model("llama")
    ids = prompt(90, seed=2)
    base = LLM(model=str(path), dtype="float32", block_size=16, num_blocks=64)
    _, want = prompt_logprobs(base, ids)
    chunked = LLM(model=str(path), dtype="float32", block_size=16, num_blocks=64, max_num_batched_tokens=16)
    _, got = prompt_logprobs(chunked, ids)
    assert got == want
    # cached before (device and store): the prompt is computed again, with the same numbers
    stored = LLM(model=str(path), dtype="float32", block_size=16, num_blocks=64, kv_host_gb=0.1, kv_disk_gb=0)
    stored.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1))
    out, got = prompt_logprobs(stored, ids)
    assert got == want and out.cached_tokens == 0
    # a request without prompt logprobs still reuses what that one computed
    again = stored.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1))[0]
    assert again.cached_tokens > 0 and again.prompt_logprobs is None
    # an engine that blends computes such a prompt exactly
    blending = LLM(
        model=str(path),
        dtype="float32",
        block_size=16,
        num_blocks=64,
        kv_host_gb=0.1,
        kv_disk_gb=0,
        kv_blend=True,
        kv_blend_check_layer=0,
    )
    blending.generate({"prompt_token_ids": [5, *ids[20:]]}, SamplingParams(max_tokens=1))
    out, got = prompt_logprobs(blending, ids)
    assert got == want and out.blended_tokens == 0
    for llm in (base, chunked, stored, blending):
        assert_all_blocks_free(llm)


def test_prompt_logprobs_survive_preemption(tiny_model):
    """A pool too small for every request at once: preempted requests keep the prompt logprobs they had
    and compute the rest, the same numbers as alone."""
    path = tiny_model("llama")
    prompts = [prompt(50, seed=s) for s in range(3, 7)]
    alone = LLM(model=str(path), dtype="float32", block_size=16, num_blocks=64)
    want = [prompt_logprobs(alone, ids)[1] for ids in prompts]
    small = LLM(model=str(path), dtype="float32", block_size=16, num_blocks=12, max_num_batched_tokens=32)
    eng = small.engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=TOP)
    ids = [eng.add_request({"prompt_token_ids": p}, params) for p in prompts]
    reqs = [r for i in ids for r in eng.groups[i]]
    done = run_until_done(eng)
    assert sum(r.num_preemptions for r in reqs) > 0, "the pool was meant to be too small for all at once"
    assert [done[i].prompt_logprobs for i in ids] == want
    assert_all_blocks_free(small)


@pytest.mark.parametrize("bad", [-1, 21, 1.5, "3", True])
def test_bad_prompt_logprobs_are_refused(bad):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)
