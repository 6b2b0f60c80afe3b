"""Same numbers however a token is computed: the logits of every generated token, compared bit for bit
(torch.equal), whether its prompt is prefilled at once or in chunks of 16 / 64 / 100 tokens, batched with
other prompts of other lengths, preempted and recomputed in a tiny pool, served from the device cache, the
host tier or the disk tier, on 1 or 2 threads, and with the kernels built for AVX-512, AVX2 or no SIMD.
On the real default model (quantize=auto: int4 + int8 from the file) and on tiny random models of each
architecture family (dense, sliding window, q/k norm, MoE with float and quantized experts, DeepSeek's
MLA and routers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from kvtrove import LLM, SamplingParams
from tests.helpers import assert_all_blocks_free

TOKENS = 12
PARAMS = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)


class LogitsTap:
    """Records the full logits row of every token the engine samples, per prompt."""

    def __init__(self, llm: LLM):
        self.rows: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
        runner = llm.engine.runner
        model, execute = runner.model, runner.execute
        compute_logits = model.compute_logits
        last: list[torch.Tensor] = []

        def tapped_logits(hidden):
            out = compute_logits(hidden)
            last[:] = [out]
            return out

        def tapped_execute(batch):
            sampled, result = execute(batch)
            for i, r in enumerate(sampled):
                self.rows[tuple(r.prompt_token_ids)].append(last[0][i].clone())
            return sampled, result

        model.compute_logits = tapped_logits
        runner.execute = tapped_execute

    def take(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        out = [torch.stack(self.rows.pop(tuple(p))) for p in prompts]
        assert all(len(o) == TOKENS for o in out)
        return out


def tap(llm: LLM) -> LogitsTap:
    if not hasattr(llm, "_tap"):
        llm._tap = LogitsTap(llm)
    return llm._tap


def run(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    tap(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS)
    assert all(len(o.token_ids) == TOKENS for o in outs)
    return tap(llm).take(prompts)


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        if not torch.equal(g, w):
            diff = (g - w).abs().max().item()
            raise AssertionError(f"{what}: prompt {i} logits differ (max |diff| {diff:.3g})")


def count_preemptions(llm: LLM):
    """A counter of the engine's preemptions from now on."""
    seen: list = []
    add = llm.engine.add_request

    def tracked(*args, **kw):
        rid = add(*args, **kw)
        seen.extend(llm.engine.groups[rid])
        return rid

    llm.engine.add_request = tracked
    return lambda: sum(r.num_preemptions for r in seen)


def make_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def engine(path: str, tmp_path=None, **kw) -> LLM:
    store = {"kv_host_gb": 0, "kv_disk_gb": 0} if tmp_path is None else {"kv_disk_dir": str(tmp_path)}
    return LLM(model=path, block_size=16, **store, **kw)


