"""The offline Python API, shaped like vLLM's: LLM(model=...).generate / chat / stream."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvtrove.config import EngineConfig
from kvtrove.engine.engine import Engine
from kvtrove.outputs import RequestOutput
from kvtrove.sampling_params import SamplingParams

Prompt = str | dict
Message = dict


class LLM:
    """An engine over one model. Every keyword is an option of `kvtrove.config` (see `kvtrove --help`)."""

    def __init__(self, model: str | None = None, dtype: str = "float32", **config):
        self.engine = Engine(EngineConfig.from_kwargs(model=model, dtype=dtype, **config))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """Per KV tier (device, host, disk): entries, bytes, hits, misses, evictions, bytes moved, tokens saved."""
        return self.engine.cache_stats()

    def close(self) -> None:
        """Finish pending KV store writes (interpreter exit does this too)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in prompt order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        ids = self._add_all(prompts, params)
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:  # interrupted or failed: leave the engine clean for the next call
            for i in ids:
                self.engine.abort_request(i)
            raise
        return [done[i] for i in ids]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.chat_prompt(c, add_generation_prompt) for c in convs], sampling_params)

    def chat_prompt(self, messages: list[Message], add_generation_prompt: bool = True) -> dict:
        return self.engine.chat_prompt(messages, add_generation_prompt)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time new tokens arrive (`delta_text` holds the new text).

        Stopping the iteration early aborts the request and frees its blocks.
        """
        (rid,) = self._add_all([prompt], [sampling_params or SamplingParams()])
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort_request(rid)

    def _add_all(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[str]:
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.add_request(p, sp))
        except Exception:
            for i in ids:
                self.engine.abort_request(i)
            raise
        return ids
