"""`gptforge serve` as a user runs it: a real process on a free port, the README's curl-style request, graceful
shutdown on SIGTERM (a running stream ends cleanly with [DONE]), /health before the model is ready, bad flags."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

pytest.importorskip("fastapi")
import requests  # noqa: E402
from serve_support import live_server, make_run, wait_until  # noqa: E402

TIMEOUT = 120


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve_cli"))


def start(run, *flags, env=None):
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", str(run), "--port", "0", *map(str, flags)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    line = proc.stdout.readline()  # "gptforge serve: model ... on http://127.0.0.1:PORT ..."
    assert " on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    url = line.split(" on ")[1].split()[0]
    wait_until(lambda: _ok(url + "/health"), TIMEOUT, "the server to be ready")
    return proc, url


def _ok(url):
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def test_serve_answers_and_shuts_down_gracefully_on_sigterm(tiny_run):
    # The stream must outlast the shutdown grace period on any machine: the tiny model writes thousands of tokens
    # a second on a quiet CPU (4000 tokens once finished inside a 2 s grace period), so it asks for a million.
    proc, url = start(tiny_run, "--served_model_name", "demo", "--shutdown_timeout", 2, "--max_tokens_cap", 10**6,
                      env={"GPTFORGE_API_KEY": "k"})
    try:
        headers = {"Authorization": "Bearer k"}
        r = requests.post(url + "/v1/completions", json={"model": "demo", "prompt": "The king", "max_tokens": 5},
                          headers=headers, timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert requests.post(url + "/v1/completions", json={"prompt": "x"}, timeout=TIMEOUT).status_code == 401
        stream = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 10**6, "stream": True, "ignore_eos": True},
                               headers=headers, stream=True, timeout=TIMEOUT)
        lines = stream.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith(b"data: {")
        received = []
        reader = threading.Thread(target=lambda: received.extend(line for line in lines if line))
        reader.start()
        proc.send_signal(signal.SIGTERM)
        reader.join(TIMEOUT)
        assert received[-1] == b"data: [DONE]"  # the stream was ended cleanly, not cut
        last = json.loads(received[-2][6:])
        assert last["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(TIMEOUT) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("flags,message", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--max_running", "0"], "--max_running must be >= 1"),
])
def test_bad_flags_are_one_line_errors(tiny_run, flags, message):
    proc = subprocess.run([sys.executable, "-m", "gptforge", "serve", str(tiny_run), *flags], capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_busy_port_is_a_one_line_error(tiny_run):
    with live_server(tiny_run) as (url, _):
        port = url.rsplit(":", 1)[1]
        proc = subprocess.run([sys.executable, "-m", "gptforge", "serve", str(tiny_run), "--port", port],
                              capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_health_is_503_until_the_model_has_run_and_after_the_engine_fails(tiny_run):
    import gptforge
    from gptforge.serve.app import create_app
    from gptforge.serve.context import ServeSettings
    from gptforge.serve.server import ServerThread

    app = create_app(gptforge.load(tiny_run), ServeSettings(served_model_name="tiny"))
    runner = app.state.ctx.runner
    runner.start = lambda: None  # the engine never starts: the model has not run a forward pass
    server = ServerThread(app).start()
    try:
        r = requests.get(server.url + "/health", timeout=TIMEOUT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        runner.ready.set()
        runner.error = RuntimeError("out of memory")
        r = requests.get(server.url + "/health", timeout=TIMEOUT)
        assert r.status_code == 503 and "stopped" in r.json()["error"]["message"]
        r = requests.post(server.url + "/v1/completions", json={"prompt": "x"}, timeout=TIMEOUT)
        assert r.status_code == 503 and "engine has failed" in r.json()["error"]["message"]
    finally:
        server.stop()
