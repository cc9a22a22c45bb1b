"""`gptforge serve`: an OpenAI-compatible HTTP server (and a browser playground) for a run's model."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

API_KEY_ENV = "GPTFORGE_API_KEY"


def _check_flags(args: argparse.Namespace) -> None:
    from gptforge.errors import GptforgeError

    checks = [(0 <= args.port <= 65535, "--port must be in 0..65535 (0 picks a free port)"),
              (args.max_running >= 1, "--max_running must be >= 1"),
              (args.max_queue >= 1, "--max_queue must be >= 1"),
              (args.max_tokens_cap >= 1, "--max_tokens_cap must be >= 1"),
              (args.prefill_chunk >= 1, "--prefill_chunk must be >= 1"),
              (args.max_body_bytes >= 1024, "--max_body_bytes must be >= 1024"),
              (args.shutdown_timeout >= 0, "--shutdown_timeout must be >= 0 seconds"),
              (args.max_cached_tokens is None or args.max_cached_tokens >= 1, "--max_cached_tokens must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise GptforgeError(message)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run's model over an OpenAI-compatible HTTP API, with a playground page at /."""
    from gptforge.errors import GptforgeError

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise GptforgeError("gptforge serve needs the [serve] extra: pip install 'gptforge[serve]'") from None
    _check_flags(args)
    import gptforge
    from gptforge.serve.app import create_app
    from gptforge.serve.context import ServeSettings
    from gptforge.serve.server import bind, serve, url_of
    from gptforge.utils.device import resolve_device

    lm = gptforge.load(args.run_dir, device=str(resolve_device(args.device)))
    name = args.served_model_name or os.path.basename(os.path.normpath(args.run_dir)) or "gptforge"
    settings = ServeSettings(
        served_model_name=name, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_running=args.max_running, max_queue=args.max_queue, max_cached_tokens=args.max_cached_tokens,
        prefill_chunk=args.prefill_chunk, max_tokens_cap=args.max_tokens_cap, max_body_bytes=args.max_body_bytes,
        cors_origins=list(args.cors_origin or []), log_prompts=args.log_prompts,
        shutdown_timeout_s=args.shutdown_timeout)
    app = create_app(lm, settings)
    sock = bind(args.host, args.port)
    url = url_of(sock)
    print(f"gptforge serve: model '{name}' ({lm.checkpoint}) on {url}  (playground: {url}/)", flush=True)
    if settings.api_key is None and not _is_loopback(args.host):
        print(f"warning: listening on {args.host} without an API key (set --api_key or {API_KEY_ENV})",
              file=sys.stderr, flush=True)
    serve(app, sock, shutdown_timeout_s=args.shutdown_timeout, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def register(sub) -> None:
    p = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (8000)")
    p.add_argument("--served_model_name", default=None, help="the `model` name clients use (the run dir's name)")
    p.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV}); off by default")
    p.add_argument("--max_running", type=int, default=32, help="requests decoded together (32)")
    p.add_argument("--max_queue", type=int, default=256, help="requests waiting for a row; 429 beyond (256)")
    p.add_argument("--max_cached_tokens", type=int, default=None,
                   help="KV-cache slots over all rows (max_running x context_length)")
    p.add_argument("--prefill_chunk", type=int, default=128, help="prompt tokens read per decoding step (128)")
    p.add_argument("--max_tokens_cap", type=int, default=4096, help="largest max_tokens a request may ask (4096)")
    p.add_argument("--max_body_bytes", type=int, default=2_000_000, help="largest request body (2000000)")
    p.add_argument("--cors_origin", action="append", help="allow this browser origin (repeatable); none by default")
    p.add_argument("--log_prompts", action="store_true", help="log prompts (never logged otherwise)")
    p.add_argument("--shutdown_timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may go on before they are ended (30)")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"], help="(info)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (cpu)")
    p.set_defaults(handler=cmd_serve, overrides=False)
