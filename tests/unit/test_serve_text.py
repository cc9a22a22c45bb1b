"""The text layer under the server: token text, offsets and logprob release around stop strings, and the chat
templates (the plain one for base models, a model's own Jinja template)."""

import pytest

from gptforge.errors import GptforgeError
from gptforge.generate.text import TextStream

pytest.importorskip("jinja2")
from gptforge.serve.chat import ChatTemplate, load_chat_template  # noqa: E402


def push_all(stream, text):
    return "".join(stream.push(b) for b in text.encode())


def test_tokens_are_released_with_their_text_and_cut_at_a_stop_string(byte_tokenizer):
    stream = TextStream(byte_tokenizer, stop=("END",))
    assert push_all(stream, "ab") == "ab"
    assert [(t.text, t.offset) for t in stream.take_tokens()] == [("a", 0), ("b", 1)]
    assert push_all(stream, "cE") == "c"  # "E" could begin "END": held back, and so is its token
    assert [t.text for t in stream.take_tokens()] == ["c"]
    assert push_all(stream, "NDxy") == "" and stream.done
    assert stream.finish() == ""
    assert stream.take_tokens() == []  # "E", "N", "D" and later tokens start at or after the cut


def test_finish_releases_held_text_and_the_end_of_text_token(byte_tokenizer):
    stream = TextStream(byte_tokenizer, stop=("\n\n",))
    assert push_all(stream, "hi\n") == "hi"
    stream.push(byte_tokenizer.eot_id)
    assert stream.finish() == "\n" and not stream.done
    assert [t.token for t in stream.take_tokens()] == [*b"hi\n", byte_tokenizer.eot_id]


def test_multibyte_characters_are_never_split(byte_tokenizer):
    stream = TextStream(byte_tokenizer)
    pieces = [stream.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]
    assert [t.offset for t in stream.take_tokens()] == [0, 0, 1]  # both bytes of "é" start at character 0


def test_base_chat_template():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    template = ChatTemplate()
    assert template.render(messages) == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    assert template.stop == ("\nUser:", "\nAssistant:") and template.strip_leading_space
    assert template.render([{"role": "user", "content": "x"}]) == "User: x\nAssistant:"


def test_a_models_own_jinja_template_is_used(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    assert load_chat_template(ckpt, "<|endoftext|>").source is None
    (tmp_path / "run" / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    template = load_chat_template(ckpt, "<|endoftext|>")
    assert template.render([{"role": "user", "content": "Hi"}]) == "<|user|>Hi<|endoftext|><|assistant|>"
    assert template.stop == () and not template.strip_leading_space
    broken = ChatTemplate("{{ messages[5].content }}")
    with pytest.raises(GptforgeError, match="chat template failed"):
        broken.render([{"role": "user", "content": "x"}])
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(GptforgeError):
        sandboxed.render([])
