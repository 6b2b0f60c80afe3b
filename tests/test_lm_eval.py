"""lm-evaluation-harness against our server, as its users run it: `local-completions`, the tokenizer
auto-detected from our /tokenizer_info, a multiple-choice task (loglikelihoods from echo + logprobs)
and a generate_until task, both written here as local JSONL. Each choice's loglikelihood must equal HF
transformers' on the same weights (float weights on both sides)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_server import KEY, start_server

QUESTIONS = [
    ("The capital of France is", [" Paris", " Berlin", " Madrid"], 0),
    ("Two plus two equals", [" five", " four", " seven"], 1),
    ("The colour of the clear sky is", [" green", " red", " blue"], 2),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Fahrenheit"], 0),
]


def write_tasks(root: Path) -> None:
    mc = root / "mc.jsonl"
    mc.write_text("".join(json.dumps({"q": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    gen = root / "gen.jsonl"
    gen.write_text("".join(json.dumps({"q": q, "answer": c[a].strip()}) + "\n" for q, c, a in QUESTIONS))
    (root / "kvtrove_mc.yaml").write_text(
        f"task: kvtrove_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {mc}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    (root / "kvtrove_gen.yaml").write_text(
        f"task: kvtrove_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {gen}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


def test_lm_eval_local_completions(smollm_path, smollm, tmp_path, tmp_path_factory, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as the bearer token
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path)
    proc, base = start_server(smollm_path, tmp_path_factory, "--dtype", "float32", "--quantize", "none")
    name = Path(smollm_path).name.removesuffix(".gguf")
    try:
        results = simple_evaluate(
            model="local-completions",
            model_args=f"base_url={base}/v1/completions,model={name},auth_token={KEY},max_retries=1",
            tasks=["kvtrove_mc", "kvtrove_gen"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    p = Path(smollm_path)
    tok = smollm.get_tokenizer()  # the model's HF tokenizer, as the server tokenizes
    hf = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()

    def loglikelihood(context: str, continuation: str) -> float:
        ctx, cont = tok.encode(context), tok.encode(continuation)
        with torch.no_grad():
            lp = hf(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
        return sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))

    samples = results["samples"]["kvtrove_mc"]
    assert len(samples) == len(QUESTIONS)
    for s in samples:
        got = [r[0][0] for r in s["resps"]]
        want = [loglikelihood(s["doc"]["q"], c) for c in s["doc"]["choices"]]
        assert got == pytest.approx(want, abs=1e-3), (s["doc"], got, want)
    assert results["results"]["kvtrove_mc"]["acc,none"] >= 0.5  # the model knows some of these
    gens = results["samples"]["kvtrove_gen"]
    assert len(gens) == len(QUESTIONS) and all(isinstance(g["resps"][0][0], str) for g in gens)
