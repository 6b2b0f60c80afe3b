"""Blending benchmark (`kv_blend`), all measured in this run on this machine. Run: `python -m bench.blend`.

1. RAG: a pool of 20 passages (~660 tokens each, cut from the license texts under
   /usr/share/common-licenses, each with a planted fact in its middle: "The code word of the heron
   archive is amber."); each query is a chat message whose text parts are 6 passages drawn from the
   pool in a shuffled order, then a question about one of them (~4k prompt tokens). Agreement: the
   answer word of blending's greedy answer equals full prefill's.
   Arms, each a fresh engine: full prefill (prefix caching off), prefix caching (store on, blending
   off), blending at ratio 0.15 with the first 4 tokens of each found run recomputed. The blending and prefix-caching engines first see the pool once
   (warm-up queries, not timed). Reported: mean TTFT per arm, blending's greedy answers agreeing with
   full prefill's, and the ratios.
2. Changing header: a ~2k-token system prompt preceded by a line that changes per request (a
   timestamp): prefix caching vs blending, mean TTFT.
3. Decay: a long stream of RAG queries (each with new question text) over the same pool, on a
   blending engine whose host tier (`--decay-host-gb`) fills and evicts: the share of each prompt
   reused by blending, per query, plotted (bench/results/blend_decay.png); it must stay flat.

Writes bench/results/blend.json.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import tempfile
from pathlib import Path

from bench import results
from bench.core import hardware
from kvtrove import LLM, SamplingParams

LICENSES = Path("/usr/share/common-licenses")
WORDS = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
         "kelp", "lumen", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra"]  # fmt: skip
NOUNS = ["heron", "salt", "copper", "quince", "lantern", "anchor", "willow", "granite", "falcon", "meadow",
         "barley", "cobalt", "thistle", "otter", "beacon", "walnut", "glacier", "sparrow", "harp", "lily"]  # fmt: skip
ANSWER = SamplingParams(temperature=0, max_tokens=12)


def passages(tok, n: int, tokens: int) -> list[str]:
    """`n` passages of about `tokens` tokens from the license texts, each with a planted fact."""
    text = " ".join(" ".join(p.read_text(errors="ignore").split()) for p in sorted(LICENSES.iterdir()) if p.is_file())
    ids = tok.encode(text, add_special_tokens=False)
    out = []
    for k in range(n):
        body = tok.decode(ids[k * tokens : (k + 1) * tokens - 20])
        cut = len(body) // 2
        fact = f" The code word of the {NOUNS[k]} archive is {WORDS[k]}. "
        out.append(f"{body[:cut]}{fact}{body[cut:]}\n")
    return out


def rag_queries(pool: list[str], n: int, per: int, seed: int) -> list[tuple[list[str], str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        picked = rng.sample(range(len(pool)), per)
        k = rng.choice(picked)
        out.append(([pool[i] for i in picked], f"What is the code word of the {NOUNS[k]} archive?"))
    return out


def chat(llm: LLM, texts: list[str]) -> dict:
    return llm.chat_prompt([{"role": "user", "content": [{"type": "text", "text": t} for t in texts]}])


def answer_word(text: str) -> str:
    m = re.search(r"\bis\W+(\w+)", text)
    return m.group(1).lower() if m else text.strip()[:12].lower()


def timed(llm: LLM, prompt, params=ANSWER):
    """The output and its time to first token (the engine's, arrival to first token)."""
    out = llm.generate(prompt, params)[0]
    return out, out.ttft_s


def plot(reuse: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(reuse) + 1), reuse, ".-")
    ax.set_xlabel("query")
    ax.set_ylabel("prompt share reused by blending")
    ax.set_ylim(0, 1)
    ax.set_title("kvtrove blending: reuse over a stream of RAG queries")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=20)
    ap.add_argument("--passage-tokens", type=int, default=660)
    ap.add_argument("--per-query", type=int, default=6)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--header-queries", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--head-tokens", type=int, default=4, help="first tokens of each found run recomputed")
    ap.add_argument("--decay-queries", type=int, default=200)
    ap.add_argument("--decay-host-gb", type=float, default=0.4, help="small enough to fill and evict")
    ap.add_argument("--plot", default="bench/results/blend_decay.png")
    args = ap.parse_args()
    print(f"hardware: {hardware()}")
    common = dict(max_num_batched_tokens=8192, num_blocks=2048)
    tmp = tempfile.mkdtemp(prefix="kvtrove-blend-")
    full = LLM(enable_prefix_caching=False, **common)
    prefix = LLM(kv_disk_dir=tmp + "/prefix", **common)
    knobs = dict(kv_blend=True, kv_blend_ratio=args.ratio, kv_blend_head_tokens=args.head_tokens)
    blend = LLM(kv_disk_dir=tmp + "/blend", **knobs, **common)
    tok = full.get_tokenizer()
    pool = passages(tok, args.pool, args.passage_tokens)
    for start in range(0, len(pool), args.per_query):  # every engine with a store sees the pool once
        warm = chat(full, pool[start : start + args.per_query] + ["Which text is first?"])
        for llm in (prefix, blend):
            llm.generate(warm, SamplingParams(max_tokens=1))
    queries = rag_queries(pool, args.queries, args.per_query, seed=1)
    ttft = {"full": [], "prefix": [], "blend": []}
    agree, prompt_tokens, blended = 0, [], []
    for i, (parts, question) in enumerate(queries):
        prompt = chat(full, [*parts, question])
        want, t_full = timed(full, prompt)
        _, t_prefix = timed(prefix, prompt)
        got, t_blend = timed(blend, prompt)
        ttft["full"].append(t_full)
        ttft["prefix"].append(t_prefix)
        ttft["blend"].append(t_blend)
        same = answer_word(got.text) == answer_word(want.text)
        agree += same
        prompt_tokens.append(got.prompt_tokens)
        blended.append(got.blended_tokens)
        print(
            f"  query {i + 1}: {got.prompt_tokens} tokens, {got.blended_tokens} blended + "
            f"{got.blend_recomputed_tokens} recomputed | full {t_full:.2f} s, prefix {t_prefix:.2f} s, "
            f"blend {t_blend:.2f} s | answers {'agree' if same else 'differ'}: "
            f"{want.text!r} / {got.text!r}"
        )
    mean = {k: statistics.mean(v) for k, v in ttft.items()}
    print(
        f"1. RAG ({args.per_query} of {args.pool} passages, ~{statistics.mean(prompt_tokens):.0f} prompt tokens): "
        f"mean TTFT full {mean['full']:.2f} s, prefix caching {mean['prefix']:.2f} s, blending "
        f"{mean['blend']:.2f} s = {mean['full'] / mean['blend']:.2f}x lower than full prefill (target >= 3x); "
        f"answers agree with full prefill on {agree} of {len(queries)}"
    )
    # 2. a long system prompt after a line that changes per request
    system = "".join(pool[:3])
    header = {"prefix": [], "blend": []}
    for i in range(args.header_queries + 1):
        stamp = f"Request time: 2026-12-04 10:{i:02d}:{(7 * i) % 60:02d} UTC\n"
        prompt = full.chat_prompt(
            [
                {"role": "system", "content": [{"type": "text", "text": stamp}, {"type": "text", "text": system}]},
                {"role": "user", "content": "Say hello."},
            ]
        )
        for name, llm in (("prefix", prefix), ("blend", blend)):
            out, t = timed(llm, prompt)
            if i:  # the first request only stores the system prompt
                header[name].append(t)
    hmean = {k: statistics.mean(v) for k, v in header.items()}
    print(
        f"2. changing header (~{out.prompt_tokens} tokens): mean TTFT prefix caching {hmean['prefix']:.2f} s, "
        f"blending {hmean['blend']:.2f} s = {hmean['prefix'] / hmean['blend']:.2f}x lower (target >= 3x)"
    )
    # 3. reuse over a long stream of queries, in a host tier that fills
    decay_llm = LLM(kv_disk_gb=0, kv_host_gb=args.decay_host_gb, **knobs, **common)
    for start in range(0, len(pool), args.per_query):
        decay_llm.generate(chat(full, pool[start : start + args.per_query] + ["Which text is first?"]), ANSWER)
    reuse = []
    for i, (parts, _) in enumerate(rag_queries(pool, args.decay_queries, args.per_query, seed=2)):
        question = f"Query {i}: which of these texts mentions an archive, and what is its code word?"
        out = decay_llm.generate(chat(full, [*parts, question]), SamplingParams(max_tokens=1))[0]
        reuse.append((out.blended_tokens + out.blend_recomputed_tokens) / out.prompt_tokens)
    host = decay_llm.cache_stats()["host"]
    quarter = max(1, len(reuse) // 4)
    first_q, last_q = statistics.mean(reuse[:quarter]), statistics.mean(reuse[-quarter:])
    print(
        f"3. decay: {len(reuse)} queries, host tier {args.decay_host_gb} GB ({host['evictions']} evictions): "
        f"prompt share reused by blending, first quarter {first_q:.3f}, last quarter {last_q:.3f}"
    )
    plot(reuse, Path(args.plot))
    print(f"  plot: {args.plot}")
    results.save(
        "blend",
        {
            "hardware": hardware(),
            "rag": {
                "ttft_s": ttft,
                "mean_s": mean,
                "ratio_full_over_blend": mean["full"] / mean["blend"],
                "agree": agree,
                "queries": len(queries),
                "prompt_tokens": prompt_tokens,
                "blended_tokens": blended,
                "kv_blend_ratio": args.ratio,
                "kv_blend_head_tokens": args.head_tokens,
            },
            "header": {"ttft_s": header, "mean_s": hmean, "ratio_prefix_over_blend": hmean["prefix"] / hmean["blend"]},
            "decay": {
                "reuse": reuse,
                "first_quarter": first_q,
                "last_quarter": last_q,
                "host_gb": args.decay_host_gb,
                "host_evictions": host["evictions"],
            },
        },
    )


if __name__ == "__main__":
    main()
