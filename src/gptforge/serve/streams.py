"""The bridge between HTTP handlers (asyncio) and the engine's thread: one `Generation` per HTTP request.

A Generation holds the request's choices (n per prompt). Each choice is one engine `Sequence` whose callbacks run
in the engine's thread: `stop_check` turns tokens into text (stop strings end the choice there and then), and
`on_output` packs what is new into a `Delta` and hands it to the event loop with `call_soon_threadsafe`. The
handler reads the deltas with `async for` and turns them into a JSON body or Server-Sent Events. Cancelling
(client gone) asks the engine to end every unfinished choice at its next step, which frees their rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gptforge.generate.runner import EngineThread
from gptforge.generate.sampling import SamplingParams
from gptforge.generate.scheduler import Output, Sequence
from gptforge.generate.text import TextStream, TokenText


@dataclass
class Delta:
    """What is new in one choice: text safe to show, the tokens released with it, and the finish reason on
    the last delta."""

    index: int
    text: str
    tokens: list[TokenText]
    finish_reason: str | None = None


@dataclass
class Timing:
    """Per-choice timestamps (time.monotonic seconds) for the latency histograms."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    n_tokens: int = 0


@dataclass(eq=False)
class Choice:
    """One completion of one prompt, driven by the engine's thread."""

    index: int
    prompt: list[int]
    params: SamplingParams
    tokenizer: object
    post: Callable[[Delta], None]
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    on_timing: Callable[[Timing, Output], None] | None = None
    ignore_eot: bool = False
    timing: Timing = field(default_factory=lambda: Timing(time.monotonic()))

    def __post_init__(self) -> None:
        self.stream = TextStream(self.tokenizer, self.params.stop)
        self._piece = ""
        self.seq = Sequence(self.prompt, self.params, logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
                            stop_check=self._stop_check, on_output=self._on_output,
                            ignore_eot=self.ignore_eot)

    def _stop_check(self, token: int) -> bool:  # engine thread
        self._piece += self.stream.push(token)
        return self.stream.done

    def _on_output(self, out: Output) -> None:  # engine thread
        if out.token is not None:
            if out.token == self.tokenizer.eot_id:
                self.stream.push(out.token)
            entry = self.stream.tokens[-1]
            entry.logprob, entry.top_logprobs = out.logprob, out.top_logprobs
        if self.on_timing is not None:
            self.on_timing(self.timing, out)
        if out.finish_reason is not None:
            self._piece += self.stream.finish()
        delta = Delta(self.index, self._piece, self.stream.take_tokens(), out.finish_reason)
        self._piece = ""
        if delta.text or delta.tokens or delta.finish_reason:
            self.post(delta)


class Generation:
    """All choices of one HTTP request, submitted to the engine together and read back as deltas."""

    def __init__(self, runner: EngineThread, loop: asyncio.AbstractEventLoop) -> None:
        self.runner, self.loop = runner, loop
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.choices: list[Choice] = []

    def _post(self, delta: Delta) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)

    def add(self, **kwargs) -> Choice:
        """Add a choice (keyword arguments of `Choice`, without `post`)."""
        choice = Choice(post=self._post, **kwargs)
        self.choices.append(choice)
        return choice

    def submit(self) -> None:
        """Queue every choice (all or none); raises what `EngineThread.submit` raises."""
        self.runner.submit([c.seq for c in self.choices])

    def cancel(self) -> None:
        """End every unfinished choice at the engine's next step (a no-op for finished ones)."""
        for c in self.choices:
            if not c.seq.finished:
                self.runner.cancel(c.seq)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every delta of every choice, in the order the engine produced them, until all have finished."""
        remaining = len(self.choices)
        while remaining:
            delta = await self.queue.get()
            remaining -= delta.finish_reason is not None
            yield delta

    async def collect(self, receive: Callable) -> list[Delta]:
        """All deltas, cancelling the choices if the client disconnects first (`receive` is the ASGI receive of
        a request whose body has been read: its next message is the disconnect)."""

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            return [d async for d in self.deltas()]
        finally:
            watcher.cancel()
