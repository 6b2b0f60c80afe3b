"""Command line: `kvtrove demo | generate | chat | serve | router | bench | cache | placement`.

Every engine option is a flag named like its LLM keyword."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from kvtrove.config import flat_fields


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    for name, f in flat_fields().items():
        flag = "--" + name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        kind = {"int": int, "int | None": int, "float": float}.get(str(f.type), str)
        p.add_argument(flag, dest=name, type=kind, default=f.default, help=f"{help_text} (default: {f.default})")


def add_router_flags(p: argparse.ArgumentParser) -> None:
    from kvtrove.router.config import RouterConfig
    from kvtrove.router.policy import POLICIES

    default = {name: f.default for name, f in RouterConfig.__dataclass_fields__.items()}
    p.add_argument("--engine", action="append", required=True, help="an engine's base URL (repeat for each engine)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--policy", choices=tuple(POLICIES), default=default["policy"], help="(default: %(default)s)")
    p.add_argument(
        "--min-match",
        type=float,
        default=default["min_match"],
        help="prefix policy: share of the request the best-matching engine must hold (default: %(default)s)",
    )
    p.add_argument(
        "--max-imbalance",
        type=int,
        default=default["max_imbalance"],
        help="prefix policy: most extra requests in flight on it vs the least loaded (default: %(default)s)",
    )
    p.add_argument(
        "--index-chunks",
        type=int,
        default=default["index_entries"],
        help="prefix index size in 128-character chunks, ~120 bytes each (default: 2^20)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        default=default["health_interval_s"],
        help="seconds between health checks (default: %(default)s)",
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $KVTROVE_API_KEY)")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (413 above)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in flat_fields()}


def cmd_demo(args: argparse.Namespace) -> int:
    """Two chat turns; the second resends the first turn and reuses its KV."""
    from kvtrove import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    impls = sorted({p.impl for p in llm.engine.placement if p.kind != "other"})
    print(
        f"loaded {llm.engine.config.model.model} ({args.dtype}, quantize={args.quantize}: "
        f"{' + '.join(impls)} weights) in {time.perf_counter() - t0:.1f}s"
    )
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    messages = [{"role": "user", "content": args.prompt}]
    for turn, follow_up in enumerate((args.follow_up, None), start=1):
        out = llm.chat(messages, params)[0]
        print(f"\n[turn {turn}] user: {messages[-1]['content']}\nassistant: {out.text.strip()}")
        print(
            f"  prompt tokens {out.prompt_tokens}, cached tokens {_cached(out)}, "
            f"TTFT {out.ttft_s * 1000:.1f} ms, {len(out.token_ids)} tokens out"
        )
        if follow_up is None:
            break
        messages += [{"role": "assistant", "content": out.text}, {"role": "user", "content": follow_up}]
    llm.close()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from kvtrove import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    out = None
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
    print()
    llm.close()
    if out is not None:
        print(
            f"[{out.prompt_tokens} prompt tokens, {_cached(out)} cached, TTFT {out.ttft_s * 1000:.1f} ms, "
            f"finish: {out.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat in the terminal; each turn resends the history, so its KV is reused."""
    import time

    from kvtrove import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("kvtrove chat: /reset clears the history, /exit (or Ctrl-D) quits", file=sys.stderr)
    try:
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                messages = messages[:1] if args.system else []
                continue
            if not line:
                continue
            messages.append({"role": "user", "content": line})
            t0, out = time.perf_counter(), None
            for out in llm.stream(llm.chat_prompt(messages), params):
                sys.stdout.write(out.outputs[0].delta_text)
                sys.stdout.flush()
            print()
            n = len(out.token_ids)
            decode_s = time.perf_counter() - t0 - (out.ttft_s or 0)
            rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
            print(
                f"[TTFT {out.ttft_s * 1000:.0f} ms, {rate:.1f} tokens/s, {out.prompt_tokens} prompt tokens, "
                f"{_cached(out)} cached]",
                file=sys.stderr,
            )
            messages.append({"role": "assistant", "content": out.text})
    finally:
        llm.close()
    return 0


