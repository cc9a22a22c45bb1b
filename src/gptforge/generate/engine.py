"""Generation for the CLI and the Python API: thin wrappers over the continuous-batching engine.

Legend: B prompts (rows), C context_length. `iter_tokens` runs a fixed list of prompts through
`generate.scheduler.Engine` (all rows at once, a KV cache sized to the call) and yields each step's new tokens;
`iter_text` and `generate_text` add the text layer (stop strings, whole UTF-8 characters) on top. The server
drives the same engine directly, request by request. Works on token ids and a tokenizer's `token_bytes`/`eot_id`.

Speed: decoding streams every weight matrix from memory once per step, so on CPU it is bound by memory
bandwidth and by the matrix-multiply kernels. The engine runs under `torch.inference_mode()`, which lets
`model/linear.py` use oneDNN, the faster kernels for these few-row products. The cache holds only the slots
a call can use, and the last token is never fed back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from gptforge.errors import GptforgeError
from gptforge.generate.sampling import SamplingParams
from gptforge.generate.scheduler import Engine, Sequence
from gptforge.generate.text import StopTextBuffer

__all__ = ["StopTextBuffer", "generate_text", "iter_text", "iter_tokens"]


def iter_tokens(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, *, eot_id: int,
                finished: set[int] | None = None) -> Iterator[list[tuple[int, int]]]:
    """Generate up to `params.max_new_tokens` tokens per prompt, all prompts decoded together.

    Yields, once per decoding step, `[(row, token), ...]` for the rows still running. A row stops after it
    yields `eot_id` (it is then added to `finished`), after max_new_tokens, or when the caller adds it to
    `finished` (used for stop strings). With a seed, row i samples with seed + i.

    Raises:
        GptforgeError: an empty prompt list or a prompt longer than the context window.
    """
    C = model.cfg.context_length
    if not prompts:
        raise GptforgeError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) > C:
            raise GptforgeError(f"prompt {i} has {len(p)} tokens; the model's context_length is {C} tokens")
    finished = set() if finished is None else finished
    if params.max_new_tokens == 0:
        return
    B = len(prompts)
    # All rows at once and whole prompts in one prefill, as a fixed batch; the cache is sized to the call.
    engine = Engine(model, eot_id=eot_id, max_running=B, max_queue=B, prefill_chunk=B * C,
                    max_cached_tokens=B * C)
    seqs = [Sequence(list(p), params if params.seed is None else dataclasses.replace(params, seed=params.seed + i))
            for i, p in enumerate(prompts)]
    engine.submit(seqs)
    row_of = {seq.id: i for i, seq in enumerate(seqs)}
    while engine.has_work():
        for i in finished:
            if not seqs[i].finished:
                engine.cancel(seqs[i])
        events = sorted((row_of[out.seq.id], out.token) for out in engine.step() if out.token is not None)
        for row, tok in events:
            if tok == eot_id:
                finished.add(row)
        if events:
            yield events


def iter_text(model: torch.nn.Module, tokenizer, prompts: list[str], params: SamplingParams
              ) -> Iterator[tuple[int, str]]:
    """Generate completions for every prompt (batched), yielding `(row, text_piece)` as text is produced.

    Pieces never split a multi-byte character; the end-of-text token and stop strings are not emitted.

    Raises:
        GptforgeError: a prompt the tokenizer cannot encode or longer than the context window.
    """
    ids = [tokenizer.encode(p) for p in prompts]
    buffers = [StopTextBuffer(params.stop) for _ in prompts]
    finished: set[int] = set()
    for events in iter_tokens(model, ids, params, eot_id=tokenizer.eot_id, finished=finished):
        for row, tok in events:
            if tok == tokenizer.eot_id:
                continue
            piece = buffers[row].push(tokenizer.token_bytes(tok))
            if buffers[row].done:
                finished.add(row)
            if piece:
                yield row, piece
    for row, buf in enumerate(buffers):
        if piece := buf.flush():
            yield row, piece


def generate_text(model: torch.nn.Module, tokenizer, prompts: list[str], params: SamplingParams) -> list[str]:
    """The completions of `iter_text`, one string per prompt (without the prompt)."""
    texts = ["" for _ in prompts]
    for row, piece in iter_text(model, tokenizer, prompts, params):
        texts[row] += piece
    return texts
