"""The OpenAI-compatible HTTP server (`gptforge serve`): app.py (routes), openai_api.py (completions, chat),
schemas.py (request validation), streams.py (asyncio <-> engine thread), context.py (shared checks),
chat.py (chat templates), metrics.py (Prometheus), server.py (uvicorn), playground.html (the page at /).
Needs the [serve] extra; nothing outside this package and the CLI's `serve` command imports it."""
