"""KV store benchmark, all measured in this run on this machine. Run: `python -m bench.kv_store`.

1. TTFT of 1k / 4k / 8k-token prompts: cold, device hit, host hit, disk hit (page cache dropped with
   posix_fadvise(DONTNEED) after fsync). Each hit is also compared with its bound: stored bytes / the
   tier's raw bandwidth + the time to compute the uncached last tokens (= the device-hit TTFT).
2. Load bandwidth of each tier (chunks read, verified and copied into device blocks) vs the raw
   bandwidth of its medium in the same run: a numpy copy for DRAM, a plain file read for disk.
3. Multi-turn chat: 16 conversations x 6 turns, each opening with its own document and each turn
   resending the whole history; users arrive every 0.5 s and send their next turn as soon as the
   answer is in; more KV than the device pool holds (2 s, the first setting, no longer overflows it
   much now that the engine is faster). Store off, on (default write policy) and on
   with write_through (device prefix caching on in all), in interleaved rounds (ABC, CBA): prefill
   tokens computed, TTFT mean/p50/p95 per round, the arms' means over rounds, and a PNG of mean TTFT
   per turn.
4. The store's cost where it cannot help: a chat that fits the device pool (4 conversations x 3
   turns over ~1,100-token documents, one request at a time) and 16 concurrent decodes, on engines
   with the store off, on (default write policy) and on with write_through, side by side in the
   same process; each request runs on every engine in turn (the order rotating), fresh engines and
   documents each round, so the arms share the machine's noise.

Writes bench/results/kv_store.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench import results
from bench.core import hardware, prompt_ids
from kvtrove import LLM, SamplingParams
from kvtrove.kv.keys import chain_keys

warnings.filterwarnings("ignore")
ONE = SamplingParams(max_tokens=1, temperature=0)
LICENSES = Path("/usr/share/common-licenses")


# ---- raw media ------------------------------------------------------------------------------------


def dram_bandwidth(nbytes: int) -> float:
    """Bytes/s of a numpy copy of `nbytes` (best of 3)."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return src.nbytes / best


def drop_page_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bandwidth(directory: Path, nbytes: int) -> float:
    """Bytes/s of a plain read of one `nbytes` file whose pages were dropped from the page cache (best of 3)."""
    path = directory / "raw-read-probe.bin"
    path.write_bytes(os.urandom(1 << 20) * max(1, nbytes >> 20))
    best = float("inf")
    for _ in range(3):
        drop_page_cache([path])
        t = time.perf_counter()
        with open(path, "rb") as f:
            data = f.read()
        best = min(best, time.perf_counter() - t)
    path.unlink()
    return len(data) / best


# ---- our tiers ------------------------------------------------------------------------------------


def chunk_files(llm: LLM, keys) -> list[Path]:
    disk = llm.engine.store.tiers[1]
    return [disk._path(k) for k in keys]


def forget_host(llm: LLM, keys) -> None:
    llm.engine.store.tiers[0].delete(keys)


def ttft(llm: LLM, ids: list[int]) -> tuple[float, dict]:
    out = llm.generate({"prompt_token_ids": ids}, ONE)[0]
    return out.ttft_s, out.cached_tokens_by_tier


def prepare_hit(llm: LLM, keys, tier: str) -> None:
    """Leave the prompt's chunks only in `tier` (device, host or disk)."""
    llm.engine.flush_kv()
    if tier == "device":
        return
    llm.engine.pool.reset_cache()
    if tier == "disk":
        forget_host(llm, keys)
        drop_page_cache(chunk_files(llm, keys))


