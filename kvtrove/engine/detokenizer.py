"""Incremental detokenization and stop-string matching for one sequence."""

from __future__ import annotations

# Prompt tokens decoded with the output, so that the first output token's leading space survives.
CONTEXT_TOKENS = 5


class Detokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop_strings: list[str], skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop_strings = stop_strings
        self.skip_special = skip_special_tokens
        self.text = ""
        self.emitted = 0
        self.holdback = max((len(s) for s in stop_strings), default=1) - 1

    def add(self, token_id: int) -> bool:
        """Append one token; True if a stop string ended the text (which is then cut before it)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete UTF-8 sequence: wait for more tokens
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        search_from = max(0, len(self.text) - self.holdback)
        self.text += new
        hits = [i for s in self.stop_strings if (i := self.text.find(s, search_from)) != -1]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def delta(self, finished: bool) -> str:
        """Text not yet handed out, keeping back a tail that could still become a stop string."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
