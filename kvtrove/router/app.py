"""The router's HTTP API: a kvtrove server's OpenAI routes, each request forwarded to one engine.

POST /v1/chat/completions and /v1/completions go to the engine the policy picks, and the engine's
answer (status, JSON body, or SSE stream chunk by chunk) passes through as it arrives. An engine
that cannot be reached, or drops the connection before the client got a byte, leaves rotation and
the request goes to another engine (each engine is tried at most once); an engine answering 429
(queue full) is passed over the same way. A stream that breaks after bytes went out ends with an
error event. With no engine in rotation, requests get 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvtrove.router.config import RouterConfig
from kvtrove.router.engines import Engine, EngineSet
from kvtrove.router.metrics import RouterMetrics
from kvtrove.router.policy import Candidate, make_policy
from kvtrove.router.prefix_index import PrefixIndex, request_text
from kvtrove.server.http import ApiError, BodyLimit, error_body, sse

log = logging.getLogger(__name__)


def create_router_app(config: RouterConfig) -> FastAPI:
    index = PrefixIndex(config.chunk_chars, config.index_entries)
    engines = EngineSet(config.engines, on_change=lambda engine: index.forget(engine.url))
    policy = make_policy(config.policy, config.min_match, config.max_imbalance)
    metrics = RouterMetrics(engines, index)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        timeout = httpx.Timeout(None, connect=config.health_timeout_s)  # generation may take minutes
        # idle connections are dropped well before the engines' own keep-alive timeout (uvicorn: 5 s), so a
        # request never goes out on a connection the engine is closing (that would take it out of rotation)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=2.0)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
            app.state.client = client
            await engines.check_all(client, config.health_timeout_s)
            poller = asyncio.create_task(engines.poll(client, config.health_interval_s, config.health_timeout_s))
            try:
                yield
            finally:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller

    app = FastAPI(title="kvtrove router", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    # ---- errors and auth ----------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return error_body(e.status, e.message, e.kind, e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_body(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("router error")
        return error_body(500, f"router error: {e!r}", "server_error")

    def check_key(request: Request) -> None:
        if config.api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error")

    def forwarded_headers(request: Request) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if auth := request.headers.get("authorization"):
            headers["authorization"] = auth  # the engines check it
        return headers

    # ---- routing ------------------------------------------------------------------------------------

    def pick(text: str, tried: set[str]) -> Engine | None:
        candidates = [e for e in engines.healthy() if e.url not in tried]
        if not candidates:
            return None
        matched = index.match(text) if policy.uses_prefix else {}
        choice = policy.choose([Candidate(e.url, e.load, matched.get(e.url, 0)) for e in candidates], len(text))
        if policy.uses_prefix:
            index.insert(text, choice.engine)
        metrics.routed.labels(choice.engine, choice.reason).inc()
        return next(e for e in candidates if e.url == choice.engine)

    async def send(client: httpx.AsyncClient, engine: Engine, path: str, raw: bytes, headers: dict, can_retry: bool):
        """The engine's answer as a Response, or None: send the request to another engine."""
        engine.in_flight += 1
        upstream, streaming = None, False
        try:
            request = client.build_request("POST", engine.url + path, content=raw, headers=headers)
            upstream = await client.send(request, stream=True)
            if upstream.status_code == 429 and can_retry:
                return None
            media_type = upstream.headers.get("content-type", "application/json")
            if not media_type.startswith("text/event-stream"):
                return Response(await upstream.aread(), upstream.status_code, media_type=media_type)
            chunks = upstream.aiter_bytes()
            first = await anext(chunks, b"")
            streaming = True
            return StreamingResponse(
                passthrough(engine, upstream, first, chunks), upstream.status_code, media_type=media_type
            )
        except httpx.TransportError as e:  # nothing reached the client yet
            engines.mark_down(engine, f"no answer: {e!r}")
            return None
        finally:
            if not streaming:
                engine.in_flight -= 1
                if upstream is not None:
                    with anyio.CancelScope(shield=True):
                        await upstream.aclose()

    async def passthrough(engine: Engine, upstream: httpx.Response, first: bytes, chunks: AsyncIterator[bytes]):
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        except httpx.TransportError as e:
            engines.mark_down(engine, f"stream broke: {e!r}")
            error = {"message": "the engine serving this stream failed", "type": "server_error", "param": None}
            yield "\n\n" + sse({"error": {**error, "code": 502}})
        finally:
            engine.in_flight -= 1
            with anyio.CancelScope(shield=True):  # also when the client went away: the engine then aborts
                await upstream.aclose()

    async def forward(request: Request, path: str) -> Response:
        check_key(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        text = request_text(path, body)
        headers = forwarded_headers(request)
        client: httpx.AsyncClient = request.app.state.client
        tried: set[str] = set()
        while (engine := pick(text, tried)) is not None:
            tried.add(engine.url)
            can_retry = any(e.url not in tried for e in engines.healthy())
            response = await send(client, engine, path, raw, headers, can_retry)
            if response is not None:
                return response
            metrics.retries.labels(engine.url).inc()
        metrics.unavailable.inc()
        why = f"the {len(tried)} engine(s) tried failed" if tried else "no engine is in rotation"
        raise ApiError(503, f"no engine can take the request: {why}; retry later", "server_error")

    # ---- routes -------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await forward(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await forward(request, "/v1/completions")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        client: httpx.AsyncClient = request.app.state.client
        for engine in sorted(engines.healthy(), key=lambda e: e.load):
            try:
                r = await client.get(engine.url + "/v1/models", headers=forwarded_headers(request), timeout=10)
            except httpx.TransportError as e:
                engines.mark_down(engine, f"/v1/models failed: {e!r}")
                continue
            return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))
        metrics.unavailable.inc()
        raise ApiError(503, "no engine is in rotation; retry later", "server_error")

    @app.get("/health")
    async def health():
        ok = bool(engines.healthy())
        body = {
            "status": "ok" if ok else "no engine in rotation",
            "policy": config.policy,
            "engines": [e.state() for e in engines.engines],
        }
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
