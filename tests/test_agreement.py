"""The default engine keeps the float model's answers: on 48 held-out prompts (24 plain continuations, 24
chat questions; bench/prompts.py), 32 greedy tokens of SmolLM2 with quantize=auto (the file's Q4_1 and
Q8_0 blocks run as stored, float32 activations) equal those of Hugging Face transformers running the same
GGUF dequantized to float32, on at least 95% of the prompts (`python -m bench.agreement` has the table
for every setting and llama.cpp)."""

from __future__ import annotations

import pytest
import torch

from bench.agreement import agreement, hf_greedy, ours_greedy
from bench.core import hf_model
from bench.prompts import agreement_ids
from kvtrove import LLM


@pytest.mark.slow
def test_default_engine_keeps_the_float_models_answers(smollm_path):
    llm = LLM(model=smollm_path, kv_host_gb=0, kv_disk_gb=0)  # the default: quantize=auto
    prompts = agreement_ids(llm.engine)
    assert len(prompts) >= 40
    want = hf_greedy(hf_model(torch.float32), prompts, 32)
    got = ours_greedy(llm, prompts, 32)
    rate = agreement(got, want)
    assert rate >= 0.95, f"quantize=auto kept the float reference's 32 tokens on {rate:.1%} of the prompts"
