"""The engine's own thread: it owns the model and steps the scheduler while there is work.

Other threads (HTTP handlers) talk to it only through `submit` and `cancel`, which are thread-safe, and receive
results through each request's `on_output` callback, which runs in this thread. Knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import threading
import time

from gptforge.errors import GptforgeError
from gptforge.generate.sampling import SamplingParams
from gptforge.generate.scheduler import FINISH_ABORT, Engine, Sequence

log = logging.getLogger(__name__)
FINISH_ERROR = "error"  # the engine failed (a bug or out of memory); the request got no further tokens


class EngineStoppedError(GptforgeError):
    """The engine is shutting down or has failed, so it takes no new requests."""


class EngineThread:
    """Runs `engine.step()` in a background thread.

    Attributes:
        ready: set once the model has completed a forward pass (a one-token warm-up request).
        error: the exception that killed the engine thread, or None while it is healthy.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._accepting = True
        self._abort = False
        self._thread = threading.Thread(target=self._loop, name="gptforge-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def start(self) -> None:
        """Start the thread and queue the warm-up request (`ready` is set when it has run)."""
        warm = Sequence([0], SamplingParams(max_new_tokens=1, temperature=0),
                        on_output=lambda out: self.ready.set() if out.finish_reason else None)
        self.engine.submit([warm])
        self._thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue requests for the engine.

        Raises:
            EngineStoppedError: the engine is shutting down or has failed.
            QueueFullError, GptforgeError: see `Engine.submit`.
        """
        if not self._accepting or not self.alive:
            raise EngineStoppedError("the server is shutting down" if self.error is None else
                                     f"the generation engine has failed: {self.error}")
        self.engine.submit(seqs)
        with self._cond:
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """End a request at the engine's next step (frees its row)."""
        self.engine.cancel(seq)
        with self._cond:
            self._cond.notify()

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Take no new requests, let running ones finish for up to `drain_timeout_s` seconds, end the rest
        (finish reason "abort") and join the thread."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self.alive and self.engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.abort_all()
        if self._thread.ident is not None:
            self._thread.join(timeout=60)

    def begin_shutdown(self, drain_timeout_s: float) -> None:
        """Take no new requests; end whatever still runs after `drain_timeout_s` seconds (does not block)."""
        self._accepting = False
        timer = threading.Timer(drain_timeout_s, self.abort_all)
        timer.daemon = True
        timer.start()

    def abort_all(self) -> None:
        """Ask the thread to end every waiting and running request at its next step, and to exit."""
        with self._cond:
            self._abort = True
            self._cond.notify()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self.engine.has_work() and not self._abort:
                        self._cond.wait()
                    if self._abort:
                        self.engine.abort_all()
                        return
                self.engine.step()
        except BaseException as exc:  # noqa: BLE001 - record why, fail every request, then let /health say so
            self.error = exc
            log.exception("the generation engine failed")
            self.engine.abort_all(FINISH_ERROR)


__all__ = ["FINISH_ABORT", "FINISH_ERROR", "EngineStoppedError", "EngineThread"]
