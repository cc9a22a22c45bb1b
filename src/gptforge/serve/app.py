"""The OpenAI-compatible HTTP server: a FastAPI app over one engine thread that owns the model.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (503 until the model has
run a forward pass and after the engine has failed), GET /metrics (Prometheus), POST /tokenize, POST /detokenize,
GET /tokenizer_info (vLLM's shapes, which lm-evaluation-harness's remote tokenizer uses), GET / (the playground
page). Every error is OpenAI's JSON `{"error": {"message", "type", "param", "code"}}`: 400 for an invalid field
(named, with its allowed values) or an over-long prompt, 401 without the right API key (when one is set; compared
in constant time), 404 for an unknown model or path, 413 for a body over the size limit, 429 when the queue is
full, 503 while shutting down or after an engine failure. No request body can cause a 5xx.

FastAPI, uvicorn and prometheus_client come with the [serve] extra; nothing here is imported by `gptforge` itself.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptforge.serve.context import APIError, ServerContext, ServeSettings
from gptforge.serve.openai_api import create_chat_completion, create_completion
from gptforge.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    describe_validation_error,
    error_body,
)

log = logging.getLogger("gptforge.serve")
_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
             "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _error(status: int, message: str, **kwargs) -> JSONResponse:
    return JSONResponse(error_body(message, **kwargs), status_code=status)


class BodyLimitAndMetrics:
    """ASGI middleware: refuse bodies over `max_bytes` with 413 before the app sees them (the body is read
    here and replayed), and count every HTTP response by endpoint and status."""

    def __init__(self, app, ctx: ServerContext) -> None:
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            limit = self.ctx.settings.max_body_bytes
            body, more, size = [], True, 0
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await _error(413, f"the request body is over {limit} bytes", code="body_too_large")(
                        scope, receive, counting_send)
                    return
                body.append(chunk)
                more = message.get("more_body", False)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(body), "more_body": False}
                return await receive()

            await self.app(scope, replay, counting_send)
        finally:
            self.ctx.metrics.count_request(scope.get("path", ""), status["code"])


def create_app(lm, settings: ServeSettings) -> FastAPI:
    """The app for a loaded `gptforge.LanguageModel`; its engine thread starts and stops with the app."""
    ctx = ServerContext(lm, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.runner.start()
        try:
            yield
        finally:
            ctx.runner.stop(0)

    app = FastAPI(title="gptforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    _install_error_handlers(app)
    app.add_middleware(BodyLimitAndMetrics, ctx=ctx)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def auth(request: Request) -> None:
        ctx.check_auth(request.headers.get("authorization"))

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request):
        return _respond(await create_completion(ctx, body, request.receive))

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return _respond(await create_chat_completion(ctx, body, request.receive))

    _add_info_routes(app, ctx, auth)
    _add_tokenizer_routes(app, ctx, auth)
    page = resources.files("gptforge.serve").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    return app


def _respond(result):
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _add_info_routes(app: FastAPI, ctx: ServerContext, auth) -> None:
    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": ctx.settings.served_model_name, "object": "model",
                                            "created": int(ctx.lm.checkpoint.stat().st_mtime), "owned_by": "gptforge",
                                            "max_model_len": ctx.context_length}]}

    @app.get("/health")
    async def health():
        if ctx.runner.error is not None or (ctx.runner.ready.is_set() and not ctx.runner.alive):
            return _error(503, "the generation engine has stopped", type="server_error", code="unavailable")
        if not ctx.runner.ready.is_set():
            return _error(503, "the model is loading", type="server_error", code="loading")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_tokenizer_routes(app: FastAPI, ctx: ServerContext, auth) -> None:
    @app.post("/tokenize", dependencies=[Depends(auth)])
    async def tokenize(body: TokenizeRequest):
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' (text) or 'messages'", param="prompt")
        text = body.prompt if body.prompt is not None else ctx.chat_template.render(
            [{"role": m.role, "content": m.content} for m in body.messages])
        tokens = ctx.tokenizer.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": ctx.context_length}

    @app.post("/detokenize", dependencies=[Depends(auth)])
    async def detokenize(body: DetokenizeRequest):
        ctx.check_model(body.model)
        bad = next((t for t in body.tokens if t >= ctx.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"'tokens' holds token id {bad}; allowed: 0..{ctx.vocab_size - 1}", param="tokens")
        return {"prompt": ctx.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info", dependencies=[Depends(auth)])
    async def tokenizer_info():
        eos = ctx.token_text(ctx.tokenizer.eot_id)
        return {"tokenizer_class": type(ctx.tokenizer).__name__, "eos_token": eos, "bos_token": None,
                "pad_token": None, "model_max_length": ctx.context_length, "vocab_size": ctx.vocab_size,
                "chat_template": ctx.chat_template.source}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = describe_validation_error(list(exc.errors()))
        if param is None and "json" not in request.headers.get("content-type", ""):
            message = "the request body must be JSON, sent with the header 'Content-Type: application/json'"
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        return _error(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                      code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # a bug: log it, answer in the API's shape
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", type="server_error")


__all__ = ["ServeSettings", "create_app"]
