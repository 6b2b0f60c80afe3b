"""The KV-aware router: its prefix index and policies on their own, then in front of two real engine
servers, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from kvtrove.loader.gguf_file import converted
from kvtrove.router.app import create_router_app
from kvtrove.router.config import RouterConfig
from kvtrove.router.policy import Candidate, Choice, LeastLoaded, PrefixAware, RoundRobin
from kvtrove.router.prefix_index import PrefixIndex, request_text
from tests.helpers import drop_stream_early
from tests.test_server import KEY, http, launch, metric, wait_blocks_free, wait_up

# ---- the prefix index and the policies ------------------------------------------------------------------


def test_request_text_grows_with_the_conversation_and_never_raises():
    chat = lambda *messages: request_text("/v1/chat/completions", {"messages": list(messages)})
    completion = lambda prompt: request_text("/v1/completions", {"prompt": prompt})
    system, q1 = {"role": "system", "content": "doc"}, {"role": "user", "content": "q1"}
    first, second = chat(system, q1), chat(system, q1, {"role": "assistant", "content": "a1"}, q1)
    assert second.startswith(first) and len(second) > len(first)
    as_parts = {"role": "system", "content": [{"type": "text", "text": "d"}, {"type": "text", "text": "oc"}]}
    assert chat(as_parts) == chat(system)  # text parts read as one string, as the engine reads them
    # a newline and a fake message inside one content cannot pass for two messages
    one = {"role": "user", "content": 'x"]\n["user", "y'}
    assert chat(one) != chat({"role": "user", "content": "x"}, {"role": "user", "content": "y"})
    assert completion([1, 2, 3, 4]).startswith(completion([1, 2, 3]))
    assert not completion([1, 2, 34]).startswith(completion([1, 2, 3]))
    assert completion(["abc", "def"]) == completion("abc") != completion([97, 98, 99])
    assert completion("\ud800 a lone surrogate")
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for body in ({"messages": "x"}, {"prompt": {"a": 1}}, {}, {"messages": [7, None, {"content": deep}]}):
        assert isinstance(request_text("/v1/chat/completions", body), str)
        assert isinstance(request_text("/v1/completions", body), str)


def test_prefix_index_matches_whole_chunks_from_the_start():
    index = PrefixIndex(chunk_chars=4, max_entries=100)
    index.insert("abcdefghij", "A")  # chunks abcd, efgh (+ "ij", not full)
    assert index.match("abcdefghijkl") == {"A": 8}
    assert index.match("abcdefXX") == {"A": 4}
    assert index.match("Xbcdefgh") == {}  # consecutive from the start only
    index.insert("abcdzzzz", "B")
    assert index.match("abcdefgh") == {"A": 8, "B": 4}
    assert index.match("abcdzzzzefgh") == {"B": 8, "A": 4}
    index.forget("A")
    assert index.match("abcdefgh") == {"B": 4}
    index.insert("abcd", "A")  # the same name again after a restart
    assert index.match("abcdefgh") == {"B": 4, "A": 4}
    index.insert("\ud800" * 9, "A")  # JSON may carry lone surrogates
    assert index.match("\ud800" * 8) == {"A": 8}


def test_prefix_index_is_bounded_and_forgets_chains_from_the_tail():
    index = PrefixIndex(chunk_chars=2, max_entries=6)
    index.insert("aabbccdd", "A")
    index.insert("eeffgg", "B")
    assert len(index) == 6
    assert index.match("aabbccdd") == {"A": 6}  # A's tail chunk went first, its head stays
    assert index.match("eeffgg") == {"B": 6}
    for i in range(100):
        index.insert(f"{i:04d}{i:04d}", "A")
    assert len(index) == 6


def test_policies():
    c = [Candidate("A", load=0, matched=0), Candidate("B", load=0, matched=0)]
    rr = RoundRobin()
    assert [rr.choose(c, 100).engine for _ in range(4)] == ["A", "B", "A", "B"]
    ll = LeastLoaded()
    assert ll.choose([Candidate("A", 3), Candidate("B", 1)], 0).engine == "B"
    assert {ll.choose(c, 0).engine for _ in range(2)} == {"A", "B"}  # ties take turns
    prefix = PrefixAware(min_match=0.25, max_imbalance=4)
    hit = [Candidate("A", load=5, matched=800), Candidate("B", load=1, matched=0)]
    assert prefix.choose(hit, 1000) == Choice("A", "prefix")  # 4 more requests than B: still worth it
    busy = [Candidate("A", load=6, matched=800), Candidate("B", load=1, matched=0)]
    assert prefix.choose(busy, 1000) == Choice("B", "least-loaded")
    short = [Candidate("A", load=0, matched=200), Candidate("B", load=0, matched=0)]
    assert prefix.choose(short, 1000).reason == "least-loaded"  # 20% of the text is not worth a detour
    both = [Candidate("A", load=3, matched=800), Candidate("B", load=1, matched=800)]
    assert prefix.choose(both, 1000).engine == "B"  # equal matches: the less loaded


def test_router_config_is_validated():
    assert RouterConfig(["http://h:1/", "http://h:2/v1"]).engines == ["http://h:1", "http://h:2"]
    for bad in (
        dict(engines=[]),
        dict(engines=["h:1"]),
        dict(engines=["http://h:1", "http://h:1/"]),
        dict(engines=["http://h:1"], policy="random"),
        dict(engines=["http://h:1"], min_match=2),
        dict(engines=["http://h:1"], max_imbalance=-1),
    ):
        with pytest.raises(ValueError):
            RouterConfig(**bad)


# ---- the forwarding rules, against stand-in engines -------------------------------------------------------


def stand_in(name: str, behaviour: str) -> FastAPI:
    """An engine that answers every chat request one way: "ok" (JSON naming itself), "full" (429), or
    "breaks" (an SSE stream that dies after its first event)."""
    app = FastAPI()

    @app.get("/health")
    async def health_():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat():
        if behaviour == "full":
            return JSONResponse({"error": {"message": "busy", "type": "rate_limit_error", "code": 429}}, 429)
        if behaviour == "breaks":

            async def events():
                yield 'data: {"choices": []}\n\n'
                raise RuntimeError("the engine died")

            return StreamingResponse(events(), media_type="text/event-stream")
        return {"engine": name}

    return app


@contextlib.contextmanager
def serving(*apps: FastAPI):
    """Each app on its own loopback port, served by uvicorn on a thread; yields their base URLs."""
    servers, threads = [], []
    for app, port in zip(apps, free_ports(len(apps))):
        servers.append(uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical")))
        threads.append(threading.Thread(target=servers[-1].run, daemon=True))
        threads[-1].start()
    try:
        wait_until(lambda: all(s.started for s in servers))
        yield [f"http://127.0.0.1:{s.config.port}" for s in servers]
    finally:
        for s in servers:
            s.should_exit = True
        for t in threads:
            t.join(timeout=10)


def test_forwarding_rules_against_stand_in_engines():
    ask = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    with serving(stand_in("A", "full"), stand_in("B", "ok"), stand_in("C", "breaks")) as (full, ok, breaks):
        config = dict(policy="round-robin", health_interval_s=0.2)
        routers = (
            create_router_app(RouterConfig([full, ok], **config)),
            create_router_app(RouterConfig([full], **config)),
            create_router_app(RouterConfig([breaks], **config)),
        )
        with serving(*routers) as (to_full_and_ok, to_full, to_breaks), httpx.Client(timeout=30) as client:
            # a full engine is passed over, not taken out
            answers = [client.post(to_full_and_ok + "/v1/chat/completions", json=ask) for _ in range(4)]
            assert [(r.status_code, r.json()) for r in answers] == [(200, {"engine": "B"})] * 4
            assert metric(to_full_and_ok, f'kvtrove_router_retries_total{{engine="{full}"}}') >= 2
            assert all(e["healthy"] for e in health(to_full_and_ok)[1]["engines"])
            r = client.post(to_full + "/v1/chat/completions", json=ask)  # nowhere else to go: its 429
            assert r.status_code == 429 and r.json()["error"]["message"] == "busy"
            # a stream that broke after its first event ends with an error event; the engine leaves rotation
            # until a health check passes again
            r = client.post(to_breaks + "/v1/chat/completions", json={**ask, "stream": True})
            events = [json.loads(e[len("data: ") :]) for e in r.text.split("\n\n") if e.startswith("data: ")]
            assert events[0] == {"choices": []} and events[-1]["error"]["type"] == "server_error"
            assert metric(to_breaks, f'kvtrove_router_engine_out_total{{engine="{breaks}"}}') == 1
            wait_until(lambda: health(to_breaks)[0] == 200, timeout=10)


# ---- two engines behind the router ------------------------------------------------------------------

ENGINE_FLAGS = ("--kv-disk-gb", "0", "--kv-host-gb", "0", "--num-blocks", "512", "--num-threads", "1")


@dataclass
class Cluster:
    engines: dict[str, subprocess.Popen]  # base URL -> process
    router: str  # --policy prefix, checking the engines' API key itself too
    round_robin: str  # --policy round-robin, no key of its own


@pytest.fixture(scope="module")
def cluster(smollm_path, tmp_path_factory):
    procs: list[subprocess.Popen] = []

    def start(*args: str, port: int | None = None):
        proc, base, log = launch(tmp_path_factory, *args, port=port)
        procs.append(proc)
        return proc, base, log

    engine_args = ("serve", "--api-key", KEY, "--model", smollm_path, *ENGINE_FLAGS)
    try:
        ports = free_ports(4)
        to_engines = [x for p in ports[:2] for x in ("--engine", f"http://127.0.0.1:{p}")]
        routers = [
            start("router", *to_engines, "--api-key", KEY, port=ports[2]),
            start("router", *to_engines, "--policy", "round-robin", port=ports[3]),
        ]
        if smollm_path.endswith(".gguf"):  # convert it once here, so that the two engines only load it
            converted(Path(smollm_path))
        engines = [start(*engine_args, port=p) for p in ports[:2]]
        for proc, base, log in engines:
            wait_up(proc, base, log)
        for proc, base, log in routers:
            wait_up(proc, base, log, ready=(200, 503))
            wait_until(lambda base=base: all(e["healthy"] for e in health(base)[1]["engines"]))
        yield Cluster({base: proc for proc, base, _ in engines}, routers[0][1], routers[1][1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def model(cluster):
    return openai.OpenAI(base_url=cluster.router + "/v1", api_key=KEY, max_retries=0).models.list().data[0].id


def health(base: str) -> tuple[int, dict]:
    code, raw = http("GET", base + "/health")
    return code, json.loads(raw)


def wait_until(ready, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


TOPICS = (
    "river stone market copper lantern harvest signal orchard winter ledger bridge engine candle meadow "
    "archive valley compass thunder garden harbor silver forest canvas quarry beacon timber saddle glacier "
    "mirror violet anchor prairie furnace velvet cobalt summit tunnel falcon marble ember pepper walnut"
)


def document(tag: str, user: int, words: int = 240) -> str:
    """A system document of ~300 tokens that shares no prefix with any other (tag, user)."""
    rng = random.Random(f"{tag}-{user}")
    body = " ".join(rng.choice(TOPICS.split()) for _ in range(words))
    return f"Notes {tag}-{user}. Answer briefly from these notes only.\n{body}"


async def workload(base: str, model: str, tag: str, users: int = 5, turns: int = 3):
    """`users` chats of `turns` turns over their own documents; each turn's requests run concurrently, sent
    in user order (an odd number of users, so round robin does not keep each user on one engine by chance).
    Returns (cached / prompt tokens over all requests, the conversations)."""

    async def ask(chat: list[dict], delay: float):
        await asyncio.sleep(delay)
        return await ac.chat.completions.create(model=model, messages=list(chat), max_tokens=8, temperature=0)

    ac = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    chats = [[{"role": "system", "content": document(tag, u)}] for u in range(users)]
    prompt = cached = 0
    try:
        for t in range(turns):
            for chat in chats:
                chat.append({"role": "user", "content": f"Question {t + 1}: which word comes up most?"})
            outs = await asyncio.gather(*(ask(chat, 0.05 * u) for u, chat in enumerate(chats)))
            for chat, r in zip(chats, outs):
                prompt += r.usage.prompt_tokens
                cached += r.usage.prompt_tokens_details.cached_tokens
                chat.append({"role": "assistant", "content": r.choices[0].message.content})
    finally:
        await ac.close()
    return cached / prompt, chats


def test_prefix_routing_hits_the_cache_more_than_round_robin(cluster, model):
    async def both():  # at the same time, each through its router with its own documents
        return await asyncio.gather(
            workload(cluster.round_robin, model, "rr"), workload(cluster.router, model, "prefix")
        )

    (rr_rate, _), (prefix_rate, chats) = asyncio.run(both())
    print(f"cache hit rate: round-robin {rr_rate:.2f}, prefix {prefix_rate:.2f}", file=sys.stderr)
    assert prefix_rate > 0.5 and prefix_rate > rr_rate + 0.15
    text = http("GET", cluster.router + "/metrics")[1].decode()
    routed_by_prefix = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kvtrove_router_requests_total{") and 'reason="prefix"' in line
    )
    assert routed_by_prefix >= 10  # every later turn
    # the router changes nothing in the answer: the same greedy text as straight from an engine
    direct = openai.OpenAI(base_url=next(iter(cluster.engines)) + "/v1", api_key=KEY, max_retries=0)
    for chat in chats[:2]:
        again = direct.chat.completions.create(model=model, messages=chat[:-1], max_tokens=8, temperature=0)
        assert again.choices[0].message.content == chat[-1]["content"]


def test_streaming_passes_through(cluster, model):
    client = openai.OpenAI(base_url=cluster.router + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens and not chunks[-1].choices
    parts = list(client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, stream=True))
    assert "".join(p.choices[0].text for p in parts)


def test_bad_input_gets_openai_errors_and_the_router_keeps_serving(cluster, model):
    chat_url = cluster.router + "/v1/chat/completions"
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000):
        code, raw = http("POST", chat_url, body)
        assert code == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error", raw
    code, raw = http("POST", chat_url, json.dumps({"model": model, "messages": []}).encode())
    assert code == 400 and "messages" in json.loads(raw)["error"]["message"]  # the engine's own answer
    code, raw = http("GET", cluster.router + "/v1/nothing-here")
    assert code == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
    assert http("GET", chat_url)[0] == 405
    assert http("GET", cluster.router + "/v1/models", key="wrong")[0] == 401  # the router's key
    assert http("GET", cluster.round_robin + "/v1/models", key="wrong")[0] == 401  # an engine's, passed through
    out = openai.OpenAI(base_url=cluster.router + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert out.choices[0].message.content


def test_a_client_leaving_a_stream_frees_the_engine(cluster, model):
    client = openai.OpenAI(base_url=cluster.router + "/v1", api_key=KEY, max_retries=0)
    drop_stream_early(client, model)
    for engine in cluster.engines:
        wait_blocks_free(engine)
    wait_until(lambda: all(e["in_flight"] == 0 for e in health(cluster.router)[1]["engines"]), timeout=10)


def in_flight(router: str, engine: str) -> int:
    return next(e["in_flight"] for e in health(router)[1]["engines"] if e["url"] == engine)


def test_a_killed_engine_is_taken_out_and_requests_still_succeed(cluster, model):
    """Runs last: it kills both engines."""
    client = openai.OpenAI(base_url=cluster.router + "/v1", api_key=KEY, max_retries=0)
    story = [{"role": "user", "content": "Tell me a very long story about a dragon."}]
    stream = client.chat.completions.create(
        model=model, messages=story, max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    victim = next(url for url in cluster.engines if in_flight(cluster.router, url))
    survivor = next(url for url in cluster.engines if url != victim)

    async def ask(ac, i: int) -> str:
        messages = [{"role": "user", "content": f"Count from {i} to {i + 5}."}]
        r = await ac.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        return r.choices[0].message.content

    async def main():
        ac = openai.AsyncOpenAI(base_url=cluster.router + "/v1", api_key=KEY, max_retries=0)
        try:
            before = [asyncio.create_task(ask(ac, i)) for i in range(8)]
            deadline = time.time() + 30
            while in_flight(cluster.router, victim) < 2:  # the stream and at least one of these
                assert time.time() < deadline
                await asyncio.sleep(0.02)
            cluster.engines[victim].send_signal(signal.SIGKILL)
            cluster.engines[victim].wait()
            after = [asyncio.create_task(ask(ac, 100 + i)) for i in range(4)]
            return await asyncio.gather(*before, *after)
        finally:
            await ac.close()

    answers = asyncio.run(main())
    assert len(answers) == 12 and all(answers)
    with pytest.raises(openai.APIError):  # the stream had started: it cannot move, it ends with an error
        for _ in chunks:
            pass
    code, state = health(cluster.router)
    assert code == 200
    assert {e["url"]: e["healthy"] for e in state["engines"]} == {victim: False, survivor: True}
    assert metric(cluster.router, f'kvtrove_router_retries_total{{engine="{victim}"}}') >= 1
    assert metric(cluster.router, "kvtrove_router_engines_healthy") == 1
    assert metric(cluster.router, f'kvtrove_router_engine_out_total{{engine="{victim}"}}') == 1

    # and with no engine left: 503, in OpenAI's shape
    cluster.engines[survivor].send_signal(signal.SIGKILL)
    cluster.engines[survivor].wait()
    wait_until(lambda: health(cluster.router)[0] == 503, timeout=10)
    body = json.dumps({"model": model, "messages": story, "max_tokens": 4}).encode()
    code, raw = http("POST", cluster.router + "/v1/chat/completions", body)
    assert code == 503 and json.loads(raw)["error"]["type"] == "server_error"
    with pytest.raises(openai.InternalServerError):
        client.models.list()
