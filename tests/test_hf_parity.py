"""Our models against Hugging Face transformers on the same weights: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from kvtrove import LLM, SamplingParams
from tests.conftest import ARCHS
from tests.helpers import assert_all_blocks_free, prompt_logits

PROMPT_LEN, NEW_TOKENS = 64, 64


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def check_parity(llm: LLM, hf_model, ids: list[int]) -> None:
    ours = prompt_logits(llm, ids)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0].float()
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-3, f"max abs logit diff {diff}"
    got = llm.generate(
        {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    )[0]
    want = hf_greedy(hf_model, ids, NEW_TOKENS)
    assert got.token_ids == want
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_model_matches_hf(arch, tiny_model):
    from transformers import AutoModelForCausalLM

    path = tiny_model(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(model=str(path), dtype="float32", block_size=16, num_blocks=64)
    ids = torch.randint(3, 49152, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    check_parity(llm, hf, ids)


def test_smollm2_gguf_matches_hf(smollm_path):
    """HF dequantizes the same GGUF its own way; our loader (incl. q/k un-permutation) must agree (float
    weights: `quantize="none"`)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    smollm = LLM(model=smollm_path, dtype="float32", quantize="none", num_blocks=64)
    p = Path(smollm_path)
    hf = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    text = (
        "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type with an oil-based ink and a wooden press adapted from wine making. "
        "Within fifty years presses were at work across Europe, and the price of books fell so far that "
        "reading spread from monasteries and universities to merchants, artisans and their families."
    )
    ids = smollm.get_tokenizer().encode(text)[:PROMPT_LEN]
    assert len(ids) == PROMPT_LEN
    check_parity(smollm, hf, ids)


def test_bfloat16_runs_close_to_float32(tiny_model):
    path = tiny_model("llama")
    f32 = LLM(model=str(path), dtype="float32", num_blocks=32)
    bf16 = LLM(model=str(path), dtype="bfloat16", num_blocks=32)
    ids = list(range(100, 140))
    a, b = prompt_logits(f32, ids), prompt_logits(bf16, ids)
    assert b.dtype == torch.float32
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()
    out = bf16.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8


@pytest.mark.parametrize("arch", ["deepseek-v2", "qwen3-moe"])
def test_moe_and_latent_kv_go_through_the_store(arch, tiny_model, tmp_path):
    """A MoE model's KV (DeepSeek's: the compressed latent) is stored, reloaded by a fresh engine and gives
    the same greedy tokens as without the store."""
    path = str(tiny_model(arch))
    ids = torch.randint(3, 49152, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = LLM(model=path, num_blocks=64, enable_prefix_caching=False)
    want = plain.generate({"prompt_token_ids": ids}, greedy)[0].token_ids
    for run in range(2):
        with LLM(model=path, num_blocks=64, kv_host_gb=0, kv_disk_dir=str(tmp_path), kv_disk_gb=0.1) as llm:
            out = llm.generate({"prompt_token_ids": ids}, greedy)[0]
            assert out.token_ids == want
            assert out.cached_tokens_by_tier.get("disk", 0) == (64 if run else 0)


MOE_ARCHS = [a for a in sorted(ARCHS) if "moe" in a or a in ("mixtral", "deepseek-v2", "deepseek-v3")]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_under_a_user_placement_file_matches_hf(arch, tiny_model, tmp_path):
    """Routed experts on the CPU, everything else on "cuda:0" (the CPU here): the same numbers as HF."""
    from transformers import AutoModelForCausalLM

    from tests.test_placement import EXPERTS_CPU_REST_GPU

    rules = tmp_path / "rules.yaml"
    rules.write_text(EXPERTS_CPU_REST_GPU)
    path = tiny_model(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(model=str(path), dtype="float32", block_size=16, num_blocks=64, placement=str(rules))
    assert any(p.kind == "experts" and p.wanted == "cpu" for p in llm.engine.placement)
    ids = torch.randint(3, 49152, (PROMPT_LEN,), generator=torch.Generator().manual_seed(3)).tolist()
    check_parity(llm, hf, ids)
