"""POST /v1/completions and POST /v1/chat/completions: request -> engine choices -> JSON or Server-Sent Events.

Response shapes follow the OpenAI API reference (legacy completions: `text`, `logprobs` with `tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`; chat: `message`/`delta`, `logprobs.content`). Where the API is
silent we follow vLLM: with `echo` and `logprobs` the prompt's own tokens come first, the first with a null
log-probability; `finish_reason` is "stop" (end-of-text or a stop string), "length" (max_tokens) or "abort"
(shutdown); a seeded request with n > 1 uses seed + i for its i-th choice. Streams are `text/event-stream`,
one `data: {json}` event per change, ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from gptforge.generate.runner import FINISH_ERROR
from gptforge.generate.sampling import SamplingParams
from gptforge.generate.text import TokenText
from gptforge.serve.context import APIError, ServerContext
from gptforge.serve.schemas import ChatCompletionRequest, CompletionRequest, error_body
from gptforge.serve.streams import Choice, Delta, Generation


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    return params if params.seed is None or i == 0 else dataclasses.replace(params, seed=(params.seed + i) % 2**63)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(gen: Generation, prompts: list[list[int]]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.seq.output) for c in gen.choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _check_failed(deltas: list[Delta]) -> None:
    if any(d.finish_reason == FINISH_ERROR for d in deltas):
        raise APIError(503, "the generation engine failed; see the server log", type="server_error")


class _Stream:
    """Common parts of a streamed response."""

    def __init__(self, ctx: ServerContext, gen: Generation, object_name: str, prefix: str, include_usage: bool):
        self.ctx, self.gen, self.include_usage = ctx, gen, include_usage
        self.base = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": object_name, "created": int(time.time()),
                     "model": ctx.settings.served_model_name}

    def chunk(self, choices: list[dict[str, Any]]) -> str:
        body = {**self.base, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return _sse(body)

    async def run(self, events: AsyncIterator[str], prompts: list[list[int]]) -> AsyncIterator[str]:
        """Yield the events, then the usage chunk and [DONE]; a client that leaves cancels the choices."""
        try:
            async for event in events:
                yield event
            if self.include_usage:
                yield _sse({**self.base, "choices": [], "usage": _usage(self.gen, prompts)})
            yield "data: [DONE]\n\n"
        finally:
            self.gen.cancel()


# ---- completions ---------------------------------------------------------------------------------------------
def _top_dict(ctx: ServerContext, top: list[tuple[int, float]]) -> dict[str, float]:
    """{token text: logprob}, most likely first; tokens whose text is the same (e.g. partial UTF-8 characters,
    all shown as U+FFFD) keep the larger log-probability."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(ctx.token_text(token), logprob)
    return out


def _completion_logprobs(ctx: ServerContext, choice: Choice, tokens: list[TokenText], echo_text: str | None,
                         base_offset: int) -> dict[str, Any]:
    """The legacy `logprobs` object for the given tokens (after the prompt's, when echo_text is given)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if echo_text is not None:
        _, offsets = ctx.prompt_offsets(choice.prompt)
        scores = [(None, None)] + [(lp, top) for lp, top in choice.seq.prompt_scores]
        for tok, off, (lp, top) in zip(choice.prompt, offsets, scores):
            out["tokens"].append(ctx.token_text(tok))
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else _top_dict(ctx, top))
            out["text_offset"].append(off)
    for t in tokens:
        out["tokens"].append(t.text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append(_top_dict(ctx, t.top_logprobs or []))
        out["text_offset"].append(base_offset + t.offset)
    return out


async def create_completion(ctx: ServerContext, body: CompletionRequest, receive) -> dict | AsyncIterator[str]:
    """Validate, submit and answer one completions request (a dict, or the SSE events when streaming)."""
    ctx.check_model(body.model)
    ctx.log_extras("/v1/completions", body)
    n = body.n or 1
    for name, bad in (("suffix", body.suffix), ("logit_bias", body.logit_bias),
                      ("best_of", body.best_of not in (None, n))):
        if bad:
            raise APIError(400, f"'{name}' is not supported by this server"
                           + (" (best_of must equal n)" if name == "best_of" else ""), param=name)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "'stream_options' is only allowed with stream: true", param="stream_options")
    params = ctx.sampling(body, ctx.max_tokens(body.max_tokens, default=16))
    prompts = ctx.encode_prompts(body.prompt)
    echo, logprobs = bool(body.echo), body.logprobs
    gen = Generation(ctx.runner, asyncio.get_running_loop())
    for i, ids in enumerate(prompts):
        for j in range(n):
            gen.add(index=i * n + j, prompt=ids, params=_seeded(params, j), tokenizer=ctx.tokenizer,
                    logprobs=logprobs, prompt_logprobs=logprobs if echo and logprobs is not None else None,
                    on_timing=ctx.metrics.observe, ignore_eot=bool(body.ignore_eos))
    ctx.submit(gen)
    texts = {c.index: (body.prompt[c.index // n] if isinstance(body.prompt[c.index // n], str)
                       else ctx.prompt_offsets(c.prompt)[0]) if echo else "" for c in gen.choices}
    if body.stream:
        stream = _Stream(ctx, gen, "text_completion", "cmpl",
                         bool(body.stream_options and body.stream_options.include_usage))
        return stream.run(_completion_events(ctx, gen, stream, texts, echo, logprobs), prompts)
    deltas = await gen.collect(receive)
    _check_failed(deltas)
    choices = []
    for c in gen.choices:
        mine = [d for d in deltas if d.index == c.index]
        text = "".join(d.text for d in mine)
        lp = None
        if logprobs is not None:
            tokens = [t for d in mine for t in d.tokens]
            lp = _completion_logprobs(ctx, c, tokens, texts[c.index] if echo else None, len(texts[c.index]))
        choices.append({"index": c.index, "text": texts[c.index] + text, "logprobs": lp,
                        "finish_reason": mine[-1].finish_reason})
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": ctx.settings.served_model_name, "choices": choices, "usage": _usage(gen, prompts)}


async def _completion_events(ctx: ServerContext, gen: Generation, stream: _Stream, texts: dict[int, str],
                             echo: bool, logprobs: int | None) -> AsyncIterator[str]:
    started: set[int] = set()
    async for d in gen.deltas():
        if d.finish_reason == FINISH_ERROR:
            yield _sse(error_body("the generation engine failed; see the server log", type="server_error"))
            continue
        choice = gen.choices[d.index]
        prefix = ""
        if echo and d.index not in started:
            prefix = texts[d.index]
        lp = None
        if logprobs is not None:
            lp = _completion_logprobs(ctx, choice, d.tokens, prefix if (echo and d.index not in started) else None,
                                      len(texts[d.index]))
        started.add(d.index)
        yield stream.chunk([{"index": d.index, "text": prefix + d.text, "logprobs": lp,
                             "finish_reason": d.finish_reason}])


# ---- chat completions ----------------------------------------------------------------------------------------
def _chat_logprobs(ctx: ServerContext, tokens: list[TokenText]) -> dict[str, Any]:
    def entry(token: int, text: str, lp: float | None) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(ctx.tokenizer.token_bytes(token))}

    return {"content": [{**entry(t.token, t.text, t.logprob),
                         "top_logprobs": [entry(i, ctx.token_text(i), v) for i, v in (t.top_logprobs or [])]}
                        for t in tokens]}


class _LeadingSpace:
    """Drops one leading space of each choice's reply (the base template ends with "Assistant:")."""

    def __init__(self, active: bool) -> None:
        self.pending: set[int] | None = set() if active else None

    def __call__(self, index: int, text: str) -> str:
        if self.pending is None or index in self.pending or not text:
            return text
        self.pending.add(index)
        return text[1:] if text.startswith(" ") else text


