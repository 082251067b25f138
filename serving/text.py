"""Incremental detokenisation with stop strings, for streaming.

A sequence's text is re-decoded from all its tokens at every step (answers are at most a few hundred tokens; this
keeps multi-byte characters and tokenizer-specific spacing right without per-tokenizer rules). What is handed to
the client is held back while it might still change:

- a trailing U+FFFD: a character whose UTF-8 bytes are split over tokens is not complete yet;
- the last `len(longest stop string) - 1` characters: they might be the start of a stop string, which must never
  reach the client (OpenAI: "the returned text will not contain the stop sequence").
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # the decoded text so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found

    def update(self, token_ids: list[int]) -> str:
        """Decode `token_ids` (the sequence's new tokens, no EOS); returns the text that is safe to send now."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if self.stop:
            # a stop string can only end in the part not yet searched: start one stop-length before it
            start = max(0, self.sent - self.hold)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = text[:min(hits)], True
                return self.flush()
        self.text = text
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(safe)

    def flush(self) -> str:
        """Everything not yet sent: the sequence is finished."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out
