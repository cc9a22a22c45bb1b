"""KV-cached decoding of token ids, and the text layer on top (stop strings, streaming).

Legend: B prompts (rows), C context_length. The engine works on token ids only and knows nothing of HTTP or
the CLI. Prompts of different lengths are left-padded (the cache gives each row its own position ids and
hides its padding). When a row would outgrow the context window, the window slides: the cache is rebuilt
from the last `C - C // 4` tokens of every row, so each later logit equals a full forward pass over exactly
the tokens the cache holds (learned absolute positions make reusing shifted keys impossible).

Speed: decoding streams every weight matrix from memory once per step, so on CPU it is bound by memory
bandwidth and by the matrix-multiply kernels. It runs under `torch.inference_mode()`, which lets
`model/linear.py` use oneDNN, the faster kernels for these few-row products. The cache holds only the slots
a call can use, and the last token is never fed back.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch

from gptforge.errors import GptforgeError
from gptforge.generate.sampling import SamplingParams, sample_next
from gptforge.model.kv_cache import KVCache


def _left_pad(rows: list[list[int]], device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """rows -> tokens (B, L) int64 left-padded with pad_id (hidden by the cache's mask), pad_lengths (B,) int64."""
    width = max(len(r) for r in rows)
    tokens = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    pads = torch.tensor([width - len(r) for r in rows], dtype=torch.long, device=device)
    return tokens, pads


@torch.inference_mode()  # also selects the fastest CPU kernels, see model/linear.py
def iter_tokens(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, *, eot_id: int,
                finished: set[int] | None = None) -> Iterator[list[tuple[int, int]]]:
    """Generate up to `params.max_new_tokens` tokens per prompt.

    Yields, once per decoding step, `[(row, token), ...]` for the rows still running. A row stops after it
    yields `eot_id`, after max_new_tokens, or when the caller adds it to `finished` (used for stop strings).

    Raises:
        GptforgeError: an empty prompt list or a prompt longer than the context window.
    """
    cfg = model.cfg
    C = cfg.context_length
    if not prompts:
        raise GptforgeError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) > C:
            raise GptforgeError(f"prompt {i} has {len(p)} tokens; the model's context_length is {C} tokens")
    device = next(model.parameters()).device
    finished = set() if finished is None else finished
    rows = [list(p) if p else [eot_id] for p in prompts]  # an empty prompt starts from end-of-text
    B, V, n_new = len(rows), cfg.vocab_size, params.max_new_tokens
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, ()).item()))
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            seen[b, torch.tensor(r, device=device)] = True
    # Slots for the prompt and every new token but the last (it is never fed back); the whole window only
    # when the window may slide.
    capacity = min(C, max(len(r) for r in rows) + max(n_new - 1, 0))
    cache = KVCache(n_layer=cfg.n_layer, batch_size=B, n_head=cfg.n_head, d_head=cfg.d_head, capacity=capacity,
                    device=device, dtype=next(model.parameters()).dtype)

    def prefill(keep: int) -> torch.Tensor:
        tokens, pads = _left_pad([r[-keep:] for r in rows], device)
        cache.reset(pads)
        return model(tokens, kv_cache=cache)[:, -1]  # (B, V)

    if n_new == 0:
        return
    logits = prefill(C)
    for step in range(n_new):
        nxt = sample_next(logits, params, seen=seen, generator=generator)  # (B,)
        out = []
        for b, tok in enumerate(nxt.tolist()):
            if b in finished:
                continue
            rows[b].append(tok)
            out.append((b, tok))
            if tok == eot_id:
                finished.add(b)
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        yield out
        if len(finished) >= B or step == n_new - 1:
            return
        if cache.length == C:
            logits = prefill(C - max(1, C // 4))
        else:
            logits = model(nxt[:, None], kv_cache=cache)[:, -1]


class StopTextBuffer:
    """Per-row text assembly: bytes -> UTF-8 text without splitting a multi-byte character, and stop strings
    found even when they span tokens. Text that could still begin a stop string is held back until resolved.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.pending = ""  # decoded text not yet emitted
        self.done = False

    def push(self, data: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to emit (possibly "")."""
        if self.done:
            return ""
        self.pending += self.decoder.decode(data)
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.done = True
            text, self.pending = self.pending[:cut], ""
            return text
        hold = max((k for s in self.stop for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:k])), default=0)
        text, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return text

    def flush(self) -> str:
        """End of generation: emit what was held back (it did not turn into a stop string)."""
        if self.done:
            return ""
        text, self.pending = self.pending + self.decoder.decode(b"", final=True), ""
        return text


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
