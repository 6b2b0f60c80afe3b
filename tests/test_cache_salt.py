"""Tenancy (`SamplingParams.cache_salt`): a salted request's KV is found only under its salt, on the
device, in the store, and as blending's segment windows; outputs never change."""

from __future__ import annotations

import pytest

from kvtrove import LLM, SamplingParams
from kvtrove.kv.keys import chain_keys, salted_root
from tests.helpers import assert_all_blocks_free
from tests.test_invariance import make_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def salted(salt: str | None, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, cache_salt=salt, **kw)


def test_salts_never_share_a_block(tiny_model, tmp_path):
    path = tiny_model("llama")
    ids = {"prompt_token_ids": make_prompts(49152, [100], 7)[0]}
    llm = LLM(model=str(path), block_size=16, num_blocks=64, kv_host_gb=0.1, kv_disk_dir=str(tmp_path), kv_disk_gb=1)
    want = llm.generate(ids, GREEDY)[0]
    a = llm.generate(ids, salted("tenant-a"))[0]
    assert a.cached_tokens == 0 and a.token_ids == want.token_ids  # the unsalted blocks are not its
    again = llm.generate(ids, salted("tenant-a"))[0]
    assert again.cached_tokens == 96 and again.token_ids == want.token_ids  # its own are
    b = llm.generate(ids, salted("tenant-b"))[0]
    assert b.cached_tokens == 0 and b.token_ids == want.token_ids
    assert llm.generate(ids, GREEDY)[0].cached_tokens == 96  # unsalted requests still share theirs
    llm.close()
    # after a restart, from disk: the same separation
    llm = LLM(model=str(path), block_size=16, num_blocks=64, kv_host_gb=0.1, kv_disk_dir=str(tmp_path), kv_disk_gb=1)
    assert llm.generate(ids, salted("tenant-a"))[0].cached_tokens_by_tier["disk"] == 96
    assert llm.generate(ids, salted("tenant-c"))[0].cached_tokens == 0
    fp = llm.engine.fingerprint
    root = salted_root(fp, "tenant-a")
    assert root != fp and salted_root(fp, None) == fp
    assert set(chain_keys(root, ids["prompt_token_ids"], 16)).isdisjoint(chain_keys(fp, ids["prompt_token_ids"], 16))
    assert_all_blocks_free(llm)


def test_salts_separate_blending_windows(tiny_model, tmp_path):
    path = tiny_model("llama")
    doc = make_prompts(49152, [80], 8)[0]
    llm = LLM(
        model=str(path), block_size=16, num_blocks=128, kv_host_gb=0.25, kv_disk_gb=0, kv_blend=True, kv_blend_check_layer=0
    )
    llm.generate({"prompt_token_ids": [5, *make_prompts(49152, [30], 9)[0], *doc]}, salted("tenant-a"))
    second = {"prompt_token_ids": [5, *make_prompts(49152, [23], 10)[0], *doc, 7, 8]}
    assert llm.generate(second, salted("tenant-b"))[0].blended_tokens == 0
    assert llm.generate(second, salted("tenant-a"))[0].blended_tokens > 0


@pytest.mark.parametrize("bad", ["", 5, b"x"])
def test_bad_salts_are_refused(bad):
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt=bad)
