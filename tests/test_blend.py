"""Blending (`engine.blend`): stored KV of known text reused at new positions, with a selective recompute.

Checked: re-rotation for every RoPE type the models use; ratio 1 gives bitwise the full prefill's logits;
ratio 0 keeps the loaded KV (and layer 0, whose KV has no context, equals a fresh computation at the new
position, for every architecture, MLA included); a passage pasted at another offset, with other text
around it, is found and blended; blended KV never becomes an exact-prefix entry; bad input is refused.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from kvtrove import LLM, SamplingParams
from kvtrove.engine import blend
from kvtrove.layers.rotary import RotaryEmbedding, apply_rotary
from tests.conftest import ARCHS
from tests.helpers import assert_all_blocks_free, prompt_logits
from tests.test_invariance import LogitsTap, make_prompts

TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
VOCAB = 49152


def blend_engine(path, tmp_path, **kw) -> LLM:
    kw.setdefault("kv_blend_check_layer", 0)  # the tiny models have 2 layers
    kw.setdefault("kv_host_gb", 0.25)
    return LLM(model=str(path), block_size=16, num_blocks=128, kv_disk_gb=0, **kw)


def logits(llm: LLM, prompt: list[int], params: SamplingParams = GREEDY):
    tap = llm._tap if hasattr(llm, "_tap") else LogitsTap(llm)
    llm._tap = tap
    out = llm.generate({"prompt_token_ids": prompt}, params)[0]
    return out, torch.stack(tap.rows.pop(tuple(prompt)))


ROPES = {
    "default": {},
    "linear": ARCHS["llama-rope-linear"][1],
    "llama3": ARCHS["llama-rope-llama3"][1],
    "yarn": {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    },
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rerotation_moves_keys_to_new_positions(rope):
    cfg = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=4, max_position_embeddings=4096, **ROPES[rope]
    )
    rot = RotaryEmbedding(cfg, 64, 4096, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, 64, generator=g)  # [tokens, heads, dim]
    p = torch.arange(100, 140)
    for d in (-100, 7, 1000, 3000):
        at_p = apply_rotary(x, *rot(p))
        moved = rot.rerotate(at_p.transpose(0, 1), torch.full((40,), d)).transpose(0, 1)
        direct = apply_rotary(x, *rot(p + d))
        torch.testing.assert_close(moved, direct, atol=2e-3 * x.abs().max().item(), rtol=0)


def passage(seed: int, n: int) -> list[int]:
    return make_prompts(VOCAB, [n], seed)[0]


def test_ratio_one_equals_full_prefill_bitwise(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(blend, "WORTH_BELOW", 2.0)  # blend although recomputing everything gains nothing
    path = tiny_model("llama")
    doc = passage(1, 96)
    first = [5, *passage(2, 37), *doc, *passage(3, 11)]
    second = [5, *passage(4, 21), *doc, *passage(5, 19)]  # the document at another offset
    plain = LLM(model=str(path), block_size=16, num_blocks=128, kv_host_gb=0, kv_disk_gb=0)
    _, want = logits(plain, second)
    llm = blend_engine(path, tmp_path, kv_blend=True, kv_blend_ratio=1.0)
    logits(llm, first)
    out, got = logits(llm, second)
    assert out.blend_recomputed_tokens > 0 and out.blended_tokens == 0
    assert torch.equal(got, want)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "deepseek-v2"])
def test_ratio_zero_reuses_loaded_kv_and_layer_zero_matches_fresh(arch, tiny_model, tmp_path):
    path = tiny_model(arch)
    doc = passage(11, 80)
    first = [5, *passage(12, 40), *doc, *passage(13, 9)]
    offset = 1 + 23
    second = [5, *passage(14, 23), *doc, *passage(15, 30)]
    llm = blend_engine(path, tmp_path, kv_blend=True, kv_blend_ratio=0.0, kv_blend_head_tokens=0)
    logits(llm, first)
    eng = llm.engine
    eng.pool.reset_cache()
    captured = {}
    blend = eng.runner._blend

    def keep(req, n):  # the KV of the second prompt right after its blended step
        row = blend(req, n)
        slots = eng.runner._slots(req, len(req.prompt_token_ids))
        captured["kv"] = eng.runner.kv_cache.index_select(3, slots).clone()
        captured["covered"] = req.blend_covered.clone()
        return row

    eng.runner._blend = keep
    out = llm.generate({"prompt_token_ids": second}, GREEDY)[0]
    covered = captured["covered"]
    assert out.blended_tokens == len(covered) >= 64 and out.blend_recomputed_tokens == 0
    assert covered.min() >= offset and covered.max() < offset + len(doc)
    # layer 0's KV depends only on the token and its position: the loaded, re-rotated KV equals a fresh one
    plain = LLM(model=str(path), block_size=16, num_blocks=128, kv_host_gb=0, kv_disk_gb=0)
    prompt_logits(plain, second)  # a fresh prefill into slots 0..
    fresh = plain.engine.runner.kv_cache[:, :, :, : len(second)]
    kv = captured["kv"]
    torch.testing.assert_close(kv[0][:, :, covered], fresh[0][:, :, covered], atol=1e-4, rtol=1e-4)
    # and at the last layer the covered tokens keep what was loaded: not what a fresh prefill computes
    assert not torch.allclose(kv[-1][:, :, covered], fresh[-1][:, :, covered], atol=1e-4)


def test_head_tokens_of_a_run_are_recomputed_at_every_layer(tiny_model, tmp_path):
    """The first kv_blend_head_tokens of a found run are recomputed at every layer: with exact text before
    them, their KV is a full prefill's, bitwise, at every layer; the tokens after them keep loaded KV."""
    path = tiny_model("llama")
    doc = passage(21, 80)
    llm = blend_engine(path, tmp_path, kv_blend=True, kv_blend_ratio=0.0, kv_blend_head_tokens=3)
    logits(llm, [5, *passage(22, 40), *doc, *passage(23, 9)])
    second = [5, *passage(24, 23), *doc, *passage(25, 30)]
    eng = llm.engine
    eng.pool.reset_cache()
    captured = {}
    run = eng.runner._blend

    def keep(req, n):
        row = run(req, n)
        captured["kv"] = eng.runner.kv_cache.index_select(3, eng.runner._slots(req, len(second))).clone()
        captured["covered"] = req.blend_covered.clone()
        return row

    eng.runner._blend = keep
    out = llm.generate({"prompt_token_ids": second}, GREEDY)[0]
    covered = captured["covered"]
    assert out.blend_recomputed_tokens == 3 and out.blended_tokens == len(covered) - 3
    plain = LLM(model=str(path), block_size=16, num_blocks=128, kv_host_gb=0, kv_disk_gb=0)
    prompt_logits(plain, second)
    fresh = plain.engine.runner.kv_cache[:, :, :, : len(second)]
    heads, after = covered[:3], covered[3:]
    assert torch.equal(captured["kv"][:, :, :, heads], fresh[:, :, :, heads])
    assert not torch.allclose(captured["kv"][-1][:, :, after], fresh[-1][:, :, after], atol=1e-4)


