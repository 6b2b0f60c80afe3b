"""The engine on its own thread, driven from asyncio.

The engine is not thread-safe, so only its thread touches it: the event loop sends commands (add a
request, abort one) through a queue and gets each request's outputs on an asyncio queue. The step
loop runs while there is work and sleeps on the command queue when idle, so many concurrent HTTP
requests are batched by the scheduler, and the event loop never waits for a model step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kvtrove.engine.engine import Engine
from kvtrove.outputs import RequestOutput
from kvtrove.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than `max_waiting` allows."""


@dataclass
class _Add:
    prompt: str | dict
    params: SamplingParams
    request_id: str
    outputs: asyncio.Queue
    done: asyncio.Future
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 256):
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvtrove-engine", daemon=True)
        self._thread.start()

    # ---- the event loop's side ----------------------------------------------------------------------

    async def generate(
        self, prompt: str | dict, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; raises ValueError (bad input) or QueueFull before the first.

        Leaving the iteration early (a client that went away) aborts the request and frees its blocks.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        done = loop.create_future()
        self._commands.put(_Add(prompt, params, request_id, outputs, done, loop))
        try:
            await done  # raises what add_request raised
        except asyncio.CancelledError:  # the client left before the engine took the request
            self.abort(request_id)
            raise
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def stop(self) -> None:
        self._stopped = True
        self._commands.put(("stop",))
        self._thread.join(timeout=30)
        self.engine.close()

    # ---- the engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped:
            block = not self.engine.has_unfinished()
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._handle(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._stopped or not self.engine.has_unfinished():
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            for out in outs:
                self._deliver(out.request_id, out, out.finished)

    def _handle(self, cmd) -> None:
        if isinstance(cmd, _Add):
            try:
                waiting = len(self.engine.scheduler.waiting)
                if waiting >= self.max_waiting:
                    raise QueueFull(f"{waiting} requests are already waiting (limit {self.max_waiting})")
                self.engine.add_request(cmd.prompt, cmd.params, cmd.request_id)
            except (ValueError, QueueFull) as e:
                cmd.loop.call_soon_threadsafe(_set_exception, cmd.done, e)
                return
            self._streams[cmd.request_id] = (cmd.loop, cmd.outputs)
            cmd.loop.call_soon_threadsafe(_set_result, cmd.done, None)
        elif cmd[0] == "abort":
            self.engine.abort_request(cmd[1])
            self._streams.pop(cmd[1], None)

    def _deliver(self, request_id: str, item, last: bool) -> None:
        stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self._streams):
            self.engine.abort_request(rid)
            self._deliver(rid, RuntimeError(f"the engine failed on this request: {error}"), True)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
