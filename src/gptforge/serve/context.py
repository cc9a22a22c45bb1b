"""What every handler needs: the model's tokenizer and limits, the engine's thread, the metrics, and the checks
shared by the endpoints (API key, model name, max_tokens cap, prompts, sampling parameters).

Errors are raised as `APIError` and rendered by the app as OpenAI's error JSON.
"""

from __future__ import annotations

import codecs
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any

from gptforge.errors import GptforgeError
from gptforge.generate.runner import EngineStoppedError, EngineThread
from gptforge.generate.sampling import SamplingParams
from gptforge.generate.scheduler import Engine, QueueFullError
from gptforge.serve.chat import ChatTemplate, load_chat_template
from gptforge.serve.metrics import ServerMetrics
from gptforge.serve.streams import Generation

log = logging.getLogger("gptforge.serve")


class APIError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


@dataclass
class ServeSettings:
    """Server options (the `gptforge serve` flags).

    Attributes:
        served_model_name: the name clients pass as `model` (any other name is a 404).
        api_key: when set, every /v1 and tokenizer request needs `Authorization: Bearer <api_key>`.
        max_running, max_queue, max_cached_tokens, prefill_chunk: the engine's caps (see generate.scheduler).
        max_tokens_cap: the largest `max_tokens` a request may ask for.
        max_body_bytes: the largest request body accepted (413 beyond).
        cors_origins: origins allowed by CORS (none: no CORS headers at all).
        log_prompts: log each request's prompts (off: prompts never reach the log).
        shutdown_timeout_s: on SIGTERM, how long running requests may go on before they are ended.
    """

    served_model_name: str
    api_key: str | None = None
    max_running: int = 32
    max_queue: int = 256
    max_cached_tokens: int | None = None
    prefill_chunk: int = 128
    max_tokens_cap: int = 4096
    max_body_bytes: int = 2_000_000
    cors_origins: list[str] = field(default_factory=list)
    log_prompts: bool = False
    shutdown_timeout_s: float = 30.0


class ServerContext:
    """The loaded model, its engine thread and the shared request checks."""

    def __init__(self, lm, settings: ServeSettings) -> None:
        self.lm, self.settings, self.tokenizer = lm, settings, lm.tokenizer
        cfg = lm.model.cfg
        self.context_length, self.vocab_size = cfg.context_length, cfg.vocab_size
        self.engine = Engine(lm.model, eot_id=self.tokenizer.eot_id, max_running=settings.max_running,
                             max_queue=settings.max_queue, max_cached_tokens=settings.max_cached_tokens,
                             prefill_chunk=settings.prefill_chunk)
        self.runner = EngineThread(self.engine)
        self.metrics = ServerMetrics(self.engine)
        eos = self.tokenizer.token_bytes(self.tokenizer.eot_id).decode("utf-8", errors="replace")
        self.chat_template: ChatTemplate = load_chat_template(lm.checkpoint, eos)

    # ---- checks ------------------------------------------------------------------------------------------------
    def check_auth(self, authorization: str | None) -> None:
        key = self.settings.api_key
        if key is None:
            return
        if not authorization:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        name = self.settings.served_model_name
        if model is not None and model != name:
            raise APIError(404, f"model '{model}' does not exist; this server serves '{name}'", param="model",
                           code="model_not_found")

    def log_extras(self, endpoint: str, body: Any) -> None:
        extras = sorted((body.model_extra or {}).keys())
        if extras:
            log.info("%s: ignoring unknown fields %s", endpoint, ", ".join(repr(k[:40]) for k in extras[:20]))

    def max_tokens(self, value: int | None, default: int, param: str = "max_tokens") -> int:
        cap = self.settings.max_tokens_cap
        if value is None:
            return min(default, cap)
        if value > cap:
            raise APIError(400, f"'{param}' must be at most {cap} on this server (got {value})", param=param)
        return value

    def encode_prompts(self, prompts: list[str] | list[list[int]], param: str = "prompt") -> list[list[int]]:
        """Strings are tokenized; token ids must be in the vocabulary; no prompt may exceed the context."""
        C, V = self.context_length, self.vocab_size
        out = []
        for i, p in enumerate(prompts):
            ids = self.tokenizer.encode(p) if isinstance(p, str) else p
            bad = next((t for t in ids if not 0 <= t < V), None)
            if bad is not None:
                raise APIError(400, f"'{param}' holds token id {bad}; allowed: 0..{V - 1}", param=param)
            if len(ids) > C:
                which = f"prompt {i} has" if len(prompts) > 1 else "the prompt has"
                if param == "messages":
                    which = "the messages (rendered with the chat template) have"
                raise APIError(400, f"{which} {len(ids)} tokens; the model's context_length is {C} tokens",
                               param=param, code="context_length_exceeded")
            if not ids:
                raise APIError(400, f"'{param}' must not be empty", param=param)
            out.append(ids)
        if self.settings.log_prompts:
            log.info("prompts: %r", [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts])
        return out

    def sampling(self, body: Any, max_tokens: int, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=max(body.top_k or 0, 0),
                repetition_penalty=body.repetition_penalty or 1.0,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                stop=tuple(body.stop or ()) + extra_stop,
                seed=body.seed)
        except GptforgeError as exc:  # the schemas are narrower; kept as a safety net
            raise APIError(400, str(exc)) from None

    def submit(self, gen: Generation) -> None:
        n = len(gen.choices)
        if n > self.settings.max_queue:
            raise APIError(400, f"the request asks for {n} completions; this server queues at most "
                                f"{self.settings.max_queue} at once", param="n")
        try:
            gen.submit()
        except QueueFullError as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from None
        except EngineStoppedError as exc:
            raise APIError(503, str(exc), type="server_error", code="unavailable") from None
        except GptforgeError as exc:
            raise APIError(400, str(exc)) from None
        self.metrics.prompt_tokens.inc(sum(len(c.prompt) for c in gen.choices))

    # ---- text helpers ------------------------------------------------------------------------------------------
    def token_text(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def prompt_offsets(self, ids: list[int]) -> tuple[str, list[int]]:
        """The prompt's text and the character offset where each token's text begins."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts, offsets, total = [], [], 0
        for t in ids:
            offsets.append(total)
            part = decoder.decode(self.tokenizer.token_bytes(t))
            parts.append(part)
            total += len(part)
        parts.append(decoder.decode(b"", final=True))
        return "".join(parts), offsets