def load_bandwidth(llm: LLM, keys, tier: str, repeats: int) -> tuple[float, int]:
    """Bytes/s of store.load (read + verify) with each chunk copied into a device block, best of
    `repeats` (as for the raw media), and the bytes moved."""
    eng = llm.engine
    best = float("inf")
    for _ in range(repeats):
        prepare_hit(llm, keys, tier)
        t = time.perf_counter()
        chunks = eng.store.load(keys, sink=lambda i, c: eng.runner.write_block(i, c.kv))
        best = min(best, time.perf_counter() - t)
        assert len(chunks) == len(keys) and {c.tier for c in chunks} == {tier}, [c.tier for c in chunks[:3]]
        eng.pool.reset_cache()  # blocks 0.. were overwritten
        eng.flush_kv()
    nbytes = sum(f.stat().st_size for f in chunk_files(llm, keys))
    return nbytes / best, nbytes


def ttft_table(sizes: list[int], disk_dir: Path, repeats: int) -> dict:
    llm = LLM(kv_disk_dir=str(disk_dir), kv_host_gb=4, kv_disk_gb=8)
    ttft(llm, prompt_ids(64, 99))  # warm-up
    bs = llm.engine.config.cache.block_size
    results = {}
    for n in sizes:
        ids = prompt_ids(n, n)
        keys = chain_keys(llm.engine.fingerprint, ids, bs)[: (n - 1) // bs]
        cold, _ = ttft(llm, ids)
        row = {"cold": cold}
        for tier in ("device", "host", "disk"):
            times = []
            for _ in range(repeats):
                prepare_hit(llm, keys, tier)
                t, by_tier = ttft(llm, ids)
                assert by_tier[tier] == len(keys) * bs, (tier, by_tier)
                times.append(t)
            row[tier] = statistics.median(times)
        row["bytes"] = sum(f.stat().st_size for f in chunk_files(llm, keys))
        row["keys"] = keys
        results[n] = row
        print(
            f"  {n:>5} tokens: cold {cold:7.3f} s | device {row['device'] * 1e3:6.1f} ms | "
            f"host {row['host'] * 1e3:6.1f} ms | disk {row['disk'] * 1e3:6.1f} ms | {row['bytes'] / 1e6:.0f} MB stored",
            flush=True,
        )
    return llm, results


# ---- multi-turn chat ------------------------------------------------------------------------------


def documents(n: int, tokens: int, tok) -> list[str]:
    """`n` different texts of about `tokens` tokens (from the system's license files)."""
    text = " ".join(p.read_text(errors="ignore") for p in sorted(LICENSES.glob("*")) if p.is_file())
    words = text.split()
    per = int(tokens * 0.7)
    if len(words) < n * per:
        words = words * (n * per // max(1, len(words)) + 1)
    return [" ".join(words[i * per : (i + 1) * per]) for i in range(n)]


ARMS = {  # store setups compared (sections 3 and 4)
    "off": dict(kv_host_gb=0, kv_disk_gb=0),
    "on": {},  # the default store: host + disk, the default write policy
    "write_through": dict(kv_write_policy="write_through"),
}


QUESTIONS = [
    "Summarise the text above in two sentences.",
    "What does it say about copying?",
    "Who is allowed to change it?",
    "Name one condition it sets.",
    "Is anything said about warranty?",
    "Give a short title for it.",
]


def multi_turn(
    arm: str, convs: int, turns: int, doc_tokens: int, stagger_s: float, num_blocks: int, disk_dir: Path
) -> dict:
    kv = ARMS[arm] if arm == "off" else dict(kv_host_gb=4, kv_disk_dir=str(disk_dir / arm), kv_disk_gb=8, **ARMS[arm])
    llm = LLM(num_blocks=num_blocks, **kv)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=32)
    docs = documents(convs, doc_tokens, eng.tokenizer)
    history = [[{"role": "user", "content": f"{d}\n\n{QUESTIONS[0]}"}] for d in docs]
    turn = [0] * convs
    ttfts: list[list[float]] = [[] for _ in range(turns)]
    computed = 0
    live: dict[str, int] = {}

    def submit(c: int) -> None:
        prompt = llm.chat_prompt(history[c])
        live[eng.add_request(prompt, params)] = c

    # user c arrives at c * stagger_s and sends turn 1; each next turn goes as soon as its answer arrives
    t0 = time.perf_counter()
    arrived = 0
    while live or arrived < convs:
        now = time.perf_counter() - t0
        while arrived < convs and arrived * stagger_s <= now:
            submit(arrived)
            arrived += 1
        if not live:
            time.sleep(max(0.0, arrived * stagger_s - now))
            continue
        for out in eng.step():
            if not out.finished:
                continue
            c = live.pop(out.request_id)
            ttfts[turn[c]].append(out.ttft_s)
            computed += out.prompt_tokens - out.cached_tokens
            history[c].append({"role": "assistant", "content": out.text})
            turn[c] += 1
            if turn[c] < turns:
                history[c].append({"role": "user", "content": QUESTIONS[turn[c] % len(QUESTIONS)]})
                submit(c)
    wall = time.perf_counter() - t0
    llm.close()
    flat = sorted(t for per in ttfts for t in per)
    return {
        "per_turn": [statistics.mean(t) for t in ttfts],
        "mean": statistics.mean(flat),
        "p50": flat[len(flat) // 2],
        "p95": flat[min(len(flat) - 1, int(0.95 * len(flat)))],
        "computed": computed,
        "wall": wall,
    }


def mean_of(rows: list[dict]) -> dict:
    """One arm over its rounds: mean TTFT (and per turn, prefill tokens) of the round means."""
    return {
        "per_turn": [statistics.mean(t) for t in zip(*(r["per_turn"] for r in rows))],
        "mean": statistics.mean(r["mean"] for r in rows),
        "computed": statistics.mean(r["computed"] for r in rows),
        "rounds": [r["mean"] for r in rows],
    }


def plot(on: dict, off: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = range(1, len(on["per_turn"]) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(turns, off["per_turn"], "o-", label="store off (device prefix cache only)")
    ax.plot(turns, on["per_turn"], "o-", label="store on (host + disk)")
    ax.set_xlabel("turn")
    ax.set_ylabel("mean TTFT (s)")
    ax.set_title(f"{len(on['per_turn'])} turns per conversation, SmolLM2-135M (default engine), 2 CPU cores")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- the store's cost when the device pool suffices -----------------------------------------------



def no_tax_round(r: int, docs: list[str], turns: int, decode_users: int, disk_dir: Path) -> dict:
    """One round: fresh engines per arm; the chat's TTFTs and the concurrent decode rate of each arm."""
    engines = {}
    for name, kw in ARMS.items():
        store = dict(kv_disk_dir=str(disk_dir / f"{r}-{name}"), **kw) if name != "off" else kw
        engines[name] = LLM(**store)
    names = list(engines)
    chat = SamplingParams(temperature=0, max_tokens=32)
    history = [[{"role": "user", "content": f"{d}\n\n{QUESTIONS[0]}"}] for d in docs]
    ttfts = {n: [] for n in names}
    k = 0
    for t in range(turns):
        for h in history:
            texts = {}
            for name in names[k % len(names) :] + names[: k % len(names)]:
                llm = engines[name]
                out = llm.generate(llm.chat_prompt(h), chat)[0]
                ttfts[name].append(out.ttft_s)
                texts[name] = out.outputs[0].text
            assert len(set(texts.values())) == 1, "the store changed an answer"
            k += 1
            h.append({"role": "assistant", "content": texts["off"]})
            h.append({"role": "user", "content": QUESTIONS[(t + 1) % len(QUESTIONS)]})
    decode = {}
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for i, name in enumerate(names + names[::-1]):  # ABCCBA
        prompts = [{"prompt_token_ids": prompt_ids(64, 1000 * r + 100 * i + u)} for u in range(decode_users)]
        t0 = time.perf_counter()
        outs = engines[name].generate(prompts, params)
        rate = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)
        decode.setdefault(name, []).append(rate)
    assert engines["on"].cache_stats()["host"]["entries"] == 0, "the device pool evicted (write-back wrote)"
    for llm in engines.values():
        llm.close()
    return {n: {"ttft_mean": statistics.mean(ttfts[n]), "decode_tok_s": statistics.mean(decode[n])} for n in names}


def no_tax(rounds: int, convs: int, turns: int, doc_tokens: int, decode_users: int, disk_dir: Path) -> dict:
    docs = documents(rounds * convs, doc_tokens, None)
    per_round = []
    for r in range(rounds):
        row = no_tax_round(r, docs[r * convs : (r + 1) * convs], turns, decode_users, disk_dir)
        per_round.append(row)
        print(
            f"  round {r + 1}: "
            + " | ".join(f"{n} TTFT {v['ttft_mean']:.3f} s, decode {v['decode_tok_s']:.1f} tok/s" for n, v in row.items()),
            flush=True,
        )
    out = {}
    for name in ARMS:
        out[name] = {
            key: statistics.mean(row[name][key] for row in per_round) for key in ("ttft_mean", "decode_tok_s")
        }
    return {"rounds": per_round, "mean": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,4096,8000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--convs", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--doc-tokens", type=int, default=600, help="each conversation opens with its own document")
    ap.add_argument(
        "--stagger",
        type=float,
        default=0.5,
        help="seconds between users' first turns (0.5: store off recomputes ~65k tokens, the overload the 4x target was set at)",
    )
    ap.add_argument("--device-blocks", type=int, default=512, help="device KV pool of the chat workload")
    ap.add_argument("--chat-rounds", type=int, default=2, help="rounds of the chat, arms interleaved")
    ap.add_argument("--fit-rounds", type=int, default=3, help="rounds of the workload that fits the device pool")
    ap.add_argument("--fit-doc-tokens", type=int, default=1100)
    ap.add_argument("--decode-users", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip (1-4)")
    ap.add_argument("--plot", default="bench/results/multiturn_ttft.png")
    ap.add_argument("--dir", default=None, help="where the disk tier lives (default: a temp dir on the home disk)")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvtrove-bench-", dir=Path.home()))
    print(f"hardware: {hardware()}; disk tier in {base}", flush=True)

    skip = {int(x) for x in args.skip.split(",") if x}
    figures: dict = {"hardware": hardware()}

    if 1 not in skip:
        print("\n1. TTFT by where the prompt's KV is (max_tokens=1, median of repeats for hits)", flush=True)
        sizes = [int(s) for s in args.sizes.split(",")]
        llm, table = ttft_table(sizes, base / "ttft", args.repeats)
        ref = 4096 if 4096 in table else sizes[len(sizes) // 2]

        print("\n2. Tier load bandwidth (read + verify + copy into device blocks) vs the raw medium", flush=True)
        keys = table[ref]["keys"]
        host_bw, nbytes = load_bandwidth(llm, keys, "host", 3)
        disk_bw, _ = load_bandwidth(llm, keys, "disk", 2)
        raw_dram = dram_bandwidth(nbytes)
        raw_disk = disk_bandwidth(base, nbytes)
        llm.close()
        print(
            f"  host: {host_bw / 1e9:.2f} GB/s vs numpy copy {raw_dram / 1e9:.2f} GB/s = "
            f"{host_bw / raw_dram:.0%} (target >= 50%)"
        )
        print(
            f"  disk: {disk_bw / 1e9:.2f} GB/s vs plain file read {raw_disk / 1e9:.2f} GB/s = "
            f"{disk_bw / raw_disk:.0%} (target >= 50%)",
            flush=True,
        )
        figures["load_bandwidth"] = {"host": host_bw, "dram_copy": raw_dram, "disk": disk_bw, "disk_read": raw_disk}

        print("\n   TTFT speed-up over cold and distance to the bound (bytes / raw bandwidth + device-hit TTFT)")
        for n, row in table.items():
            for tier, raw in (("host", raw_dram), ("disk", raw_disk)):
                bound = row["bytes"] / raw + row["device"]
                target = {"host": " (target >= 50x at 4k)", "disk": " (target >= 20x at 4k)"}[tier] if n == ref else ""
                print(
                    f"  {n:>5} {tier}: {row['cold'] / row[tier]:6.1f}x faster than cold{target}; "
                    f"{row[tier] * 1e3:.1f} ms vs bound {bound * 1e3:.1f} ms = {row[tier] / bound:.2f}x (target <= 1.5x)"
                )
        figures["ttft_s"] = {n: {k: v for k, v in row.items() if k != "keys"} for n, row in table.items()}

    if 3 not in skip:
        print(
            f"\n3. Multi-turn chat: {args.convs} conversations x {args.turns} turns, a {args.doc_tokens}-token "
            f"document each, users arriving every {args.stagger} s, device pool {args.device_blocks} blocks",
            flush=True,
        )
        shape = (args.convs, args.turns, args.doc_tokens, args.stagger, args.device_blocks)
        runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for r in range(args.chat_rounds):  # arms in ABC, CBA, ... order: they share the machine's drift
            for arm in list(ARMS)[:: 1 if r % 2 == 0 else -1]:
                row = multi_turn(arm, *shape, base / f"chat{r}")
                runs[arm].append(row)
                print(
                    f"  round {r + 1} {arm:13}: prefill tokens computed {row['computed']:>7} | TTFT mean "
                    f"{row['mean']:.2f} s, p50 {row['p50']:.2f} s, p95 {row['p95']:.2f} s | wall {row['wall']:.0f} s",
                    flush=True,
                )
        chat = {arm: mean_of(rows) for arm, rows in runs.items()}
        for name, r in chat.items():
            print(
                f"  {name:13}: prefill tokens computed {r['computed']:>7.0f} | TTFT mean {r['mean']:.2f} s "
                f"(rounds {', '.join(f'{x:.2f}' for x in r['rounds'])})"
            )
        off = chat["off"]
        for name in ("on", "write_through"):
            r = chat[name]
            print(
                f"  store {name} vs off: {off['computed'] / r['computed']:.1f}x fewer prefill tokens, "
                f"{off['mean'] / r['mean']:.2f}x lower mean TTFT{' (target >= 4x)' if name == 'on' else ''}"
            )
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(chat["on"], off, Path(args.plot))
        print(f"  plot: {args.plot}")
        figures["multi_turn"] = {
            "shape": dict(zip(("convs", "turns", "doc_tokens", "stagger_s", "device_blocks"), shape)),
            "rounds": args.chat_rounds,
            "arms": chat,
            "runs": runs,
            "ttft_ratio": off["mean"] / chat["on"]["mean"],
        }

    if 4 not in skip:
        print(
            f"\n4. The store where the device pool suffices: 4 conversations x 3 turns over "
            f"{args.fit_doc_tokens}-token documents, one request at a time, then {args.decode_users} concurrent "
            f"decodes (64-token prompts, 64 tokens); {args.fit_rounds} rounds, arms side by side",
            flush=True,
        )
        fit = no_tax(args.fit_rounds, 4, 3, args.fit_doc_tokens, args.decode_users, base / "fit")
        off = fit["mean"]["off"]
        for name in ("on", "write_through"):
            v = fit["mean"][name]
            print(
                f"  store {name:13} vs off: mean TTFT {v['ttft_mean']:.3f} vs {off['ttft_mean']:.3f} s = "
                f"{v['ttft_mean'] / off['ttft_mean']:.3f}x{' (target <= 1.03x)' if name == 'on' else ''}; "
                f"decode {v['decode_tok_s']:.1f} vs {off['decode_tok_s']:.1f} tok/s = "
                f"{v['decode_tok_s'] / off['decode_tok_s']:.3f}x{' (target >= 0.97x)' if name == 'on' else ''}"
            )
        figures["fits_device_pool"] = fit

    results.save("kv_store", figures)


if __name__ == "__main__":
    main()