def test_pasted_passage_is_found_and_unknown_text_prefilled(smollm_path, tmp_path):
    llm = LLM(
        model=smollm_path, num_blocks=256, kv_host_gb=0.25, kv_disk_gb=0, kv_blend=True, max_num_batched_tokens=4096
    )
    tok = llm.get_tokenizer()
    text = (
        "The lighthouse keeper of Varnholm kept a ledger of every ship that passed the strait, and in the "
        "winter of the long storms he wrote that the harbour bell rang by itself on three nights. The "
        "fishermen said the bell was warning them of ice, and the keeper noted that no boat went out on "
        "those nights. In spring the ice broke and the strait was open again by the second week of April, "
        "when the first merchant ship from the south arrived with salt, rope and news from the mainland."
    )
    first = llm.generate(f"Read this: {text}\nSummarize it.", GREEDY)[0]
    assert first.blended_tokens == 0
    # the same passage pasted mid-sentence, so its first and last tokens are tokenized differently
    second_prompt = f"My friend sent me a story,{text}and asked what the keeper saw. Tell me."
    second = llm.generate(second_prompt, GREEDY)[0]
    n_text = len(tok.encode(text, add_special_tokens=False))
    assert second.blended_tokens + second.blend_recomputed_tokens >= n_text - 2 * 16 - 4
    # text never seen: prefilled as usual, same tokens as with blending off
    novel = "A completely different prompt about gardening: tomatoes need sun, water and patience to grow well."
    got = llm.generate(novel, GREEDY)[0]
    plain = LLM(model=smollm_path, num_blocks=256, kv_host_gb=0, kv_disk_gb=0)
    assert got.blended_tokens == 0 and got.token_ids == plain.generate(novel, GREEDY)[0].token_ids
    assert_all_blocks_free(llm)


