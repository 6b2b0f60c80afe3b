"""Bad input: a ValueError a user can act on, and the engine still works afterwards."""

from __future__ import annotations

import pytest

from kvtrove import LLM, SamplingParams
from tests.helpers import assert_all_blocks_free


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": -3}, "max_tokens must be >= 1"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"stop": 42}, "stop must be a string or a list of strings"),
        ({"stop": ["ok", 3]}, "stop must be a string or a list of strings"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"n": 0}, "n must be >= 1"),
        ({"logprobs": 100}, "logprobs must be <= 20"),
        ({"min_p": 2.0}, r"min_p must be in \[0, 1\]"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_leave_engine_working(smollm):
    good = SamplingParams(temperature=0, max_tokens=8)
    before = smollm.generate("The capital of France is", good)[0].token_ids
    ctx = smollm.engine.max_model_len
    with pytest.raises(ValueError, match="prompt is empty"):
        smollm.generate("", good)
    with pytest.raises(ValueError, match="prompt is empty"):
        smollm.generate({"prompt_token_ids": []}, good)
    with pytest.raises(ValueError, match=f"prompt has {ctx + 10} tokens; this model's context is {ctx}"):
        smollm.generate({"prompt_token_ids": [42] * (ctx + 10)}, good)
    with pytest.raises(ValueError, match="lower max_tokens"):
        smollm.generate({"prompt_token_ids": [42] * (ctx - 5)}, SamplingParams(max_tokens=50))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm.generate({"prompt_token_ids": [1, 10**9]}, good)
    with pytest.raises(ValueError, match="a prompt is a string"):
        smollm.generate([123], good)
    with pytest.raises(ValueError, match="needs a string .role. and a string .content."):
        smollm.chat([{"role": "user"}], good)
    # a bad prompt in a batch rejects the whole call and leaves nothing queued
    with pytest.raises(ValueError, match="prompt is empty"):
        smollm.generate(["fine prompt", ""], good)
    assert not smollm.engine.has_unfinished()
    assert_all_blocks_free(smollm)
    assert smollm.generate("The capital of France is", good)[0].token_ids == before


def test_bad_engine_options(smollm_path):
    with pytest.raises(ValueError, match="unknown option"):
        LLM(model=smollm_path, blocksize=16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        LLM(model=smollm_path, dtype="float8")
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        LLM(model=smollm_path, block_size=12)
    with pytest.raises(ValueError, match="exceeds this model's context of 8192"):
        LLM(model=smollm_path, max_model_len=100000)


def test_prompt_longer_than_kv_cache(smollm_path):
    llm = LLM(model=smollm_path, num_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="KV cache holds 64"):
        llm.generate({"prompt_token_ids": [42] * 100}, SamplingParams(max_tokens=4))
    out = llm.generate({"prompt_token_ids": [42] * 40}, SamplingParams(max_tokens=4))[0]
    assert len(out.token_ids) == 4
