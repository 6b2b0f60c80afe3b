"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming
or not), /health, /metrics, and vLLM's tokenizer routes /tokenize, /detokenize, /tokenizer_info. Errors use OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvtrove.outputs import RequestOutput
from kvtrove.server.async_engine import AsyncEngine, QueueFull
from kvtrove.server.http import ApiError, BodyLimit, error_body, sse
from kvtrove.server.metrics import Metrics
from kvtrove.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest


KEYED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
"""Routes that need the API key when one is set (/health and /metrics stay open for probes)."""


def create_app(
    engine: AsyncEngine, model_name: str, api_key: str | None = None, max_body_bytes: int = 8 << 20
) -> FastAPI:
    app = FastAPI(title="kvtrove", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    metrics = Metrics(engine, model_name)
    tokenizer = engine.engine.tokenizer
    created = int(time.time())

    # ---- errors and auth ----------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return error_body(e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_body(
            400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error", where or None
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_body(e.status_code, str(e.detail), kind)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith(KEYED):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_body(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error")
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(400, f"model {name!r} is not served here; this server serves {model_name!r}", param="model")

    async def run(prompt, params, request_id: str, endpoint: str) -> AsyncIterator[RequestOutput]:
        try:
            async for out in metrics.track(engine.generate(prompt, params, request_id), endpoint):
                yield out
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", "rate_limit_error") from None
        except RuntimeError as e:
            raise ApiError(500, str(e), "server_error") from None

    # ---- routes -------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return error_body(503, "the engine thread is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "kvtrove"}],
        }

    # ---- the tokenizer (vLLM's routes, at the root: lm-eval's remote tokenizer asks them) ----------------

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages")
        try:
            if body.messages is not None:
                ids = engine.engine.chat_prompt(body.chat_messages(), body.add_generation_prompt)["prompt_token_ids"]
            else:
                ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < len(tokenizer)]
        if bad:
            raise ApiError(400, f"token ids outside the vocabulary (0-{len(tokenizer) - 1}): {bad[:5]}", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "model_max_length": engine.engine.max_model_len,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "chat_template": tokenizer.chat_template,
            "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
            "vocab_size": len(tokenizer),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        try:
            params = body.completion_sampling()
            prompts = body.prompts()
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = [run(p, params, f"{rid}-{i}", "completions") for i, p in enumerate(prompts)]
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        answer = body.max_tokens != 0  # echo with max_tokens 0: the prompt alone
        prompt_texts = [p if isinstance(p, str) else None for p in prompts]

        def choice(i: int, out: RequestOutput, c, ids: list[int], lps, text: str, finish: str | None, echo: bool):
            """One choice of `out` for the completion tokens `ids` (their logprobs `lps`, their `text`); with
            `echo` the prompt (its tokens' logprobs) comes first."""
            ids, lps, text = (ids, lps, text) if answer else ([], [], "")
            lp = None
            if echo:
                given = prompt_texts[i]
                text = (given if given is not None else tokenizer.decode(out.prompt_token_ids)) + text
            if params.logprobs is not None:
                lp = completion_logprobs(tokenizer, ids, lps or [], params.logprobs)
                if echo:
                    lp = join_logprobs(
                        prompt_logprobs(tokenizer, out.prompt_token_ids, out.prompt_logprobs, params.logprobs), lp
                    )
            return {"index": i * params.n + c.index, "text": text, "finish_reason": finish, "logprobs": lp}

        if not body.stream:
            finals = await asyncio.gather(*(last(s) for s in streams))
            choices = [
                choice(i, out, c, c.token_ids, c.logprobs, c.text, c.finish_reason, body.echo)
                for i, out in enumerate(finals)
                for c in out.outputs
            ]
            return {**head, "choices": choices, "usage": usage(finals, answer)}

        async def events():
            finals, echoed = [], set()
            async for i, out in merged(streams):
                for c in out.outputs:
                    echo = body.echo and (i, c.index) not in echoed
                    if c.delta_text or c.finish_reason or echo:
                        echoed.add((i, c.index))
                        lps = (c.logprobs or [])[len(c.logprobs or []) - len(c.delta_token_ids) :]
                        one = choice(i, out, c, c.delta_token_ids, lps, c.delta_text, c.finish_reason, echo)
                        yield sse({**head, "choices": [one]})
                if out.finished:
                    finals.append(out)
            if body.include_usage:
                yield sse({**head, "choices": [], "usage": usage(finals, answer)})
            yield "data: [DONE]\n\n"

        return await stream_response(events())

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        check_model(body.model)
        try:
            params = body.sampling(body.limit(), body.num_logprobs())
            prompt = engine.engine.chat_prompt(body.chat_messages(), body.add_generation_prompt)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": model_name}
        stream = run(prompt, params, rid, "chat")

        def logprobs_of(c, ids, lps) -> dict | None:
            if params.logprobs is None or c.logprobs is None:
                return None
            return {"content": chat_logprobs(tokenizer, ids, lps, params.logprobs)}

        if not body.stream:
            final = await last(stream)
            choices = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": logprobs_of(c, c.token_ids, c.logprobs),
                }
                for c in final.outputs
            ]
            return {**head, "object": "chat.completion", "choices": choices, "usage": usage([final])}

        async def events():
            head_chunk = {**head, "object": "chat.completion.chunk"}
            started: set[int] = set()
            final = None
            async for out in stream:
                for c in out.outputs:
                    if c.index not in started:
                        started.add(c.index)
                        first = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        yield sse({**head_chunk, "choices": [{**first, "logprobs": None}]})
                    if c.delta_text or c.finish_reason:
                        n_new = len(c.delta_token_ids)
                        lps = (c.logprobs or [])[len(c.logprobs or []) - n_new :] if n_new else []
                        delta = {"content": c.delta_text} if c.delta_text else {}
                        ch = {
                            "index": c.index,
                            "delta": delta,
                            "finish_reason": c.finish_reason,
                            "logprobs": logprobs_of(c, c.delta_token_ids, lps),
                        }
                        yield sse({**head_chunk, "choices": [ch]})
                final = out
            if body.include_usage and final is not None:
                yield sse({**head_chunk, "choices": [], "usage": usage([final])})
            yield "data: [DONE]\n\n"

        return await stream_response(events())

    return app