def test_blended_kv_never_becomes_an_exact_prefix(tiny_model, tmp_path):
    path = tiny_model("llama")
    doc = passage(21, 96)
    first = [5, *passage(22, 30), *doc]
    second = [5, *passage(23, 18), *doc, *passage(24, 10)]
    llm = blend_engine(path, tmp_path, kv_blend=True, kv_blend_ratio=0.0)
    logits(llm, first)
    out, _ = logits(llm, second)
    assert out.blended_tokens > 0
    # the same prompt again, exact: it may reuse only what was exact (nothing after the shared first token)
    exact, got = logits(llm, second, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, kv_blend=False))
    plain = LLM(model=str(path), block_size=16, num_blocks=128, kv_host_gb=0, kv_disk_gb=0)
    _, want = logits(plain, second)
    assert exact.blended_tokens == 0 and torch.equal(got, want)
    llm.engine.flush_kv()
    llm.engine.pool.reset_cache()
    again, got = logits(llm, second, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, kv_blend=False))
    assert torch.equal(got, want)


def test_explicit_segments_in_any_order(tiny_model, tmp_path):
    path = tiny_model("llama")
    llm = blend_engine(path, tmp_path, kv_blend=True, kv_blend_ratio=0.15)
    a, b, c = passage(31, 70), passage(32, 50), passage(33, 41)
    first = llm.generate({"segments": [a, b, c, [7, 8, 9]]}, GREEDY)[0]
    lead = llm.get_tokenizer().encode("", add_special_tokens=True)  # the tokenizer's BOS, if it adds one
    assert first.prompt_token_ids == [*lead, *a, *b, *c, 7, 8, 9]
    second = llm.generate({"segments": [c, a, b, [10, 11]]}, GREEDY)[0]
    # every whole window of each segment, counted from the segment's own start
    assert second.blended_tokens + second.blend_recomputed_tokens == 16 * (70 // 16 + 50 // 16 + 41 // 16)
    assert second.blend_recomputed_tokens > 0


@pytest.mark.parametrize(
    "prompt, match",
    [
        ({"segments": []}, "non-empty list"),
        ({"segments": "text"}, "non-empty list"),
        ({"segments": ["ok", 3]}, "segment 1 must be a string"),
        ({"segments": ["ok", ""]}, "segment 1 is empty"),
        ({"segments": [[1, 2], [-1]]}, "outside the vocabulary"),
        ({"segments": [[1, 2] * 300]}, "exceeds|context"),
    ],
)
def test_bad_segments_are_refused(tiny_model, tmp_path, prompt, match):
    llm = blend_engine(tiny_model("llama"), tmp_path, kv_blend=True)
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, GREEDY)
    assert_all_blocks_free(llm)


def test_blend_options_are_validated(tiny_model, tmp_path):
    path = tiny_model("llama")
    bad_options = ({"kv_blend_ratio": 1.5}, {"kv_blend_ratio": "x"}, {"kv_blend_check_layer": -1}, {"kv_blend_head_tokens": 1.5})
    for bad in bad_options:
        with pytest.raises(ValueError, match="kv_blend"):
            SamplingParams(**bad)
    for layer in (1, 5):  # the tiny model has layers 0-1: a check layer must leave one after it
        with pytest.raises(ValueError, match="leaves no layer after it"):
            blend_engine(path, tmp_path, kv_blend=True, kv_blend_check_layer=layer)
    with pytest.raises(ValueError, match="needs the KV store"):
        LLM(model=str(path), num_blocks=64, kv_host_gb=0, kv_disk_gb=0, kv_blend=True)


FACTS = [
    ("name of the lighthouse keeper", "Ilse"),
    ("colour of the harbour bell", "green"),
    ("number of bridges in Varnholm", "seven"),
    ("cargo of the first ship in spring", "salt"),
    ("name of the mayor's dog", "Pepper"),
    ("river that floods in March", "Oster"),
    ("day the market opens", "Thursday"),
    ("bird painted on the inn's sign", "heron"),
    ("metal of the church roof", "copper"),
    ("fruit grown on the south hill", "quince"),
]


def license_passages(tok, tokens: int) -> list[str]:
    """A passage of about `tokens` tokens of local license text per fact, the fact planted in its middle."""
    from pathlib import Path

    files = sorted(p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file())
    ids = tok.encode(" ".join(" ".join(p.read_text(errors="ignore").split()) for p in files), add_special_tokens=False)
    out = []
    for k, (what, value) in enumerate(FACTS):
        body = tok.decode(ids[(3 * k + 1) * tokens : (3 * k + 2) * tokens])
        cut = len(body) // 2
        out.append(f"{body[:cut]} The {what} is {value}. {body[cut:]}\n")
    return out


