"""The HTTP server end to end over real sockets: every endpoint, SSE framing, logprobs and echo against the model
itself, the error contract for a fuzz set of bad bodies, auth, body and queue limits, disconnects, 64 clients."""

import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
import requests  # noqa: E402
import torch  # noqa: E402
from serve_support import live_server, make_run, one_thread, wait_until  # noqa: E402

import gptforge  # noqa: E402
from gptforge.model.loss import target_logprobs  # noqa: E402

TIMEOUT = 120


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(tiny_run):
    with live_server(tiny_run, max_running=16, max_tokens_cap=512) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def lm(tiny_run):
    return gptforge.load(tiny_run)


def post(url, path, body, **kwargs):
    return requests.post(url + path, json=body, timeout=TIMEOUT, **kwargs)


def sse_events(response):
    """Parse a text/event-stream body strictly: every event is exactly one `data: ...` line then a blank line."""
    raw = response.content.decode()
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events[:3]
    return [json.loads(e[6:]) for e in events[:-1]]


def greedy(lm, prompt, n):
    with one_thread():
        return lm.generate(prompt, max_new_tokens=n, temperature=0)


def test_completion_equals_the_python_api_and_streams_the_same_text(server, lm):
    url, _ = server
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": "The king", "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["text"] == greedy(lm, "The king", 20) and choice["finish_reason"] == "length"
    n_prompt = len(lm.tokenizer.encode("The king"))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 20, "total_tokens": n_prompt + 20}

    r = post(url, "/v1/completions", {"prompt": "The king", "max_tokens": 20, "temperature": 0, "stream": True,
                                      "stream_options": {"include_usage": True}}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert "".join(c["text"] for e in events for c in e["choices"]) == choice["text"]
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == body["usage"]
    assert all(e["usage"] is None for e in events[:-1]) and len({e["id"] for e in events}) == 1


def test_prompt_forms_n_and_seeds(server, lm):
    url, _ = server
    ids = lm.tokenizer.encode("Good night")
    r = post(url, "/v1/completions", {"prompt": ["Good night", "Sweet love"], "max_tokens": 6, "n": 2,
                                      "temperature": 1.0, "seed": 5})
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert len(texts) == 4 and r.json()["usage"]["completion_tokens"] == 24
    again = post(url, "/v1/completions", {"prompt": [ids, lm.tokenizer.encode("Sweet love")], "max_tokens": 6,
                                          "n": 2, "temperature": 1.0, "seed": 5})
    assert [c["text"] for c in sorted(again.json()["choices"], key=lambda c: c["index"])] == texts
    single = post(url, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 1.0, "seed": 6})
    assert single.json()["choices"][0]["text"] == texts[1]  # choice i of a seeded request uses seed + i
    assert texts[0] != texts[1]


def test_logprobs_and_echo_match_the_model(server, lm):
    url, _ = server
    prompt = "Speak well of the queen"
    r = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2,
                                      "echo": True})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    ids = lm.tokenizer.encode(prompt)
    assert choice["text"].startswith(prompt) and len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"][:len(ids)]) == prompt and lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]))
    expected, _ = target_logprobs(logits[:, :-1], torch.tensor([ids[1:]]))
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:len(ids)]), expected[0], rtol=0, atol=1e-4)
    best = float(torch.log_softmax(logits[0, -1], -1).max())
    assert lp["token_logprobs"][len(ids)] == pytest.approx(best, abs=1e-4)  # greedy: the most likely token
    assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
    generated = lp["token_logprobs"][len(ids)]
    assert generated == pytest.approx(max(lp["top_logprobs"][len(ids)].values()), abs=1e-6)  # greedy = the top