# ---- helpers -----------------------------------------------------------------------------------------


async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for out in stream:
        final = out
    return final


async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) from several streams as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def stream_response(events: AsyncIterator[str]) -> Response:
    """Start streaming only once the first event exists, so a request refused up front (bad input, full
    queue) still gets its JSON error and status code."""
    try:
        first = await anext(events)
    except ApiError as e:
        return error_body(e.status, e.message, e.kind, e.param)

    async def rest():
        yield first
        try:
            async for e in events:
                yield e
        except ApiError as e:  # mid-stream: the status line is gone, say it in the stream
            yield sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}})

    return StreamingResponse(rest(), media_type="text/event-stream")


def usage(finals: list[RequestOutput], answered: bool = True) -> dict:
    """`answered` False: the completions were dropped (echo with max_tokens 0)."""
    prompt = sum(o.prompt_tokens for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs) if answered else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": sum(o.cached_tokens for o in finals),
            "blended_tokens": sum(o.blended_tokens for o in finals),
            "blend_recomputed_tokens": sum(o.blend_recomputed_tokens for o in finals),
        },
    }


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, ids: list[int], lps: list[dict[int, float]], n_top: int) -> list[dict]:
    """Per token: its logprob and the `n_top` most likely (each entry of `lps` lists those first, then
    the sampled token if it is not among them)."""
    out = []
    for tid, lp in zip(ids, lps):
        tok = _token(tokenizer, tid)
        top = [
            {"token": (t := _token(tokenizer, k)), "logprob": v, "bytes": list(t.encode())}
            for k, v in list(lp.items())[:n_top]
        ]
        out.append({"token": tok, "logprob": lp[tid], "bytes": list(tok.encode()), "top_logprobs": top})
    return out


def prompt_logprobs(tokenizer, ids: list[int], lps: list[dict[int, float] | None], n_top: int) -> dict:
    """Echoed prompt tokens in the completions shape: the first token's logprob and top are null."""
    rest = completion_logprobs(tokenizer, ids[1:], lps[1:], n_top)
    first = _token(tokenizer, ids[0])
    return {
        "tokens": [first, *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *(len(first) + o for o in rest["text_offset"])],
    }


def join_logprobs(a: dict, b: dict) -> dict:
    """Completions logprobs of a's tokens, then b's (b's text offsets moved past a's text)."""
    end = (a["text_offset"][-1] + len(a["tokens"][-1])) if a["tokens"] else 0
    return {
        "tokens": a["tokens"] + b["tokens"],
        "token_logprobs": a["token_logprobs"] + b["token_logprobs"],
        "top_logprobs": a["top_logprobs"] + b["top_logprobs"],
        "text_offset": a["text_offset"] + [end + o for o in b["text_offset"]],
    }


def completion_logprobs(tokenizer, ids: list[int], lps: list[dict[int, float]], n_top: int) -> dict:
    tokens = [_token(tokenizer, t) for t in ids]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp[t] for t, lp in zip(ids, lps)],
        "top_logprobs": [{_token(tokenizer, k): v for k, v in list(lp.items())[: max(n_top, 1)]} for lp in lps],
        "text_offset": offsets,
    }
