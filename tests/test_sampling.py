"""Sampling parameters: seeds, filters, penalties, stops, n, logprobs."""

from __future__ import annotations

import math

import torch

from kvtrove import SamplingParams
from kvtrove.layers.sampler import SamplingBatch, filter_logits, sample
from tests.helpers import assert_all_blocks_free, prompt_logits

PROMPT = "Write a short poem about autumn leaves:"


def test_same_seed_same_output_also_in_a_batch(smollm):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
    alone = smollm.generate(PROMPT, p)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    batch = smollm.generate(["Tell me about cats.", PROMPT, "Why is snow white?"], [others, p, others])
    assert batch[1].token_ids == alone
    other_seed = smollm.generate(PROMPT, SamplingParams(temperature=1.0, seed=99, max_tokens=24, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_top_k_1_is_greedy(smollm):
    greedy = smollm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16))[0]
    topk1 = smollm.generate(PROMPT, SamplingParams(temperature=0.8, top_k=1, seed=3, max_tokens=16))[0]
    assert topk1.token_ids == greedy.token_ids


def test_n_samples(smollm):
    out = smollm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 12 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert_all_blocks_free(smollm)


def test_stop_string_cuts_text(smollm):
    free = smollm.generate("Count: one, two, three, four, five,", SamplingParams(temperature=0, max_tokens=20))[0]
    words = free.text.split(",")
    assert len(words) > 2, free.text
    stop = words[1].strip()
    out = smollm.generate(
        "Count: one, two, three, four, five,", SamplingParams(temperature=0, max_tokens=20, stop=[stop, "zzz-never"])
    )[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text
    assert free.text.startswith(out.text)
    assert_all_blocks_free(smollm)


def test_stop_token_ids_and_max_tokens(smollm):
    free = smollm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    out = smollm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[free.token_ids[3]]))[0]
    assert out.token_ids == free.token_ids[:4] and out.finish_reason == "stop"
    assert_all_blocks_free(smollm)


def test_logprobs_match_log_softmax(smollm):
    tok = smollm.get_tokenizer()
    ids = tok.encode(PROMPT)
    out = smollm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=4, logprobs=3))[0]
    assert len(out.logprobs) == 4
    full = prompt_logits(smollm, ids + out.token_ids).log_softmax(-1)
    for i, (tid, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = full[len(ids) - 1 + i]
        assert tid in lp and len(lp) == 3  # greedy: the sampled token is also the top-1
        assert math.isclose(lp[tid], row[tid].item(), abs_tol=1e-3)
        top = row.topk(3)
        assert sorted(lp) == sorted(top.indices.tolist())


def test_penalties_reduce_repetition(smollm):
    prompt = "Repeat after me: banana banana banana banana banana banana"
    base = smollm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    pen = smollm.generate(
        prompt,
        SamplingParams(
            temperature=0,
            max_tokens=24,
            ignore_eos=True,
            repetition_penalty=1.8,
            frequency_penalty=1.0,
            presence_penalty=1.0,
        ),
    )[0]
    assert len(set(pen.token_ids)) > len(set(base.token_ids))


def _batch(n, **kw):
    fields = dict(
        temperature=torch.ones(n),
        top_k=None,
        top_p=None,
        min_p=None,
        repetition_penalty=None,
        presence_penalty=None,
        frequency_penalty=None,
        seen_mask=None,
        output_counts=None,
        generators=[None] * n,
        num_logprobs=None,
    )
    fields.update(kw)
    return SamplingBatch(**fields)


def test_filters_keep_the_right_support():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda b: torch.isfinite(filter_logits(logits, b))[0].tolist()
    assert kept(_batch(1, top_k=torch.tensor([2]))) == [True, True, False, False]
    assert kept(_batch(1, top_p=torch.tensor([0.8]))) == [True, True, False, False]
    assert kept(_batch(1, top_p=torch.tensor([0.81]))) == [True, True, True, False]
    assert kept(_batch(1, min_p=torch.tensor([0.5]))) == [True, True, False, False]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(2000):
        r = sample(probs.log()[None], _batch(1, generators=[g]))
        counts[r.token_ids[0]] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.04)