def test_stop_strings_cut_the_text(server, lm):
    url, _ = server
    full = greedy(lm, "The queen", 30)
    stop = full[5:8]
    r = post(url, "/v1/completions", {"prompt": "The queen", "max_tokens": 30, "temperature": 0, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[:full.index(stop)] and choice["finish_reason"] == "stop"


def test_chat_completion_and_stream(server, lm):
    url, app = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Good day"}]
    prompt = "Be brief.\n\nUser: Good day\nAssistant:"
    assert app.state.ctx.chat_template.render(messages) == prompt
    tok = post(url, "/tokenize", {"messages": messages}).json()
    assert tok["tokens"] == lm.tokenizer.encode(prompt) and tok["max_model_len"] == 64
    r = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 12, "temperature": 0,
                                           "logprobs": True, "top_logprobs": 1})
    choice = r.json()["choices"][0]
    expected = greedy(lm, prompt, 12)
    expected = expected[:min([expected.index(s) for s in ("\nUser:", "\nAssistant:") if s in expected] or [99])]
    assert choice["message"] == {"role": "assistant", "content": expected.removeprefix(" ")}
    assert choice["logprobs"]["content"][0]["top_logprobs"][0]["token"] == choice["logprobs"]["content"][0]["token"]
    r = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 12, "temperature": 0,
                                           "stream": True}, stream=True)
    events = sse_events(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == choice["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_models_health_tokenizer_and_metrics(server, lm):
    url, _ = server
    models = requests.get(url + "/v1/models", timeout=TIMEOUT).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert requests.get(url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    ids = post(url, "/tokenize", {"prompt": "Fair heart"}).json()["tokens"]
    assert ids == lm.tokenizer.encode("Fair heart")
    assert post(url, "/detokenize", {"tokens": ids}).json() == {"prompt": "Fair heart"}
    info = requests.get(url + "/tokenizer_info", timeout=TIMEOUT).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
    post(url, "/v1/completions", {"prompt": "x", "max_tokens": 3})
    text = requests.get(url + "/metrics", timeout=TIMEOUT).text
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert metrics['gptforge_http_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert metrics["gptforge_generation_tokens_total"] >= 3 and metrics["gptforge_prompt_tokens_total"] >= 1
    assert metrics["gptforge_time_to_first_token_seconds_count"] >= 1
    assert metrics["gptforge_time_per_output_token_seconds_count"] >= 1
    assert metrics["gptforge_requests_running"] == 0 and metrics["gptforge_requests_waiting"] == 0


BAD_BODIES = [  # (body, param named in the error)
    ({"prompt": 5}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"), ({"prompt": [True, 2]}, "prompt"), ({"prompt": [-1]}, "prompt"),
    ({"prompt": [10**12]}, "prompt"), ({"prompt": None}, "prompt"), ({}, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"), ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**30}, "max_tokens"), ({"prompt": "x", "max_tokens": 100_000}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"), ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"), ({"prompt": "x", "temperature": 1e308}, "temperature"),
    ({"prompt": "x", "temperature": True}, "temperature"), ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.01}, "top_p"), ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "n": 10**9}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"), ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "stop": ""}, "stop"), ({"prompt": "x", "stop": [1]}, "stop"), ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "seed": -5}, "seed"), ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"), ({"prompt": "x", "top_k": -7}, "top_k"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"), ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "stream": 1}, "stream"), ({"prompt": "x", "stream_options": {"include_usage": True}},
                                               "stream_options"),
    ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"), ({"prompt": "x", "stream_options": 7}, "stream_options"),
    ({"prompt": "the " * 200}, "prompt"),
]
BAD_CHAT = [
    ({"messages": []}, "messages"), ({"messages": None}, "messages"), ({}, "messages"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 500}]}, "messages"),
]


