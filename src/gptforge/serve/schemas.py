"""Request bodies of the OpenAI-compatible API, validated field by field, and the OpenAI error body.

Every field is checked with a message naming the allowed values (a bool is not a number, a string is not a
number, NaN and infinities are refused, integers are bounded), so any bad body becomes a 400 that names the
field. Ranges follow the OpenAI API reference; where it is silent, vLLM's behaviour (`top_k`,
`repetition_penalty` and `ignore_eos` extensions, `-1` meaning "off" for top_k). Unknown fields are kept aside
(`model_extra`) for the app to log and ignore. Requires pydantic (a FastAPI dependency).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_LOGPROBS = 20  # OpenAI: logprobs 0..5 for completions (legacy), top_logprobs 0..20 for chat; we allow 20
MAX_N = 16  # completions per prompt
MAX_STOP = 16  # stop strings
MAX_PROMPTS = 256  # prompts in one completions request
_TYPE_TAG = re.compile(r"str|int|float|bool|dict|none|[\w-]+\[.*\]")  # pydantic's union/validator path tags


def _number(lo: float, hi: float, *, lo_open: bool = False):
    """A finite JSON number (not a bool) in [lo, hi] (or (lo, hi] with lo_open)."""
    allowed = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def check(value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
            (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            raise ValueError(f"must be {allowed}")
        return float(value)

    return Annotated[float, BeforeValidator(check)]


def _integer(lo: int, hi: int, what: str = ""):
    """A JSON integer (not a bool, not a float) in [lo, hi]."""
    allowed = f"an integer in [{lo}, {hi}]{what}"

    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"must be {allowed}")
        return value

    return Annotated[int, BeforeValidator(check)]


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_STOP or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"must be a non-empty string or a list of at most {MAX_STOP} non-empty strings")
    return items


def _prompt(value: Any) -> list[str] | list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of lists of token ids; none empty."""
    allowed = "must be a non-empty string, a list of them, a non-empty list of token ids, or a list of those"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(allowed)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if len(value) > MAX_PROMPTS:
        raise ValueError(f"holds {len(value)} prompts; at most {MAX_PROMPTS} are allowed per request")
    if all(isinstance(p, str) and p for p in value):
        return value
    if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
           for p in value):
        return value
    raise ValueError(allowed)


Boolean = Annotated[bool, BeforeValidator(_boolean)]
Temperature = _number(0, 2)
TopP = _number(0, 1, lo_open=True)
Penalty = _number(-2, 2)
RepetitionPenalty = _number(0, 10, lo_open=True)
TopK = _integer(-1, 1_000_000, " (-1 or 0 means off)")
N = _integer(1, MAX_N)
Seed = _integer(0, 2**63 - 1)
Stop = Annotated[list[str], BeforeValidator(_stop)]
MaxTokens = _integer(0, 2**31 - 1)  # the server's own cap is checked by the app, which names it
Logprobs = _integer(0, MAX_LOGPROBS)
BestOf = _integer(1, MAX_N)
TokenId = _integer(0, 2**31 - 1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Boolean | None = None


class _Request(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: N | None = None
    stream: Boolean | None = None
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: Boolean | None = None


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: Annotated[list, BeforeValidator(_prompt)]
    echo: Boolean | None = None
    logprobs: Logprobs | None = None
    suffix: str | None = None
    best_of: BestOf | None = None
    logit_bias: dict | None = None
    user: str | None = None


def _content(value: Any) -> str:
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                       isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ValueError('must be a string or a list of {"type": "text", "text": "..."} parts')


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_content)]
    name: str | None = None


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: Boolean | None = None
    top_logprobs: Logprobs | None = None
    logit_bias: dict | None = None
    user: str | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): text, or chat messages rendered through the chat template."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)] | None = None
    add_special_tokens: Boolean | None = None
    add_generation_prompt: Boolean | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[TokenId]


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """FastAPI/pydantic validation errors -> (one-line message naming the field and what is allowed, param)."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    # drop pydantic's union-member and validator tags from the path
    loc = [x for x in loc if not _TYPE_TAG.fullmatch(x)]
    param = ".".join(loc) or None
    kind, msg = err.get("type", ""), str(err.get("msg", "invalid value"))
    if kind in ("json_invalid", "json_type"):
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', msg)})", None
    if kind == "missing" and param is None:  # no body at all
        return "the request body is empty; send a JSON object", None
    if kind == "missing":
        return f"'{param}' is required", param
    if param is None:
        return "the request body must be a JSON object", None
    msg = msg.removeprefix("Value error, ")
    if not msg.startswith(("must", "holds")):
        msg = f"is invalid: {msg}"
    got = repr(err.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"'{param}' {msg} (got {got})", param