def check_matrix(path: str, quantize: str, lengths: list[int], vocab: int, tmp_path, dtype: str = "float32"):
    """The matrix on one model: every configuration against the prompts run one at a time, unconstrained."""
    prompts = make_prompts(vocab, lengths, seed=len(lengths))
    base = engine(path, quantize=quantize, dtype=dtype, num_blocks=256)
    want = [run(base, [p])[0] for p in prompts]  # alone
    assert_same(run(base, prompts), want, "batched with the other prompts")
    others = make_prompts(vocab, [9, 150, 33], seed=99)
    assert_same(run(base, prompts + others)[: len(prompts)], want, "batched with prompts of other lengths")
    for budget in (16, 64, 100):
        llm = engine(path, quantize=quantize, dtype=dtype, num_blocks=256, max_num_batched_tokens=budget)
        assert_same(run(llm, prompts), want, f"chunked prefill, {budget} tokens per step")
    # a pool of about one prompt: requests preempt each other and are recomputed
    tiny = engine(path, quantize=quantize, dtype=dtype, num_blocks=max(lengths) // 16 + 4, max_num_batched_tokens=64)
    preempted = count_preemptions(tiny)
    assert_same(run(tiny, prompts), want, "preempted and recomputed in a tiny pool")
    assert preempted() > 0, "the pool was meant to be too small for the prompts at once"
    assert_all_blocks_free(tiny)
    # the prompts' KV served from the device cache, then the host tier, then (a new engine) the disk tier
    stored = engine(path, tmp_path, quantize=quantize, dtype=dtype, num_blocks=256)
    assert_same(run(stored, prompts), want, "with the KV store on")
    assert_same(run(stored, prompts), want, "prompts from the device cache")
    stored.engine.flush_kv()
    stored.engine.pool.reset_cache()
    host = stored.generate([{"prompt_token_ids": prompts[0]}], PARAMS)[0]
    tap(stored).rows.clear()
    assert host.cached_tokens_by_tier.get("host", 0) > 0
    stored.engine.pool.reset_cache()
    assert_same(run(stored, prompts), want, "prompts from the host tier")
    stored.close()
    disk = engine(path, tmp_path, quantize=quantize, dtype=dtype, num_blocks=256, kv_host_gb=0)
    first = disk.generate([{"prompt_token_ids": prompts[0]}], PARAMS)[0]
    assert first.cached_tokens_by_tier.get("disk", 0) > 0
    assert_same(run(disk, prompts), want, "prompts from the disk tier")
    disk.close()
    # 1 thread instead of the default
    threads = torch.get_num_threads()
    try:
        one = engine(path, quantize=quantize, dtype=dtype, num_blocks=256, num_threads=1)
        assert_same(run(one, prompts), want, "on one thread")
    finally:
        torch.set_num_threads(threads)
    return prompts, want


@pytest.mark.slow
def test_default_model_matrix(smollm_path, tmp_path):
    """SmolLM2 with quantize=auto (the file's Q4_1 and Q8_0 blocks), prompts of 50-300 tokens."""
    check_matrix(smollm_path, "auto", [53, 130, 299], 49152, tmp_path)


@pytest.mark.parametrize(
    "arch, quantize",
    [
        ("llama", "none"),
        ("llama-bias-headdim", "int8"),
        ("mistral", "int4"),  # a sliding window of 48, crossed by every prompt
        ("qwen3", "none"),  # q/k norms, head dim 24
        ("qwen2", "none"),
        ("mixtral", "none"),  # float experts
        ("qwen2-moe", "int8"),  # quantized experts, a gated shared expert
        ("qwen3-moe", "int4"),
        ("deepseek-v2", "none"),  # MLA, softmax routing
        ("deepseek-v3", "int4"),  # MLA with q LoRA, sigmoid routing, quantized experts
    ],
)
def test_tiny_model_matrix(arch, quantize, tiny_model, tmp_path):
    check_matrix(str(tiny_model(arch)), quantize, [21, 70, 133], 1000, tmp_path)


def test_bfloat16_matrix(tiny_model, tmp_path):
    check_matrix(str(tiny_model("llama")), "none", [21, 70, 133], 1000, tmp_path, dtype="bfloat16")


ISA_SCRIPT = """
import json, sys, torch
from kvtrove import LLM
from tests.test_invariance import PARAMS, make_prompts, LogitsTap
out = {}
for name, path, quantize, vocab, dtype in json.loads(sys.argv[1]):
    llm = LLM(model=path, quantize=quantize, dtype=dtype, block_size=16, kv_host_gb=0, kv_disk_gb=0, num_blocks=256)
    assert llm.engine.runner.fused_decode is not None
    tap = LogitsTap(llm)
    prompts = make_prompts(vocab, [40, 97], seed=5)
    llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS)
    out[name] = tap.take(prompts)
torch.save(out, sys.argv[2])
"""


def _logits_with_isa(isa: str, models: list, out) -> dict[str, list[torch.Tensor]]:
    env = dict(os.environ, KVTROVE_KERNEL_ISA=isa)
    if isa != "native":  # the library kernels capped too (oneDNN, ATen's own vector code)
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2" if isa == "avx2" else "default")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", ISA_SCRIPT, json.dumps(models), str(out)], env=env, check=True, cwd=root)
    return torch.load(out)


@pytest.fixture(scope="module")
def isa_models(smollm_path, tiny_model):
    """The default model (int4 + int8) and a tiny float one in float32 and in bfloat16 (where AVX-512 BF16's
    pair instruction meets its emulation)."""
    tiny = str(tiny_model("llama"))
    return [
        ["default", smollm_path, "auto", 49152, "float32"],
        ["llama", tiny, "none", 1000, "float32"],
        ["llama-bf16", tiny, "none", 1000, "bfloat16"],
    ]


@pytest.fixture(scope="module")
def native_logits(isa_models, tmp_path_factory):
    return _logits_with_isa("native", isa_models, tmp_path_factory.mktemp("isa") / "native.pt")


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_same_bits_with_every_instruction_set(isa, isa_models, native_logits, tmp_path):
    """The kernels built for AVX-512 without BF16, for AVX2 only or for no SIMD at all (the paths of other
    machines), with oneDNN and ATen capped likewise, give the same logits as this machine's native build: KV
    and answers carry over between engines on different CPUs."""
    if isa == "avx512" and "avx512_bf16" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX-512 BF16: its native build is the avx512 one (or narrower)")
    other = _logits_with_isa(isa, isa_models, tmp_path / f"{isa}.pt")
    for name, *_ in isa_models:
        assert_same(other[name], native_logits[name], f"{name}: {isa} build vs native")


def test_kernel_isa_is_checked(monkeypatch):
    from kvtrove.config import kernel_isa

    monkeypatch.setenv("KVTROVE_KERNEL_ISA", "avx9")
    with pytest.raises(ValueError, match="KVTROVE_KERNEL_ISA must be one of"):
        kernel_isa()
