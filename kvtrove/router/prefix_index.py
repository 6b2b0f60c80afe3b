"""The router's own prefix index: which engines probably hold the KV of the start of a request.

The router has no tokenizer, so it keys requests by text. `request_text` renders a request so that a
conversation's next turn starts with the text of the turn before; the text is cut into chunks of
`chunk_chars` characters and chunk i is keyed by k_i = xxh3_64(chunk_i, seed=k_{i-1}), so equal keys
mean equal text from the start. An engine that was sent a text is taken to hold the KV of its full
chunks. The index is a guess by design: an engine may have evicted them since, and a wrong guess
costs a recomputation, never a wrong answer.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import xxhash


def request_text(route: str, body: dict) -> str:
    """What a request's prompt starts with, for the index. Chat: one JSON [role, content] pair per message
    (JSON escapes newlines, so the separator cannot occur inside one); completions: the prompt, or its
    token ids, or a batch's first prompt. Never raises: a body it cannot read gives ""."""
    try:
        if route.endswith("/chat/completions"):
            messages = body.get("messages")
            if not isinstance(messages, list):
                return ""
            lines = [json.dumps(_role_and_text(m), ensure_ascii=False, default=str) for m in messages]
            return "chat\n" + "".join(line + "\n" for line in lines)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return "text\n" + prompt
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return "ids\n" + "".join(f"{t}," for t in prompt)
        return ""
    except (TypeError, ValueError, RecursionError):
        return ""


def _role_and_text(message) -> list:
    if not isinstance(message, dict):
        return [None, message]
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)  # text parts read as one string, as the engine does
    return [message.get("role"), "" if content is None else content]


class PrefixIndex:
    """Chunk key -> the set of engines (a bit mask) that were sent it, least recently used first; a text's
    first chunk is its most recently used, so a full index forgets a chain from its tail."""

    def __init__(self, chunk_chars: int = 128, max_entries: int = 1 << 20):
        self.chunk_chars, self.max_entries = chunk_chars, max_entries
        self._holders: OrderedDict[int, int] = OrderedDict()
        self._bits: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def keys(self, text: str) -> list[int]:
        """Chained keys of the full chunks of `text`."""
        keys, key, n = [], 0, self.chunk_chars
        for start in range(0, len(text) - n + 1, n):
            key = xxhash.xxh3_64_intdigest(text[start : start + n].encode("utf-8", "surrogatepass"), seed=key)
            keys.append(key)
        return keys

    def match(self, text: str) -> dict[str, int]:
        """Per engine, how many characters from the start of `text` it holds (whole chunks, consecutive)."""
        matched: dict[str, int] = {}
        keys = self.keys(text)
        alive = sum(self._bits.values())  # engines holding every chunk so far
        for i, key in enumerate(keys + [None]):
            now = alive & self._holders.get(key, 0) if key is not None else 0
            if i and (lost := alive & ~now):
                matched.update({e: i * self.chunk_chars for e, bit in self._bits.items() if lost & bit})
            alive = now
            if not alive:
                break
        return matched

    def insert(self, text: str, engine: str) -> None:
        """`engine` was sent `text`: it holds its chunks from now on."""
        if engine not in self._bits:
            self._bits[engine] = 1 << len(self._bits)
        bit = self._bits[engine]
        for key in reversed(self.keys(text)):
            self._holders[key] = self._holders.get(key, 0) | bit
            self._holders.move_to_end(key)
        while len(self._holders) > self.max_entries:
            self._holders.popitem(last=False)

    def forget(self, engine: str) -> None:
        """Drop everything `engine` holds (its cache is gone or unknown, e.g. after a restart); O(entries)."""
        bit = self._bits.get(engine)
        if bit is None:
            return
        self._holders = OrderedDict((k, h & ~bit) for k, h in self._holders.items() if h & ~bit)
