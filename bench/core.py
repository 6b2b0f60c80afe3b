"""Core engine benchmark: ours vs HF transformers (same weights, same dtype) and llama.cpp (Q4_1 GGUF),
all measured in this run on this machine. Run: `make bench` or `python -m bench.core`.

Figures: prefill TTFT at 2,048 tokens; single-request decode after a 512-token prompt; aggregate
decode with 16 concurrent requests; TTFT of a repeated 2,048-token prompt (device prefix hit).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import torch

from kvtrove import LLM, SamplingParams
from kvtrove.config import default_model_path, kernel_isa

warnings.filterwarnings("ignore")

ROWS: list[tuple[str, str, str, str, str]] = []


def row(name: str, ours: float, peer: float, unit: str, target: str, higher_is_better: bool = True) -> None:
    ratio = ours / peer if higher_is_better else peer / ours
    ROWS.append((name, f"{ours:.2f} {unit}", f"{peer:.2f} {unit}", f"{ratio:.2f}x", target))
    print(f"  {name}: ours {ours:.2f} {unit} | peer {peer:.2f} {unit} | {ratio:.2f}x (target {target})", flush=True)


def hardware() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    isa = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx2", "fma") if f" {f}" in flags]
    return (
        f"{cpu} ({' '.join(isa) or 'no AVX'}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, kernels built for {kernel_isa()}"
    )


def read_bandwidth() -> float:
    """GB/s of a streaming read (torch.sum over 1 GiB of float32)."""
    a = torch.ones(2**28)
    a.sum()
    t = time.perf_counter()
    for _ in range(5):
        a.sum()
    return 5 * a.numel() * 4 / (time.perf_counter() - t) / 1e9


def weight_bytes_per_token(llm: LLM) -> int:
    """Bytes of every matmul weight read for one decoded token (all linears incl. the LM head)."""
    item = 4 if llm.engine.config.model.dtype == "float32" else 2
    cfg = llm.engine.hf_config
    h = cfg.hidden_size
    per_layer = 0
    for layer in llm.engine.model.model.layers:
        a = layer.self_attn
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        per_layer += h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
    return (per_layer + h * cfg.vocab_size) * item


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


# ---- ours ---------------------------------------------------------------------------------------


def ours_ttft(llm: LLM, ids: list[int], reset: bool = True) -> float:
    if reset:
        llm.engine.pool.reset_cache()
    return llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, temperature=0))[0].ttft_s


def ours_decode(llm: LLM, ids: list[int], n: int) -> float:
    llm.engine.pool.reset_cache()
    t = time.perf_counter()
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
    return (n - 1) / (time.perf_counter() - t - out.ttft_s)


def ours_concurrent(llm: LLM, prompts: list[list[int]], n: int) -> tuple[float, float]:
    """(decode tokens/s once all requests have started, end-to-end output tokens/s)."""
    eng = llm.engine
    eng.pool.reset_cache()
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    ids = [eng.add_request({"prompt_token_ids": p}, params) for p in prompts]
    reqs = [eng.groups[i][0] for i in ids]
    t_all_started = tokens_at_start = None
    while eng.has_unfinished():
        eng.step()
        if t_all_started is None and all(r.output_token_ids for r in reqs):
            t_all_started, tokens_at_start = time.perf_counter(), sum(len(r.output_token_ids) for r in reqs)
    t_end = time.perf_counter()
    total = sum(len(r.output_token_ids) for r in reqs)
    return (total - tokens_at_start) / (t_end - t_all_started), total / (t_end - t0)


# ---- peers --------------------------------------------------------------------------------------


def hf_model(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    p = Path(default_model_path())
    return AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype).eval()


@torch.inference_mode()
def hf_ttft(model, ids: list[int]) -> float:
    t = time.perf_counter()
    model(torch.tensor([ids]), logits_to_keep=1)
    return time.perf_counter() - t


class _TokenClock:
    """A `generate` streamer that notes when each new token arrives (its first call is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_decode(model, ids: list[int], n: int) -> float:
    """Tokens/s from the first new token to the last: the same quantity as `ours_decode`."""
    x = torch.tensor([ids])
    clock = _TokenClock()
    model.generate(
        x,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        attention_mask=torch.ones_like(x),
        pad_token_id=0,
        streamer=clock,
    )
    first, last = clock.times[1], clock.times[-1]
    return (len(clock.times) - 2) / (last - first)


def llamacpp_decode(ids: list[int], n: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("  llama-cpp-python is not installed (`make bench` installs it); skipping the llama.cpp peer")
        return None
    llm = Llama(model_path=default_model_path(), n_ctx=4096, n_threads=os.cpu_count(), verbose=False)
    llm.create_completion(ids[:8], max_tokens=4, temperature=0)  # warm-up
    return llamacpp_timed(llm, ids, n)[1]


def llamacpp_timed(llm, ids: list[int], n: int) -> tuple[float, float | None]:
    """(seconds to the first streamed token, tokens/s from the first token to the last) of one completion."""
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in llm.create_completion(ids, max_tokens=n, temperature=0, stream=True):
        count += 1
        if first is None:
            first = time.perf_counter()
    return first - t0, (count - 1) / (time.perf_counter() - first) if count > 1 else None


def compare_dtype(dtype: str, p2048, p512, n: int, bw: float, prefill_target: str, decode_target: str):
    """Prefill and single-request decode, ours vs HF in `dtype`; returns our engine and HF's decode rate."""
    print(f"\n[{dtype}]")
    # the float engine on the device pool alone: HF computes in `dtype` from dequantized weights (quantized
    # figures are bench.quant's), and a DRAM/SSD store would turn the "cold" prompts into store hits
    ours = LLM(dtype=dtype, quantize="none", kv_host_gb=0, kv_disk_gb=0)
    hf = hf_model(getattr(torch, dtype))
    ours_ttft(ours, p512)  # warm-up
    hf_ttft(hf, p512)
    short = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    prefill = (ours_ttft(ours, p2048), hf_ttft(hf, p2048))
    row(f"prefill 2048 tokens TTFT ({short})", *prefill, "s", prefill_target, higher_is_better=False)
    o, h = ours_decode(ours, p512, n), hf_decode(hf, p512, n)
    row(f"decode 1 request ({short})", o, h, "tok/s", decode_target)
    bound = bw * 1e9 / weight_bytes_per_token(ours)
    print(f"    bandwidth bound {bound:.1f} tok/s -> ours at {o / bound:.0%} of it")
    return ours, h


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args()
    n = args.decode_tokens
    print(f"hardware: {hardware()}")
    bw = read_bandwidth()
    print(f"streaming read bandwidth (torch.sum over 1 GiB): {bw:.1f} GB/s")
    p2048, p512 = prompt_ids(2048, 0), prompt_ids(512, 1)
    conc = [prompt_ids(128, 10 + i) for i in range(16)]

    compare_dtype("bfloat16", p2048, p512, n, bw, prefill_target=">= 1.0x HF bf16", decode_target=">= 2x HF bf16")
    ours, hf_single = compare_dtype("float32", p2048, p512, n, bw, prefill_target="-", decode_target=">= 1.6x HF fp32")

    decode_rate, e2e = ours_concurrent(ours, conc, n)
    print(
        f"  16 concurrent requests (128-token prompts, {n} new each): decode {decode_rate:.1f} tok/s, "
        f"end-to-end incl. prefill {e2e:.1f} tok/s"
    )
    row("decode 16 concurrent vs HF fp32 single", decode_rate, hf_single, "tok/s", ">= 8x")
    lc = llamacpp_decode(p512, n)
    if lc is not None:
        row("decode 16 concurrent (ours fp32) vs llama.cpp Q4_1 single", decode_rate, lc, "tok/s", ">= 2x")

    cold = ours_ttft(ours, p2048)
    hit = ours_ttft(ours, p2048, reset=False)
    print(
        f"  repeated 2048-token prompt: cold TTFT {cold:.3f}s, device prefix hit {hit:.3f}s = {hit / cold:.1%} "
        f"of cold (target <= 5%)"
    )

    print("\n| benchmark | ours | peer | ratio | target |\n|---|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    print(f"| prefix hit TTFT, 2048 tokens | {hit:.3f} s | cold {cold:.3f} s | {hit / cold:.1%} of cold | <= 5% |")


if __name__ == "__main__":
    main()
