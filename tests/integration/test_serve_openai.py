"""The official `openai` Python client against a live gptforge server: completions, chat, streaming, models, and
errors surfacing as the client's own exception types."""

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_support import live_server, make_run, one_thread  # noqa: E402

import gptforge  # noqa: E402

KEY = "test-key-123"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("serve_openai"))
    with live_server(run, api_key=KEY, max_tokens_cap=256) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        yield client, gptforge.load(run), url


def test_completions_with_the_openai_client(setup):
    client, lm, _ = setup
    out = client.completions.create(model="tiny", prompt="The king", max_tokens=10, temperature=0)
    with one_thread():
        expected = lm.generate("The king", max_new_tokens=10, temperature=0)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 10 and out.model == "tiny"
    stream = client.completions.create(model="tiny", prompt="The king", max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 10
    scored = client.completions.create(model="tiny", prompt="Good night", max_tokens=1, temperature=0, echo=True,
                                       logprobs=1)
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lm.tokenizer.encode("Good night")) + 1
    assert all(isinstance(v, float) for v in lp.token_logprobs[1:])


def test_chat_with_the_openai_client(setup):
    client, lm, _ = setup
    messages = [{"role": "user", "content": "Good day, my lord"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, seed=3)
    msg = out.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                             stream=True) if c.choices]
    assert "".join(pieces) == msg.content
    with_lp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0,
                                             logprobs=True, top_logprobs=2)
    content = with_lp.choices[0].logprobs.content
    assert len(content) == with_lp.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_errors_surface_as_the_clients_exceptions(setup):
    client, _, url = setup
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="context_length is 64 tokens"):
        client.completions.create(model="tiny", prompt="the " * 100)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x")
    try:
        client.completions.create(model="tiny", prompt="x", n=0)
    except openai.BadRequestError as exc:
        assert exc.body["param"] == "n" and exc.body["type"] == "invalid_request_error"
    else:
        raise AssertionError("n=0 was accepted")
