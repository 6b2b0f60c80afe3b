"""The OpenAI-compatible server as a real process on a loopback port, driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from kvtrove import SamplingParams
from tests.helpers import drop_stream_early

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, key: str | None = KEY, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def launch(tmp_path_factory, *args: str, port: int | None = None) -> tuple[subprocess.Popen, str, Path]:
    """`python -m kvtrove.cli ARGS --port P` on loopback (a free port by default): (process, base URL, log)."""
    port = port or free_port()
    log = tmp_path_factory.mktemp(args[0]) / f"{args[0]}.log"
    cmd = [sys.executable, "-m", "kvtrove.cli", *args, "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    return proc, f"http://127.0.0.1:{port}", log


def wait_up(proc: subprocess.Popen, base: str, log: Path, ready: tuple[int, ...] = (200,), timeout: float = 300):
    """Wait until GET /health answers with a status in `ready`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if http("GET", base + "/health")[0] in ready:
                return
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not come up: {log.read_text()}")


def start_server(smollm_path, tmp_path_factory, *extra: str):
    flags = ("--api-key", KEY, "--model", smollm_path, "--kv-disk-gb", "0", *extra)
    proc, base, log = launch(tmp_path_factory, "serve", *flags)
    wait_up(proc, base, log)
    return proc, base