def answer_word(text: str) -> str:
    """The answer of "The X is Y." (else the text's start), lower-cased."""
    import re

    m = re.search(r"\bis\W+(\w+)", text)
    return m.group(1).lower() if m else text.strip()[:12].lower()


def test_rag_answers_agree_with_full_prefill(smollm_path, tmp_path, monkeypatch):
    """Chat questions whose answer is in one of 3-5 shuffled passages of license text (each a text part of
    the message): blending at 0.15 gives the full prefill's greedy answer on >= 85%; naive reuse (ratio 0)
    agrees less or with a larger first-token KL; the curve over ratios is printed."""
    import random

    monkeypatch.setattr(blend, "WORTH_BELOW", 2.0)  # ratio 1 too runs the blended step
    full = LLM(model=smollm_path, num_blocks=512, enable_prefix_caching=False)
    llm = LLM(model=smollm_path, num_blocks=512, kv_host_gb=0.5, kv_disk_gb=0, kv_blend=True)
    pool = license_passages(llm.get_tokenizer(), 120)

    def chat(texts: list[str]) -> dict:
        return llm.chat_prompt([{"role": "user", "content": [{"type": "text", "text": t} for t in texts]}])

    for start in range(0, len(pool), 5):  # the store sees every passage once
        llm.generate(chat([*pool[start : start + 5], "Which passage is first?"]), SamplingParams(max_tokens=1))
    rng = random.Random(0)
    ratios = [0.0, 0.05, 0.15, 0.3, 1.0]
    agree = dict.fromkeys(ratios, 0)
    kl = {r: [] for r in ratios}
    questions = 20
    for _ in range(questions):
        picked = rng.sample(range(len(pool)), rng.randint(3, 5))
        k = rng.choice(picked)
        prompt = chat([*[pool[i] for i in picked], f"What is the {FACTS[k][0]}?"])
        want = full.generate(prompt, SamplingParams(temperature=0, max_tokens=12, logprobs=20))[0]
        for r in ratios:
            naive = {"kv_blend_head_tokens": 0} if r == 0 else {}  # ratio 0 and no head tokens: plain reuse
            params = SamplingParams(temperature=0, max_tokens=12, logprobs=20, kv_blend_ratio=r, **naive)
            got = llm.generate(prompt, params)[0]
            assert got.blended_tokens + got.blend_recomputed_tokens > 0.5 * got.prompt_tokens
            agree[r] += answer_word(got.text) == answer_word(want.text)
            p, q = want.logprobs[0], got.logprobs[0]  # the first token: KL over the reference's top 20
            kl[r].append(sum(torch.exp(torch.tensor(v)) * (v - q.get(t, min(q.values()))) for t, v in p.items()).item())
    curve = {r: (agree[r] / questions, sum(kl[r]) / questions) for r in ratios}
    print("ratio -> (answers agreeing with full prefill, first-token KL over its top 20):", curve)
    assert curve[1.0] == (1.0, 0.0)
    assert curve[0.15][0] >= 0.85, curve
    assert curve[0.0][0] < curve[0.15][0] or curve[0.0][1] > curve[0.15][1], curve


def test_reuse_does_not_decay_as_the_store_fills(tiny_model, tmp_path):
    """A long stream of queries over a fixed pool of passages, in a host tier that fills and evicts: the
    share of each prompt reused stays as high at the end as after the pool was first seen."""
    import random

    path = tiny_model("llama")
    # one window of the tiny model is 16 KB: room for the pool's ~60 windows and a few dozen more
    llm = blend_engine(path, tmp_path, kv_blend=True, kv_host_gb=1.5 * 2**20 / 2**30)
    pool = [passage(100 + i, 64 + 8 * (i % 3)) for i in range(12)]
    rng = random.Random(0)
    reuse = []
    for q in range(80):
        picked = rng.sample(range(len(pool)), 3)
        question = passage(1000 + q, 40)  # new text every query: it fills the store
        out = llm.generate({"segments": [*[pool[i] for i in picked], question]}, SamplingParams(max_tokens=1))[0]
        reuse.append((out.blended_tokens + out.blend_recomputed_tokens) / out.prompt_tokens)
    stats = llm.cache_stats()
    assert stats["host"]["evictions"] > 0, "the host tier was meant to fill"
    early, late = sum(reuse[20:40]) / 20, sum(reuse[60:]) / 20
    assert early > 0.5 and late >= 0.9 * early, (early, late)
