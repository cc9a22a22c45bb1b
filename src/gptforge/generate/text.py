"""The text layer over token ids: UTF-8 assembly without split characters, and stop strings.

Works with any tokenizer that gives a token's raw bytes (`token_bytes`); knows nothing of models or HTTP.
"""

from __future__ import annotations

import codecs


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