@pytest.fixture(scope="module")
def server(smollm_path, tmp_path_factory):
    proc, base = start_server(smollm_path, tmp_path_factory, "--num-blocks", "512", "--max-body-mb", "0.05")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def metric(server: str, name: str) -> float:
    text = http("GET", server + "/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_blocks_free(server: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while metric(server, "kvtrove_kv_blocks_in_use") and time.time() < deadline:
        time.sleep(0.2)
    assert metric(server, "kvtrove_kv_blocks_in_use") == 0
    assert metric(server, "kvtrove_requests_running") == 0


CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_chat_and_cached_tokens(client, model, server):
    assert model == "SmolLM2-135M-Instruct.Q4_1"
    first = client.chat.completions.create(model=model, messages=CAPITAL, max_tokens=24, temperature=0)
    assert "Paris" in first.choices[0].message.content
    assert first.choices[0].finish_reason == "stop" and first.object == "chat.completion"
    u = first.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    again = client.chat.completions.create(model=model, messages=CAPITAL, max_tokens=24, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == (u.prompt_tokens - 1) // 16 * 16 > 0
    assert metric(server, 'kvtrove_cached_prompt_tokens_total{tier="device"}') > 0
    # what inference gateways read, under vLLM's names
    labels = f'{{model_name="{model}"}}'
    assert metric(server, "vllm:num_requests_waiting" + labels) == metric(server, "kvtrove_requests_waiting")
    assert metric(server, "vllm:num_requests_running" + labels) == 0
    assert 0 <= metric(server, "vllm:kv_cache_usage_perc" + labels) <= 1


def test_streaming_chat_with_usage(client, model):
    want = client.chat.completions.create(model=model, messages=CAPITAL, max_tokens=24, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=CAPITAL,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens and not chunks[-1].choices


def test_completion_stop_logprobs_n_and_seed(client, model):
    out = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=12, temperature=0, stop=["."], logprobs=2
    )
    c = out.choices[0]
    assert "." not in c.text and c.finish_reason == "stop" and "Paris" in c.text
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) >= 1
    assert all(len(top) >= 1 for top in c.logprobs.top_logprobs)
    kw = dict(model=model, messages=[{"role": "user", "content": "Tell me a word."}], max_tokens=10, temperature=1.0)
    a = client.chat.completions.create(seed=7, n=2, **kw)
    b = client.chat.completions.create(seed=7, n=2, **kw)
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    assert len(a.choices) == 2 and {x.index for x in a.choices} == {0, 1}
    lp = client.chat.completions.create(logprobs=True, top_logprobs=3, max_completion_tokens=4, **{**kw, "seed": 1})
    first = lp.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 3 and first.logprob <= 0
    assert lp.usage.completion_tokens <= 4
    many = client.completions.create(model=model, prompt=["One", "Two"], max_tokens=3, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]


def test_completion_echo_gives_the_prompt_and_its_logprobs(client, model, smollm):
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens 1 over token ids; the prompt tokens'
    logprobs equal the engine's own prompt_logprobs (first token null). Also string prompts, max_tokens 0
    (the prompt alone) and streaming."""
    ref = smollm  # the server's engine settings (the pool's size does not change a number)
    ids = ref.get_tokenizer().encode("Question: what is the capital of France? Answer: Paris")
    want = ref.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    out = client.completions.create(model=model, prompt=ids, echo=True, logprobs=2, max_tokens=1, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == pytest.approx(want.prompt_logprobs[p][ids[p]], abs=1e-5)
        assert len(lp.top_logprobs[p]) == 2
    assert lp.text_offset == sorted(lp.text_offset) and out.choices[0].text.endswith(want.text)
    text = "The capital of France is"
    only = client.completions.create(model=model, prompt=text, echo=True, logprobs=0, max_tokens=0)
    assert only.choices[0].text == text and only.usage.completion_tokens == 0
    assert len(only.choices[0].logprobs.tokens) == only.usage.prompt_tokens
    full = client.completions.create(model=model, prompt=text, echo=True, max_tokens=6, temperature=0)
    stream = client.completions.create(model=model, prompt=text, echo=True, max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == full.choices[0].text
    assert full.choices[0].text.startswith(text) and len(full.choices[0].text) > len(text)


def test_cache_salt_field(client, model):
    messages = [{"role": "user", "content": "Name three rivers of Europe, with one fact about each of them."}]
    kw = dict(model=model, messages=messages, max_tokens=4, temperature=0)
    a = client.chat.completions.create(**kw, extra_body={"cache_salt": "tenant-a"})
    b = client.chat.completions.create(**kw, extra_body={"cache_salt": "tenant-b"})
    assert b.usage.prompt_tokens_details.cached_tokens == 0
    again = client.chat.completions.create(**kw, extra_body={"cache_salt": "tenant-a"})
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.choices[0].message.content == a.choices[0].message.content


def test_tokenizer_routes(server, model, smollm):
    """vLLM's /tokenize, /detokenize and /tokenizer_info, as lm-eval's remote tokenizer reads them."""
    tok = smollm.get_tokenizer()
    text = "The capital of France is Paris."

    def post(route: str, body: dict):
        code, raw = http("POST", server + route, json.dumps(body).encode())
        return code, json.loads(raw)

    code, out = post("/tokenize", {"model": model, "prompt": text})
    assert code == 200 and out["tokens"] == tok.encode(text) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 8192 and out["token_strs"] is None
    code, chat = post("/tokenize", {"messages": [{"role": "user", "content": text}], "return_token_strs": True})
    want = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    assert code == 200 and chat["tokens"] == tok.encode(want, add_special_tokens=False)
    assert chat["token_strs"] == tok.convert_ids_to_tokens(chat["tokens"])
    code, back = post("/detokenize", {"model": model, "tokens": out["tokens"]})
    assert code == 200 and back["prompt"] == text
    code, info = http("GET", server + "/tokenizer_info")
    info = json.loads(info)
    assert code == 200 and info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == 8192
    for route, body, needle in (
        ("/tokenize", {"prompt": text, "messages": [{"role": "user", "content": "x"}]}, "either prompt or messages"),
        ("/tokenize", {"prompt": text, "model": "gpt-4"}, "gpt-4"),
        ("/detokenize", {"tokens": [1, 10**9]}, "outside the vocabulary"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ):
        code, err = post(route, body)
        assert code == 400 and needle in err["error"]["message"], err


def test_concurrent_streaming_clients(server, client, model):
    prompts = [f"Write the number {i} in words, then stop." for i in range(32)]
    want = [
        client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text for p in prompts
    ]

    async def one(ac, p):
        parts, finish = [], None
        stream = await ac.completions.create(model=model, prompt=p, max_tokens=12, temperature=0, stream=True)
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main():
        ac = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
        try:
            return await asyncio.gather(*(one(ac, p) for p in prompts))
        finally:
            await ac.close()

    got = asyncio.run(main())
    assert [g[0] for g in got] == want
    assert all(g[1] in ("stop", "length") for g in got)
    wait_blocks_free(server)


def test_client_disconnect_aborts_and_frees_blocks(server, client, model):
    drop_stream_early(client, model)
    wait_blocks_free(server)


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"messages": [{"role": "user", "content": "Hi"}], "temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "Hi"}], "n": 0}, 400, "n"),
        ({"messages": [{"role": "user", "content": "Hi"}], "top_p": 1.5}, 400, "top_p"),
        ({"messages": [{"role": "user", "content": "Hi"}], "model": "gpt-4"}, 400, "gpt-4"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "role"),
        ({"messages": [{"content": "Hi"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
        ({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, 400, "logprobs"),
        ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**6}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "Hi"}], "stream": True, "temperature": -1}, 400, "temperature"),
    ],
)
def test_bad_chat_input_gets_an_openai_error(server, model, body, status, needle):
    payload = {"model": model, **body}
    code, raw = http("POST", server + "/v1/chat/completions", json.dumps(payload).encode())
    assert code == status, raw
    err = json.loads(raw)["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_other_errors_and_the_server_keeps_serving(server, client, model):
    code, raw = http("POST", server + "/v1/completions", b"{not json")
    assert code == 400 and "error" in json.loads(raw)
    long = {"model": model, "prompt": {"bad": 1}}
    assert http("POST", server + "/v1/completions", json.dumps(long).encode())[0] == 400
    too_long = {"model": model, "prompt": [5] * 9000, "max_tokens": 4}
    code, raw = http("POST", server + "/v1/completions", json.dumps(too_long).encode())
    assert code == 400 and "8192" in json.loads(raw)["error"]["message"]
    big = json.dumps({"model": model, "prompt": "x" * 100_000}).encode()
    code, raw = http("POST", server + "/v1/completions", big)
    assert code == 413 and json.loads(raw)["error"]["code"] == 413
    code, raw = http("GET", server + "/v1/nothing-here")
    assert code == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
    out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert out.choices[0].text


def test_auth(server, model):
    assert http("GET", server + "/v1/models", key=None)[0] == 401
    assert http("GET", server + "/v1/models", key="wrong")[0] == 401
    assert http("GET", server + "/v1/models")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert http("GET", server + "/health", key=None)[0] == 200  # probes need no key
    assert http("GET", server + "/tokenizer_info", key=None)[0] == 401


def test_serve_binds_loopback_by_default():
    from kvtrove.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.api_key is None
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-m", "kvtrove.cli", "serve", "--help"], capture_output=True, text=True, env=env, check=True
    )
    assert "--api-key" in out.stdout and "--port" in out.stdout


def test_full_queue_gets_429_and_the_rest_complete(smollm_path, tmp_path_factory):
    proc, base = start_server(smollm_path, tmp_path_factory, "--max-num-seqs", "1", "--max-waiting", "2")
    try:
        ac_kw = dict(base_url=base + "/v1", api_key=KEY, max_retries=0)
        model = openai.OpenAI(**ac_kw).models.list().data[0].id

        async def one(ac, i):
            try:
                r = await ac.completions.create(
                    model=model, prompt=f"Story {i}:", max_tokens=48, temperature=0, extra_body={"ignore_eos": True}
                )
                return r.usage.completion_tokens
            except openai.RateLimitError as e:
                assert e.status_code == 429 and "busy" in e.message
                return "429"

        async def main():
            ac = openai.AsyncOpenAI(**ac_kw)
            try:
                return await asyncio.gather(*(one(ac, i) for i in range(8)))
            finally:
                await ac.close()

        got = asyncio.run(main())
        assert "429" in got and 48 in got  # some refused at once, the admitted ones complete
        assert all(g in ("429", 48) for g in got)
        wait_blocks_free(base)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


PASSAGES = [
    "The river Oster floods every March, when snow melts in the hills above the town of Bellmar; the old "
    "mill by the second bridge keeps a painted line for each year the water reached its door, and the "
    "highest line, from the spring of the great thaw, is level with the miller's window.",
    "Bellmar's market opens at dawn on Thursdays. Farmers bring cheese, apples and wool from the valley, "
    "and the baker on the square sells a dark rye loaf that keeps for a week; the stalls close at noon "
    "when the church bell rings twelve times and the carts roll home along the river road.",
]


def test_blending_chat_parts_and_completion_segments(client, model, server):
    def ask(parts: list[str], question: str):
        content = [{"type": "text", "text": p} for p in [*parts, question]]
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=8,
            temperature=0,
            extra_body={"kv_blend": True},
        )

    ask(PASSAGES, "When does the market open?")
    swapped = ask(PASSAGES[::-1], "What does the mill keep?")  # the passages in the other order
    details = swapped.usage.prompt_tokens_details
    assert details.blended_tokens + details.blend_recomputed_tokens >= 64
    assert details.blend_recomputed_tokens > 0
    assert metric(server, "kvtrove_blended_prompt_tokens_total") > 0
    # the same segments as a completion: a prompt given as segments, blended
    done = client.completions.create(
        model=model, prompt=None, max_tokens=4, temperature=0, extra_body={"segments": PASSAGES, "kv_blend": True}
    )
    assert done.usage.prompt_tokens > 100
    for body, needle in (
        ({"segments": ["ok", 3]}, "segment"),
        ({"segments": ["ok", ""]}, "empty"),
        ({"segments": ["a"], "prompt": "b"}, "either prompt or segments"),
        ({"prompt": "x", "kv_blend_ratio": 2}, "kv_blend_ratio"),
    ):
        status, data = http("POST", server + "/v1/completions", json.dumps({"model": model, **body}).encode())
        assert status == 400 and needle in data.decode(), (body, data)
    wait_blocks_free(server)