async def create_chat_completion(ctx: ServerContext, body: ChatCompletionRequest, receive
                                 ) -> dict | AsyncIterator[str]:
    """Validate, submit and answer one chat completions request."""
    ctx.check_model(body.model)
    ctx.log_extras("/v1/chat/completions", body)
    if body.logit_bias:
        raise APIError(400, "'logit_bias' is not supported by this server", param="logit_bias")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "'top_logprobs' requires logprobs: true", param="top_logprobs")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "'stream_options' is only allowed with stream: true", param="stream_options")
    template = ctx.chat_template
    try:
        text = template.render([{"role": m.role, "content": m.content} for m in body.messages])
    except Exception as exc:  # noqa: BLE001 - a template error is the request's problem, never a 500
        raise APIError(400, str(exc), param="messages") from None
    prompt = ctx.encode_prompts([text], param="messages")[0]
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    default = max(1, ctx.context_length - len(prompt))
    params = ctx.sampling(body, ctx.max_tokens(requested, default, param), extra_stop=template.stop)
    n, logprobs = body.n or 1, (body.top_logprobs or 0) if body.logprobs else None
    gen = Generation(ctx.runner, asyncio.get_running_loop())
    for j in range(n):
        gen.add(index=j, prompt=prompt, params=_seeded(params, j), tokenizer=ctx.tokenizer, logprobs=logprobs,
                on_timing=ctx.metrics.observe, ignore_eot=bool(body.ignore_eos))
    ctx.submit(gen)
    strip = _LeadingSpace(template.strip_leading_space)
    if body.stream:
        stream = _Stream(ctx, gen, "chat.completion.chunk", "chatcmpl",
                         bool(body.stream_options and body.stream_options.include_usage))
        return stream.run(_chat_events(ctx, gen, stream, strip, logprobs is not None), [prompt])
    deltas = await gen.collect(receive)
    _check_failed(deltas)
    choices = []
    for c in gen.choices:
        mine = [d for d in deltas if d.index == c.index]
        content = "".join(strip(c.index, d.text) for d in mine)
        lp = _chat_logprobs(ctx, [t for d in mine for t in d.tokens]) if logprobs is not None else None
        choices.append({"index": c.index, "message": {"role": "assistant", "content": content}, "logprobs": lp,
                        "finish_reason": mine[-1].finish_reason})
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": ctx.settings.served_model_name, "choices": choices, "usage": _usage(gen, [prompt])}


async def _chat_events(ctx: ServerContext, gen: Generation, stream: _Stream, strip: _LeadingSpace,
                       want_logprobs: bool) -> AsyncIterator[str]:
    for c in gen.choices:
        yield stream.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])
    async for d in gen.deltas():
        if d.finish_reason == FINISH_ERROR:
            yield _sse(error_body("the generation engine failed; see the server log", type="server_error"))
            continue
        text = strip(d.index, d.text)
        delta = {"content": text} if text else {}
        lp = _chat_logprobs(ctx, d.tokens) if want_logprobs else None
        if delta or d.finish_reason or (lp and lp["content"]):
            yield stream.chunk([{"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}])
