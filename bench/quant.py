"""Quantized SmolLM2 on the CPU: ours (float, int8, int4) vs llama.cpp on the Q4_1 and Q8_0 GGUF, same run.
Run: `python -m bench.quant` (needs llama-cpp-python: `make bench` installs it).

- decode: one request, a 512-token prompt, then `--decode-tokens` tokens; tokens/s from the first new
  token to the last.
- prefill: tokens/s of a fresh 512-token prompt (TTFT of a prompt nobody has seen; llama.cpp's state
  is reset before each).
Ours: `quantize=none` (fp32 weights), `int8` (a scale per 32), `auto` (the default: the file's Q4_1
blocks as int4, its Q8_0 output head as int8, both exact). llama.cpp: the shipped Q4_1 file, and a Q8_0 file made
from it with llama.cpp's own quantizer (same 4-bit information, 8-bit storage and kernels). Best of
`--repeats` rounds per figure; all five engines stay loaded and each round measures every one of them
on the same prompt, one after another, so a slow spell of this shared box hits ours and the peer alike
(it drifts by up to ~30% within minutes).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import time
import warnings
from pathlib import Path

from bench.core import hardware, llamacpp_timed, prompt_ids
from bench.results import save
from kvtrove import LLM, SamplingParams
from kvtrove.config import default_model_path

warnings.filterwarnings("ignore")


class Ours:
    def __init__(self, quantize: str, warm: list[int]):
        self.llm = LLM(quantize=quantize, kv_host_gb=0, kv_disk_gb=0)
        self.llm.generate({"prompt_token_ids": warm[:64]}, SamplingParams(max_tokens=4))  # warm-up

    def run(self, ids: list[int], n: int) -> tuple[float, float]:
        """(decode tok/s, prefill tok/s) of one fresh prompt."""
        self.llm.engine.pool.reset_cache()
        greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        out = self.llm.generate({"prompt_token_ids": ids}, greedy)[0]
        total = time.perf_counter() - t
        return (n - 1) / (total - out.ttft_s), len(ids) / out.ttft_s


def q8_0_file(src: str) -> str:
    import llama_cpp

    out = str(Path(tempfile.mkdtemp(prefix="kvtrove-bench-")) / "SmolLM2-135M-Instruct.Q8_0.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = os.cpu_count()
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not write a Q8_0 file (rc {rc})")
    return out


class LlamaCpp:
    def __init__(self, path: str, warm: list[int]):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=2048, n_threads=os.cpu_count(), n_batch=512, verbose=False)
        self.llm.create_completion(warm[:8], max_tokens=4, temperature=0)  # warm-up

    def run(self, ids: list[int], n: int) -> tuple[float, float]:
        self.llm.reset()
        ttft, rate = llamacpp_timed(self.llm, ids, n)
        return rate or 0.0, len(ids) / ttft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = args.decode_tokens
    prompts = [prompt_ids(512, 100 + i) for i in range(args.repeats)]
    print(f"hardware: {hardware()}")
    src = default_model_path()
    engines = {
        "llama.cpp Q4_1": LlamaCpp(src, prompts[0]),
        "llama.cpp Q8_0": LlamaCpp(q8_0_file(src), prompts[0]),
        "none": Ours("none", prompts[0]),
        "int8": Ours("int8", prompts[0]),
        "auto": Ours("auto", prompts[0]),
    }
    best = {name: (0.0, 0.0) for name in engines}
    for i, ids in enumerate(prompts):  # one round: every engine on this prompt, back to back
        got = {name: engine.run(ids, n) for name, engine in engines.items()}
        for name, (d, p) in got.items():
            best[name] = (max(best[name][0], d), max(best[name][1], p))
        (d, p), (ld, lp) = got["auto"], got["llama.cpp Q4_1"]
        print(
            f"round {i + 1}: int4 vs llama.cpp Q4_1: decode {d:.1f} / {ld:.1f} = {d / ld:.2f}x, "
            f"prefill {p:.0f} / {lp:.0f} = {p / lp:.2f}x"
        )
    lc = {t: best[f"llama.cpp {t}"] for t in ("Q4_1", "Q8_0")}
    mine = {q: best[q] for q in ("none", "int8", "auto")}
    label = {"none": "fp32", "int8": "int8", "auto": "int4 (auto: Q4_1 blocks)"}
    print(f"\nSmolLM2-135M, one request, 512-token prompt, {n} new tokens (best of {args.repeats} interleaved rounds)")
    print("| ours | decode tok/s | prefill tok/s | decode vs llama.cpp Q4_1 / Q8_0 | prefill vs Q4_1 / Q8_0 |")
    print("|---|---|---|---|---|")
    for q, (d, p) in mine.items():
        print(
            f"| {label[q]} | {d:.1f} | {p:.0f} | {d / lc['Q4_1'][0]:.2f}x / {d / lc['Q8_0'][0]:.2f}x | "
            f"{p / lc['Q4_1'][1]:.2f}x / {p / lc['Q8_0'][1]:.2f}x |"
        )
    for t, (d, p) in lc.items():
        print(f"| llama.cpp {t} | {d:.1f} | {p:.0f} | | |")
    print("targets: int4 decode >= 1.0x llama.cpp Q4_1; prefill >= 2x llama.cpp")
    figures = {name: {"decode_tok_s": d, "prefill_tok_s": p} for name, (d, p) in best.items()}
    (d, p), (ld, lp) = best["auto"], lc["Q4_1"]
    ratios = {"int4_decode_vs_q4_1": d / ld, "int4_prefill_vs_q4_1": p / lp}
    save("quant", {"hardware": hardware(), "prompt_tokens": 512, "decode_tokens": n, "best": figures, **ratios})


if __name__ == "__main__":
    main()