@pytest.mark.parametrize("path,cases", [("/v1/completions", BAD_BODIES), ("/v1/chat/completions", BAD_CHAT)])
def test_every_bad_body_is_a_400_naming_the_field(server, path, cases):
    url, _ = server
    for body, param in cases:
        r = post(url, path, body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["param"] == param and param.split(".")[-1] in error["message"], (body, error)
    over = post(url, path, {"prompt": "the " * 200} if "chat" not in path else
                {"messages": [{"role": "user", "content": "the " * 200}]}).json()["error"]["message"]
    match = re.search(r"(?:has|have) (\d+) tokens; the model's context_length is 64 tokens", over)
    assert match and int(match.group(1)) >= 200, over  # both numbers


def test_malformed_bodies_unknown_models_and_paths(server, caplog):
    url, _ = server
    raw = [b"{bad json", b"", b"[1, 2]", b'"text"', b"null", b"\xff\xfe", b'{"prompt": NaN}', b'{"prompt": "x",}']
    for data in raw:
        r = requests.post(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"},
                          timeout=TIMEOUT)
        assert r.status_code == 400 and "error" in r.json(), (data, r.text)
        if data == b"":
            assert r.json()["error"]["message"] == "the request body is empty; send a JSON object"
    r = requests.post(url + "/v1/completions", data=b'{"prompt": "x"}', timeout=TIMEOUT)  # no content type
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
    r = post(url, "/v1/completions", {"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert requests.get(url + "/v2/nothing", timeout=TIMEOUT).status_code == 404
    assert requests.delete(url + "/v1/models", timeout=TIMEOUT).status_code == 405
    with caplog.at_level("INFO", logger="gptforge.serve"):
        r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1, "frobnicate": 3, "user": "u"})
    assert r.status_code == 200 and "ignoring unknown fields 'frobnicate'" in caplog.text


def test_auth_body_limit_and_queue_limit(tiny_run):
    with live_server(tiny_run, api_key="s3cret", max_body_bytes=4096, max_running=1, max_queue=1,
                     max_tokens_cap=100_000) as (url, app):
        assert post(url, "/v1/completions", {"prompt": "x"}).status_code == 401
        r = post(url, "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = {"Authorization": "Bearer s3cret"}
        assert post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}, headers=ok).status_code == 200
        assert requests.get(url + "/health", timeout=TIMEOUT).status_code == 200  # health needs no key
        r = post(url, "/v1/completions", {"prompt": "x" * 5000}, headers=ok)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        engine = app.state.ctx.engine
        long = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 100_000, "stream": True}, headers=ok,
                    stream=True)  # occupies the only row
        wait_until(lambda: engine.num_running == 1, what="the long request to run")
        queued = threading.Thread(target=post, args=(url, "/v1/completions", {"prompt": "y", "max_tokens": 1}),
                                  kwargs={"headers": ok})
        queued.start()
        wait_until(lambda: engine.num_waiting == 1, what="a request to wait")
        r = post(url, "/v1/completions", {"prompt": "z", "max_tokens": 1}, headers=ok)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        long.close()  # the client leaves: its row goes to the queued request
        queued.join(TIMEOUT)
        wait_until(lambda: engine.num_running == 0 and engine.num_waiting == 0, what="the engine to drain")


def test_client_disconnect_cancels_the_request(tiny_run):
    """Requests of a million tokens (far more than the 120 s wait allows) end only if the disconnect cancels them."""
    with live_server(tiny_run, max_tokens_cap=10**6) as (url, app):
        engine = app.state.ctx.engine
        endless = {"prompt": "x", "max_tokens": 10**6, "ignore_eos": True}
        r = post(url, "/v1/completions", {**endless, "stream": True}, stream=True)
        next(r.iter_lines())
        assert engine.num_running == 1
        r.close()
        wait_until(lambda: engine.num_running == 0, what="the streaming request to be cancelled")
        # a non-streaming request whose client goes away is cancelled too
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps(endless).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: engine.num_running == 1, what="the request to start")
        wait_until(lambda: engine.num_running == 0, what="the abandoned request to be cancelled")


def test_64_concurrent_streaming_clients(server, lm):
    url, app = server
    prompts = [f"{a} {b}" for a in ("The king", "Good night", "Sweet love", "My lord") for b in range(16)]
    with one_thread():
        expected = lm.generate(prompts, max_new_tokens=8, temperature=0)
    assert len(set(expected)) > 32  # distinct enough that a mixed-up stream would show

    def client(prompt):
        r = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True},
                 stream=True)
        assert r.status_code == 200, r.text
        return "".join(c["text"] for e in sse_events(r) for c in e["choices"])

    with ThreadPoolExecutor(64) as pool:
        got = list(pool.map(client, prompts))
    assert got == expected
    assert app.state.ctx.engine.num_running == 0
