"""Float speed of this checkout against an earlier one, same run: TTFT of fresh 512- and 2,048-token
prompts with `quantize=none` in float32 and bfloat16, and decode tok/s (64 tokens after a 512-token
prompt), each checkout in its own process, interleaved rounds, best per figure. Run: `git worktree add /tmp/base <commit>` then
`python -m bench.prefill_ab --baseline /tmp/base`; writes bench/results/prefill_ab.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.core import hardware
from bench.results import save

PROBE = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from kvtrove import LLM, SamplingParams
g = torch.Generator().manual_seed(7)
out = {}
for dtype in ("float32", "bfloat16"):
    llm = LLM(quantize="none", dtype=dtype, kv_host_gb=0, kv_disk_gb=0)
    p = SamplingParams(max_tokens=1, temperature=0)
    for n in (512, 2048):
        ids = torch.randint(3, 49152, (n,), generator=g).tolist()
        llm.generate({"prompt_token_ids": ids[:64]}, p)
        best = 1e9
        for _ in range(3):
            llm.engine.pool.reset_cache()
            best = min(best, llm.generate({"prompt_token_ids": ids}, p)[0].ttft_s)
        out[f"{dtype} {n}"] = n / best
    d = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    best = 1e9
    for _ in range(3):
        start = time.perf_counter()
        o = llm.generate({"prompt_token_ids": ids[:512]}, d)[0]
        best = min(best, (time.perf_counter() - start - o.ttft_s) / (len(o.token_ids) - 1))
    out[f"{dtype} decode"] = 1 / best
print(json.dumps(out))
"""


def probe(checkout: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", PROBE, str(checkout)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline", required=True, type=Path, help="a checkout of the earlier commit")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    print(f"hardware: {hardware()}")
    best: dict[str, dict[str, float]] = {"baseline": {}, "this": {}}
    for _ in range(args.rounds):
        for name, path in (("baseline", args.baseline), ("this", here)):
            for k, v in probe(path).items():
                best[name][k] = max(best[name].get(k, 0.0), v)
    print("tok/s (prefill: fresh prompt; decode: 64 tokens; best of rounds) | baseline | this | ratio")
    for k in best["this"]:
        b, t = best["baseline"][k], best["this"][k]
        print(f"  {k:<16} {b:8.0f} {t:8.0f} {t / b:6.2f}x")
    save("prefill_ab", {"hardware": hardware(), "baseline": str(args.baseline), "tok_s": best})


if __name__ == "__main__":
    main()
