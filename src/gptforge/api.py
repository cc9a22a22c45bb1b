"""The Python API shared by the CLI and the server: load a trained model and generate text.

`LanguageModel.generate` runs the continuous-batching engine (`generate.scheduler.Engine`) over its prompts,
the same engine `gptforge serve` drives request by request (`serve.app.create_app(lm, settings)`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from gptforge.checkpoint.io import find_checkpoint, load_checkpoint
from gptforge.config import Config
from gptforge.errors import GptforgeError
from gptforge.generate.engine import generate_text, iter_text
from gptforge.generate.sampling import SamplingParams


class LanguageModel:
    """A loaded model: `.model` (GPT, eval mode), `.tokenizer`, `.config` and `.generate(...)`."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: Config, checkpoint: Path) -> None:
        self.model, self.tokenizer, self.config, self.checkpoint = model, tokenizer, config, checkpoint

    def generate(self, prompt: str | list[str], *, max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop: str | tuple[str, ...] | list[str] = (), seed: int | None = None,
                 stream: bool = False) -> str | list[str] | Iterator[str]:
        """Complete `prompt` (one string, or a list for a batch); see `SamplingParams` for the knobs.

        Returns:
            The completion text (without the prompt), a list of them for a list of prompts, or with
            `stream=True` (one prompt only) an iterator of text pieces as they are produced.

        Raises:
            GptforgeError: invalid sampling values, a prompt longer than the context window, a prompt the
            tokenizer cannot encode, or `stream=True` with several prompts.
        """
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, stop=tuple([stop] if isinstance(stop, str)
                                                                                  else stop), seed=seed)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if stream:
            if len(prompts) != 1:
                raise GptforgeError("stream=True takes a single prompt")
            self.tokenizer.encode(prompts[0])  # raise now, not at the first next()
            return (piece for _, piece in iter_text(self.model, self.tokenizer, prompts, params))
        texts = generate_text(self.model, self.tokenizer, prompts, params)
        return texts[0] if isinstance(prompt, str) else texts


def load(path: str | Path, *, device: str = "cpu") -> LanguageModel:
    """Load the latest checkpoint of a run directory, or a given checkpoint directory.

    Raises:
        GptforgeError: the path does not exist, holds no checkpoint, or a file in it is corrupt.
    """
    model, cfg, tokenizer, _ = load_checkpoint(path, device=device)
    return LanguageModel(model, tokenizer, cfg, find_checkpoint(path))
