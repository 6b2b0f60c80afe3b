"""Serving benchmark: our OpenAI server vs llama-cpp-python's, same model file, same prompts, same
client, measured one after the other in this run. Run: `python -m bench.server` (needs the bench
extras: `scripts/setup.sh bench`).

Closed-loop users (1, 8, 32): each sends its next streaming chat request as soon as the previous one
ends. Per level: requests/s, TTFT p50/p99 (to the first content chunk), output tokens/s. Optional
soak (`--soak-s 600`): 16 users against our server, resident memory after warm-up vs at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

from bench.core import hardware
from kvtrove.config import default_model_path

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for learning a new language.",
    "Explain photosynthesis to a child.",
    "Write a haiku about autumn.",
    "What are the benefits of regular exercise?",
    "How does a refrigerator work?",
    "Name three famous painters and one work of each.",
    "What is the difference between weather and climate?",
    "Suggest a name for a coffee shop.",
    "Why is the sky blue?",
    "Describe a cat in two sentences.",
    "What should I pack for a weekend hiking trip?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not come up")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def user(client, model: str, uid: int, requests: int | None, until: float | None, max_tokens: int, rec: list):
    i = 0
    while (requests is None or i < requests) and (until is None or time.perf_counter() < until):
        q = QUESTIONS[(uid * 5 + i) % len(QUESTIONS)]
        t0 = time.perf_counter()
        ttft, chunks = None, 0
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": q}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
        rec.append((ttft if ttft is not None else time.perf_counter() - t0, chunks))
        i += 1


async def load(base: str, model: str, users: int, requests: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=3600)
    rec: list = []
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(user(client, model, u, requests, None, max_tokens, rec) for u in range(users)))
    finally:
        await client.close()
    wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in rec)
    return {
        "rps": len(rec) / wall,
        "p50": ttfts[len(ttfts) // 2],
        "p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "tok_s": sum(n for _, n in rec) / wall,
    }


def run_levels(name: str, base: str, model: str, levels: list[int], requests: int, max_tokens: int) -> dict:
    out = {}
    asyncio.run(load(base, model, 1, 1, 8))  # warm-up
    for users in levels:
        r = asyncio.run(load(base, model, users, requests, max_tokens))
        out[users] = r
        print(
            f"  {name:9} {users:>2} users: {r['rps']:.2f} req/s, TTFT p50 {r['p50']:.2f} s p99 {r['p99']:.2f} s, "
            f"{r['tok_s']:.1f} output tokens/s",
            flush=True,
        )
    return out


def soak(base: str, model: str, pid: int, seconds: float, warmup: float, max_tokens: int) -> tuple[float, float]:
    async def main():
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=3600)
        rec: list = []
        end = time.perf_counter() + seconds
        task = asyncio.gather(*(user(client, model, u, None, end, max_tokens, rec) for u in range(16)))
        await asyncio.sleep(warmup)
        warm = rss_mb(pid)
        await task
        await client.close()
        return warm, rss_mb(pid), len(rec)

    warm, end, n = asyncio.run(main())
    print(
        f"  soak: {n} requests from 16 users in {seconds:.0f} s; "
        f"RSS {warm:.0f} MB after warm-up, {end:.0f} MB at the end"
    )
    return warm, end


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests", type=int, default=2, help="requests per user per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--soak-s", type=float, default=0, help="seconds of the 16-user soak on our server (0: skip)")
    ap.add_argument("--skip-peer", action="store_true")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    gguf = default_model_path()
    tmp = Path(tempfile.mkdtemp(prefix="kvtrove-bench-server-"))
    print(f"hardware: {hardware()}; model {Path(gguf).name}; {args.max_tokens} tokens per answer", flush=True)

    port = free_port()
    ours_cmd = [sys.executable, "-m", "kvtrove.cli", "serve", "--port", str(port), "--kv-disk-dir", str(tmp / "kv")]
    ours = start(ours_cmd, port, tmp / "ours.log")
    base = f"http://127.0.0.1:{port}"
    try:
        model = openai.OpenAI(base_url=base + "/v1", api_key="none").models.list().data[0].id
        mine = run_levels("kvtrove", base, model, levels, args.requests, args.max_tokens)
        if args.soak_s:
            warm, end = soak(base, model, ours.pid, args.soak_s, min(60.0, args.soak_s / 5), args.max_tokens)
            print(f"  soak RSS change: {100 * (end - warm) / warm:+.1f}% (target within 10%)")
    finally:
        ours.terminate()
        ours.wait(timeout=60)
    if args.skip_peer:
        return

    port = free_port()
    threads = str(os.cpu_count() or 1)
    peer_cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port)]
    peer_cmd += ["--n_ctx", "4096", "--n_threads", threads, "--n_threads_batch", threads]
    peer_cmd += ["--interrupt_requests", "False"]  # its default cuts a running answer off when another request comes
    peer = start(peer_cmd, port, tmp / "peer.log")
    base = f"http://127.0.0.1:{port}"
    try:
        model = openai.OpenAI(base_url=base + "/v1", api_key="none").models.list().data[0].id
        theirs = run_levels("llama.cpp", base, model, levels, args.requests, args.max_tokens)
    finally:
        peer.terminate()
        peer.wait(timeout=60)

    print("\nours vs llama-cpp-python server (same run):")
    for users in levels:
        a, b = mine[users], theirs[users]
        print(
            f"  {users:>2} users: output tokens/s {a['tok_s']:.1f} vs {b['tok_s']:.1f} = "
            f"{a['tok_s'] / b['tok_s']:.2f}x; "
            f"TTFT p99 {a['p99']:.2f} s vs {b['p99']:.2f} s; req/s {a['rps']:.2f} vs {b['rps']:.2f}"
            + ("  (target at 32: >= 2x tokens/s, p99 TTFT no worse)" if users == 32 else "")
        )
    print(
        f"  TTFT p50 per level, ours: {[round(mine[u]['p50'], 2) for u in levels]}, "
        f"llama.cpp: {[round(theirs[u]['p50'], 2) for u in levels]}"
    )


if __name__ == "__main__":
    main()
