"""Running the app under uvicorn: on a bound socket (port 0 picks a free port), with graceful shutdown.

On SIGTERM or Ctrl-C the listening socket closes, running requests may finish for `shutdown_timeout_s` seconds,
then whatever still runs is ended (finish reason "abort", streams still end with `data: [DONE]`) and the process
exits. `ServerThread` runs the same server in a background thread (tests and benchmarks).
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable

from gptforge.errors import GptforgeError


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free port chosen by the OS).

    Raises:
        GptforgeError: the address cannot be bound (in use, not local, permission).
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        raise GptforgeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(app, shutdown_timeout_s: float, log_level: str, on_exit: Callable[[], None] | None):
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM / SIGINT: start draining the engine too
            if on_exit is not None and not self.should_exit:
                on_exit()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=int(shutdown_timeout_s) + 5,
                            timeout_keep_alive=5, proxy_headers=False, server_header=False)
    return Server(config)


def serve(app, sock: socket.socket, *, shutdown_timeout_s: float = 30.0, log_level: str = "info") -> None:
    """Serve `app` (from `create_app`) on `sock` until SIGTERM/SIGINT. After a graceful SIGTERM shutdown the
    process exits with status 0 (uvicorn re-raises the signal once it has finished; we take it as done)."""
    ctx = app.state.ctx
    server = _uvicorn_server(app, shutdown_timeout_s, log_level,
                             on_exit=lambda: ctx.runner.begin_shutdown(shutdown_timeout_s))
    previous = signal.signal(signal.SIGTERM, _shut_down)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)


def _shut_down(signum, frame) -> None:
    raise SystemExit(0)


class ServerThread:
    """The app served on 127.0.0.1 (a free port) from a background thread; `url` once `start()` returns."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = _uvicorn_server(app, 5.0, log_level, on_exit=None)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout_s: float = 120.0) -> ServerThread:
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout_s * 20)):
            if self.server.started or not self._thread.is_alive():
                break
            deadline.wait(0.05)
        if not self.server.started:
            raise RuntimeError("the server did not start")
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self.sock.close()
