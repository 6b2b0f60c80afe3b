"""Quantized SmolLM2 on the CPU: ours (float, int8, int4) vs llama.cpp on the Q4_1 and Q8_0 GGUF, same run.
Run: `python -m bench.quant` (needs llama-cpp-python: `make bench` installs it).

- decode: one request, a 512-token prompt, then `--decode-tokens` tokens; tokens/s from the first new
  token to the last.
- prefill: tokens/s of a fresh 512-token prompt (TTFT of a prompt nobody has seen; llama.cpp's state
  is reset before each).
Ours: `quantize=none` (fp32 weights), `int8` (per channel), `auto` (the default: the file's Q4_1
blocks as int4, the Q8_0 output head as int8). llama.cpp: the shipped Q4_1 file, and a Q8_0 file made
from it with llama.cpp's own quantizer (same 4-bit information, 8-bit storage and kernels). Best of
`--repeats` runs per figure (this box drifts by up to ~30% between runs).
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
from kvtrove import LLM, SamplingParams
from kvtrove.config import default_model_path

warnings.filterwarnings("ignore")


def ours(quantize: str, prompts: list[list[int]], n: int) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s), best of the prompts."""
    llm = LLM(quantize=quantize, kv_host_gb=0, kv_disk_gb=0)
    greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompts[0][:64]}, SamplingParams(max_tokens=4))  # warm-up
    decode = prefill = 0.0
    for ids in prompts:
        llm.engine.pool.reset_cache()
        t = time.perf_counter()
        out = llm.generate({"prompt_token_ids": ids}, greedy)[0]
        total = time.perf_counter() - t
        decode = max(decode, (n - 1) / (total - out.ttft_s))
        prefill = max(prefill, len(ids) / out.ttft_s)
    llm.close()
    return decode, prefill


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


def llamacpp(path: str, prompts: list[list[int]], n: int) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=2048, n_threads=os.cpu_count(), n_batch=512, verbose=False)
    llm.create_completion(prompts[0][:8], max_tokens=4, temperature=0)  # warm-up
    decode = prefill = 0.0
    for ids in prompts:
        llm.reset()
        ttft, rate = llamacpp_timed(llm, ids, n)
        prefill = max(prefill, len(ids) / ttft)
        decode = max(decode, rate or 0.0)
    return decode, prefill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = args.decode_tokens
    prompts = [prompt_ids(512, 100 + i) for i in range(args.repeats)]
    print(f"hardware: {hardware()}")
    src = default_model_path()
    lc = {"Q4_1": llamacpp(src, prompts, n), "Q8_0": llamacpp(q8_0_file(src), prompts, n)}
    mine = {q: ours(q, prompts, n) for q in ("none", "int8", "auto")}
    label = {"none": "fp32", "int8": "int8", "auto": "int4 (auto: Q4_1 blocks)"}
    print(f"\nSmolLM2-135M, one request, 512-token prompt, {n} new tokens (best of {args.repeats})")
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


if __name__ == "__main__":
    main()
