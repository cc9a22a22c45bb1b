"""Chat messages -> one prompt string: the plain-text template for base models, or a model's own template.

The base template (documented in docs/serving.md) writes system (and developer) messages first as a
paragraph, then one line per turn, and ends with the assistant's cue:

    You are a helpful assistant.

    User: Hello!
    Assistant: Hi, how can I help?
    User: What is 2 + 2?
    Assistant:

Generation stops at "\\nUser:" (and "\\nAssistant:"), so a base model continuing the dialogue ends the reply,
and one leading space of the reply is dropped. A model whose checkpoint or run directory holds
`chat_template.jinja` (the Hugging Face convention) is rendered with it instead (Jinja2's sandbox, with
`messages`, `add_generation_prompt=True`, `eos_token`, `bos_token`), and only end-of-text stops it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptforge.errors import GptforgeError

TEMPLATE_FILE = "chat_template.jinja"
BASE_STOP = ("\nUser:", "\nAssistant:")


@dataclass
class ChatTemplate:
    """How this server turns messages into a prompt. `source` is None for the base template, else the
    Jinja2 template text."""

    source: str | None = None
    eos_token: str = "<|endoftext|>"

    @property
    def stop(self) -> tuple[str, ...]:
        return BASE_STOP if self.source is None else ()

    @property
    def strip_leading_space(self) -> bool:
        return self.source is None

    def render(self, messages: list[dict[str, str]]) -> str:
        """messages [{"role", "content"}, ...] -> the prompt text, ending where the assistant's reply begins.

        Raises:
            GptforgeError: the model's own template fails to render these messages.
        """
        if self.source is not None:
            return self._render_jinja(messages)
        system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
        lines = ["\n".join(system) + "\n"] if system else []
        for m in messages:
            if m["role"] in ("user", "assistant"):
                lines.append(f"{m['role'].capitalize()}: {m['content']}")
        return "\n".join(lines) + "\nAssistant:"

    def _render_jinja(self, messages: list[dict[str, str]]) -> str:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            return env.from_string(self.source).render(messages=messages, add_generation_prompt=True,
                                                       eos_token=self.eos_token, bos_token="")
        except TemplateError as exc:
            raise GptforgeError(f"the model's chat template failed on these messages: {exc}") from None


def load_chat_template(checkpoint: Path, eos_token: str) -> ChatTemplate:
    """The template of a checkpoint: `chat_template.jinja` in the checkpoint directory or its run directory,
    else the base template."""
    for directory in (checkpoint, checkpoint.parent.parent):
        path = directory / TEMPLATE_FILE
        if path.is_file():
            return ChatTemplate(path.read_text(encoding="utf-8"), eos_token)
    return ChatTemplate(None, eos_token)
