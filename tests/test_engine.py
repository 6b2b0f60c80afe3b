"""Scheduler, block pool and prefix cache behaviour on the real default model."""

from __future__ import annotations

import pytest

from kvtrove import LLM, SamplingParams
from tests.helpers import assert_all_blocks_free, run_until_done

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Three primary colors are",
    "Once upon a time, in a small village,",
    "The quick brown fox",
    "Water boils at a temperature of",
    "List three uses of a paperclip:",
]


def test_batch_equals_alone(smollm):
    alone = [smollm.generate(p, GREEDY)[0].token_ids for p in PROMPTS]
    smollm.engine.pool.reset_cache()
    batch = [o.token_ids for o in smollm.generate(PROMPTS, GREEDY)]
    assert batch == alone
    assert_all_blocks_free(smollm)


def test_repeat_prompt_is_cached(smollm):
    prompt = "Explain in one paragraph why the sky is blue. " * 6
    first = smollm.generate(prompt, GREEDY)[0]
    second = smollm.generate(prompt, GREEDY)[0]
    assert second.token_ids == first.token_ids
    bs = smollm.engine.config.cache.block_size
    assert second.cached_tokens == (first.prompt_tokens - 1) // bs * bs > 0
    assert second.ttft_s is not None and first.ttft_s is not None
    assert_all_blocks_free(smollm)


def test_cached_prefix_with_different_suffix(smollm):
    base = "Here is a long shared system preamble about tea, kettles and cups. " * 5
    a = smollm.generate(base + "Question one: what is tea?", GREEDY)[0]
    b = smollm.generate(base + "Question two: what is a kettle?", GREEDY)[0]
    assert b.cached_tokens >= 48
    smollm.engine.flush_kv()  # the device's blocks written back to the store (host tier), then forgotten
    smollm.engine.pool.reset_cache()
    b_again = smollm.generate(base + "Question two: what is a kettle?", GREEDY)[0]
    assert b_again.token_ids == b.token_ids
    assert b_again.cached_tokens_by_tier["device"] == 0
    assert b_again.cached_tokens_by_tier["host"] == (b.prompt_tokens - 1) // 16 * 16 >= b.cached_tokens
    assert a.prompt_tokens > 0


@pytest.fixture(scope="module")
def small_pool(smollm_path):
    """Few blocks and a small step budget: forces chunked prefill and preemption."""
    return LLM(model=smollm_path, num_blocks=24, block_size=16, max_num_batched_tokens=64, max_num_seqs=8)


def test_chunked_prefill_and_preemption_match_unconstrained(smollm, small_pool):
    prompts = [p + " Please answer in detail." * 3 for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = [o.token_ids for o in smollm.generate(prompts, params)]
    got = small_pool.generate(prompts, params)
    assert [o.token_ids for o in got] == want
    assert_all_blocks_free(small_pool)


def test_preemption_happens_and_frees_blocks(small_pool):
    eng = small_pool.engine
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in PROMPTS]
    reqs = [r for i in ids for r in eng.groups[i]]
    done = run_until_done(eng)
    assert len(done) == len(PROMPTS)
    assert sum(r.num_preemptions for r in reqs) > 0, "the pool was meant to be too small for all at once"
    assert all(len(o.token_ids) == 60 for o in done.values())
    assert_all_blocks_free(small_pool)


def test_abort_frees_blocks(smollm):
    eng = smollm.engine
    rid = eng.add_request("Tell me a very long story about dragons.", SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.pool.num_free_blocks < eng.pool.num_blocks
    eng.abort_request(rid)
    assert_all_blocks_free(smollm)


def test_stream_closed_early_aborts(smollm):
    it = smollm.stream("Count from one to one hundred:", SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    chunks = [next(it) for _ in range(5)]
    it.close()
    assert all(not c.finished for c in chunks)
    assert_all_blocks_free(smollm)


def test_stream_deltas_add_up(smollm):
    params = SamplingParams(temperature=0, max_tokens=30)
    outs = list(smollm.stream("The three largest planets are", params))
    assert outs[-1].finished
    assert "".join(o.outputs[0].delta_text for o in outs) == outs[-1].text
    assert sum(len(o.outputs[0].delta_token_ids) for o in outs) == len(outs[-1].token_ids)
    assert outs[-1].text == smollm.generate("The three largest planets are", params)[0].text


def test_chat_uses_template_and_answers(smollm):
    out = smollm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=32)
    )[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_prefix_caching_off(smollm_path):
    llm = LLM(model=smollm_path, enable_prefix_caching=False, num_blocks=64)
    prompt = "A sentence that repeats. " * 10
    a, b = llm.generate([prompt], GREEDY)[0], llm.generate([prompt], GREEDY)[0]
    assert a.token_ids == b.token_ids and b.cached_tokens == 0
    assert_all_blocks_free(llm)


def test_failure_mid_generate_leaves_engine_clean(smollm, monkeypatch):
    want = smollm.generate(PROMPTS[0], GREEDY)[0].token_ids
    orig = smollm.engine.runner.execute
    calls = []

    def flaky(batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected fault")
        return orig(batch)

    monkeypatch.setattr(smollm.engine.runner, "execute", flaky)
    with pytest.raises(RuntimeError, match="injected fault"):
        smollm.generate(PROMPTS[:3], GREEDY)
    monkeypatch.undo()
    assert_all_blocks_free(smollm)
    assert smollm.generate(PROMPTS[0], GREEDY)[0].token_ids == want