BENCHMARKS = ("core", "kv_store", "server", "pool", "moe", "quant")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark of bench/ (a source checkout's; they are not part of the installed package)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / f"{args.name}.py").exists():
        raise ValueError(f"no bench/{args.name}.py next to this kvtrove ({root}); run it from a source checkout")
    return subprocess.call([sys.executable, "-m", f"bench.{args.name}", *args.args], cwd=root)


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible server; the engine steps on its own thread, uvicorn serves the API."""
    from pathlib import Path

    import uvicorn

    from kvtrove.config import EngineConfig, api_key_from_env
    from kvtrove.engine.engine import Engine
    from kvtrove.server.app import create_app
    from kvtrove.server.async_engine import AsyncEngine

    engine = Engine(EngineConfig.from_kwargs(**engine_kwargs(args)))
    name = args.served_model_name or Path(engine.config.model.model).name.removesuffix(".gguf")
    api_key = args.api_key or api_key_from_env()
    async_engine = AsyncEngine(engine, max_waiting=args.max_waiting)
    app = create_app(async_engine, name, api_key, max_body_bytes=int(args.max_body_mb * 2**20))
    auth = "bearer auth on" if api_key else "no auth"
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({auth})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        async_engine.stop()
    return 0


def cmd_router(args: argparse.Namespace) -> int:
    """The KV-aware front door for several `kvtrove serve` engines."""
    import uvicorn

    from kvtrove.config import api_key_from_env
    from kvtrove.router.app import create_router_app
    from kvtrove.router.config import RouterConfig

    config = RouterConfig(
        engines=args.engine,
        policy=args.policy,
        min_match=args.min_match,
        max_imbalance=args.max_imbalance,
        index_entries=args.index_chunks,
        health_interval_s=args.health_interval,
        api_key=args.api_key or api_key_from_env(),
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    app = create_router_app(config)
    auth = "bearer auth on" if config.api_key else "no auth"
    where = f"http://{args.host}:{args.port}/v1"
    print(f"routing {where} to {len(config.engines)} engine(s), policy {config.policy} ({auth})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def _cached(out) -> str:
    tiers = ", ".join(f"{t} {n}" for t, n in out.cached_tokens_by_tier.items() if n)
    return f"{out.cached_tokens} ({tiers})" if tiers else "0"


def cmd_cache(args: argparse.Namespace) -> int:
    """`cache stats`: what the disk tier holds now and the store's lifetime counters; `cache clear`: empty it."""
    from kvtrove.config import CacheConfig
    from kvtrove.kv import ledger
    from kvtrove.kv.tiers.disk import DiskTier

    directory = CacheConfig(kv_disk_dir=args.kv_disk_dir).kv_disk_dir
    disk = DiskTier(directory, capacity_bytes=2**62)
    if args.action == "clear":
        before = disk.stats()
        disk.clear()
        ledger.clear(directory)
        print(f"removed {before.entries} KV chunks ({_size(before.bytes)}) from {directory}")
        return 0
    now = disk.stats()
    totals = ledger.read(directory)
    print(f"KV store at {directory}: {now.entries} chunks, {_size(now.bytes)} on disk")
    if not totals:
        print("no engine has recorded counters here yet")
        return 0
    cols = ("hits", "misses", "evictions", "rejected", "bytes_read", "bytes_written", "tokens_saved")
    print(f"{'tier':<8}" + "".join(f"{c:>15}" for c in cols))
    for tier, counts in sorted(
        totals.items(), key=lambda kv: ("host", "disk").index(kv[0]) if kv[0] in ("host", "disk") else 9
    ):
        cells = [_size(counts.get(c, 0)) if c.startswith("bytes") else str(counts.get(c, 0)) for c in cols]
        print(f"{tier:<8}" + "".join(f"{v:>15}" for v in cells))
    print("(counters: totals over every engine that closed with this directory)")
    return 0


def cmd_placement(args: argparse.Namespace) -> int:
    """`placement show MODEL`: where each module of the model would run, with which implementation and how
    many bytes, under the built-in rules or `--placement FILE`. Needs only the model's config (a .gguf or a
    directory with config.json): the model is laid out on PyTorch's meta device, no weights are read."""
    import torch

    from kvtrove.config import ModelConfig
    from kvtrove.engine.engine import DTYPES
    from kvtrove.loader import load_config
    from kvtrove.loader.gguf_file import quantized_types
    from kvtrove.models.registry import model_class
    from kvtrove.placement import plan
    from kvtrove.placement.rules import load_rules

    mc = ModelConfig(
        model=args.model,
        dtype=args.dtype,
        quantize=args.quantize,
        quantize_group_size=args.quantize_group_size,
        placement=args.placement,
    )
    hf_config = load_config(mc.model)
    cls = model_class(hf_config)
    with torch.device("meta"):
        model = cls(hf_config, 1, DTYPES[mc.dtype]).to(DTYPES[mc.dtype])
    rules = load_rules(mc.placement) if mc.placement else None
    types = quantized_types(Path(mc.model)) if mc.model.endswith(".gguf") else {}
    stored = plan.stored_quantized(model, {name: (None, t) for name, t in types.items()})
    placed = plan.plan(model, rules, mc.quantize, mc.quantize_group_size, stored)
    source = mc.placement or f"built-in rules for {cls.__name__}"
    print(f"{mc.model}: {cls.__name__}, {mc.dtype}, quantize={mc.quantize}, placement: {source}")
    print(plan.describe(placed))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvtrove", description="kvtrove: LLM inference that reuses KV instead of recomputing it"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="answer a chat prompt, then a follow-up that reuses the first turn's KV")
    demo.add_argument("--prompt", default="What is the capital of France?")
    demo.add_argument("--follow-up", default="And what is the capital of Germany?")
    demo.add_argument("--max-tokens", type=int, default=64)
    add_engine_flags(demo)
    demo.set_defaults(func=cmd_demo)
    gen = sub.add_parser("generate", help="complete one prompt and stream the answer")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    add_engine_flags(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="chat in the terminal, with TTFT, tokens/s and cached tokens per turn")
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--seed", type=int, default=None)
    add_engine_flags(chat)
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API (/v1/chat/completions, /v1/completions, ...)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $KVTROVE_API_KEY)")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: file name)")
    serve.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond which new ones get 429")
    serve.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (413 above)")
    add_engine_flags(serve)
    serve.set_defaults(func=cmd_serve)
    router = sub.add_parser("router", help="one OpenAI-compatible front door for several engines, KV-aware")
    add_router_flags(router)
    router.set_defaults(func=cmd_router)
    bench = sub.add_parser(
        "bench", help="run a benchmark: core (engine vs HF and llama.cpp), kv_store, server, pool, moe, quant"
    )
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (see its --help)")
    bench.set_defaults(func=cmd_bench)
    cache = sub.add_parser("cache", help="show or clear the KV store's disk tier")
    cache.add_argument("action", choices=("stats", "clear"))
    cache.add_argument("--kv-disk-dir", default=None, help="the disk tier's directory (default: <cache dir>/kv)")
    cache.set_defaults(func=cmd_cache)
    place = sub.add_parser("placement", help="show where each module of a model runs (device, implementation, bytes)")
    place.add_argument("action", choices=("show",))
    place.add_argument("model", nargs="?", default=None, help="a .gguf file or a directory with config.json")
    place.add_argument("--placement", default=None, help="YAML rules file (default: the built-in rules)")
    place.add_argument(
        "--quantize", default="auto", choices=("auto", "none", "int8", "int4"), help="what `impl: auto` means"
    )
    place.add_argument("--quantize-group-size", type=int, default=32)
    place.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    place.set_defaults(func=cmd_placement)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
