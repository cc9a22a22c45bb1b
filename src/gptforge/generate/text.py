"""The text layer over token ids: UTF-8 assembly without split characters, and stop strings.

Works with any tokenizer that gives a token's raw bytes (`token_bytes`); knows nothing of models or HTTP.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


class StopTextBuffer:
    """Per-row text assembly: bytes -> UTF-8 text without splitting a multi-byte character, and stop strings
    found even when they span tokens. Text that could still begin a stop string is held back until resolved.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.pending = ""  # decoded text not yet emitted
        self.done = False

    def push(self, data: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to emit (possibly "")."""
        if self.done:
            return ""
        self.pending += self.decoder.decode(data)
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.done = True
            text, self.pending = self.pending[:cut], ""
            return text
        hold = max((k for s in self.stop for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:k])), default=0)
        text, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return text

    def flush(self) -> str:
        """End of generation: emit what was held back (it did not turn into a stop string)."""
        if self.done:
            return ""
        text, self.pending = self.pending + self.decoder.decode(b"", final=True), ""
        return text


@dataclass
class TokenText:
    """One generated token seen as text: its own text (decoded alone; a partial UTF-8 character shows as
    U+FFFD), where it begins in the completion (characters), and the model's log-probabilities when asked."""

    token: int
    text: str
    offset: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class TextStream:
    """Token ids -> the text of one completion, as pieces safe to show, plus each token's place in it.

    Stop strings end the text (and are cut from it); `done` says one was found. Tokens are released with the
    text they begin in: `take_tokens` returns those whose text starts inside what has been emitted (at the end,
    all whose text starts before a stop string, and the end-of-text token if one was generated).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.buffer = StopTextBuffer(stop)
        self.emitted = 0  # characters emitted so far
        self.tokens: list[TokenText] = []
        self._released = 0
        self.finished = False

    @property
    def done(self) -> bool:
        return self.buffer.done

    def push(self, token: int) -> str:
        """Add a generated token; return the text that may now be shown (possibly ""). End-of-text adds no text."""
        offset = self.emitted + len(self.buffer.pending)
        try:
            raw = self.tokenizer.token_bytes(token)
        except ValueError:  # an id past the tokenizer's vocabulary (a model with a padded vocab): no text
            raw = b""
        self.tokens.append(TokenText(token, raw.decode("utf-8", errors="replace"), offset))
        if token == self.tokenizer.eot_id or self.buffer.done:
            return ""
        piece = self.buffer.push(raw)
        self.emitted += len(piece)
        return piece

    def finish(self) -> str:
        """The generation ended: return the held-back text that did not become a stop string."""
        piece = self.buffer.flush()
        self.emitted += len(piece)
        self.finished = True
        return piece

    def take_tokens(self) -> list[TokenText]:
        """The tokens released since the last call (see the class docstring)."""
        end = self._released
        if self.finished and not self.done:
            end = len(self.tokens)
        while end < len(self.tokens) and (self.tokens[end].offset < self.emitted or
                                          self.tokens[end].token == self.tokenizer.eot_id):
            end += 1
        released, self._released = self.tokens[self._released:end], end
        return released
