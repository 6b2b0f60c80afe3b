"""Does the engine keep the float model's answers? Greedy continuations (32 tokens) of 48 held-out prompts
(24 plain, 24 chat; `bench/prompts.py`) from Hugging Face transformers running the default GGUF dequantized
to float32 (the reference), against ours under each `quantize` setting and llama.cpp's own Q4_1 path, on
the same token ids. A prompt agrees when all 32 tokens are the reference's.
Run: `python -m bench.agreement` (llama.cpp needs `make bench`); writes bench/results/agreement.json.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from bench.core import hardware, hf_model
from bench.prompts import agreement_ids
from bench.results import save
from kvtrove import LLM, SamplingParams
from kvtrove.config import default_model_path

warnings.filterwarnings("ignore")


@torch.inference_mode()
def hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n argmax tokens after each prompt (no stop at end-of-sequence, like ignore_eos)."""
    outs = []
    for ids in prompts:
        out = model(torch.tensor([ids]), use_cache=True)
        past, toks = out.past_key_values, []
        for _ in range(n):
            t = int(out.logits[0, -1].argmax())
            toks.append(t)
            out = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
        outs.append(toks)
    return outs


def ours_greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def llamacpp_greedy(prompts: list[list[int]], n: int) -> list[list[int]] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=default_model_path(), n_ctx=1024, verbose=False, logits_all=False)
    outs = []
    for ids in prompts:
        llm.reset()
        toks = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            toks.append(t)
            if len(toks) == n:
                break
        outs.append(toks)
    return outs


def agreement(got: list[list[int]], want: list[list[int]]) -> float:
    return sum(g == w for g, w in zip(got, want)) / len(want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    print(f"hardware: {hardware()}")
    base = LLM(quantize="none", kv_host_gb=0, kv_disk_gb=0)
    prompts = agreement_ids(base.engine)
    ref = hf_greedy(hf_model(torch.float32), prompts, args.tokens)
    half = len(prompts) // 2
    rows = {}
    engines = {f"kvtrove quantize={q}": q for q in ("none", "auto", "int8", "int4")}
    for name, q in engines.items():
        llm = base if q == "none" else LLM(quantize=q, kv_host_gb=0, kv_disk_gb=0)
        rows[name] = ours_greedy(llm, prompts, args.tokens)
    peer = llamacpp_greedy(prompts, args.tokens)
    if peer is not None:
        rows["llama.cpp Q4_1"] = peer
    figures = {}
    print(
        f"{len(prompts)} prompts ({half} plain, {len(prompts) - half} chat), {args.tokens} greedy tokens, "
        "agreement with HF transformers float32 on the same GGUF"
    )
    for name, got in rows.items():
        a, p, c = agreement(got, ref), agreement(got[:half], ref[:half]), agreement(got[half:], ref[half:])
        figures[name] = {"all": a, "plain": p, "chat": c}
        print(f"  {name:<26} {a:6.1%}   plain {p:6.1%}   chat {c:6.1%}")
    save("agreement", {"hardware": hardware(), "prompts": len(prompts), "tokens": args.tokens, "agreement": figures})


if __name__ == "__main__":
    main()
