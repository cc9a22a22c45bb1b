"""Perplexity and bits-per-byte of a text file with a sliding window.

The text is tokenized whole and the end-of-text token is put in front, so every token of the text is
scored, the first one given only end-of-text (as lm-evaluation-harness's rolling log-likelihood does).
Windows of W = context_length inputs start every `stride` tokens; each scores only the targets no earlier
window scored, so every token is scored exactly once, with between W - stride and W tokens of left context
(stride = W: consecutive disjoint windows, equal to a straightforward full-window evaluation; smaller
strides give more context per token and cost W / stride times more compute).
perplexity = exp(total NLL / tokens); bits_per_byte = total NLL / ln 2 / UTF-8 bytes of the text
(comparable across tokenizers). Scoring goes through `model.loss.token_nll`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from gptforge.errors import GptforgeError
from gptforge.model.loss import IGNORE_INDEX, token_nll


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path`; raises GptforgeError when missing, not UTF-8 or empty."""
    p = Path(path)
    if not p.is_file():
        raise GptforgeError(f"perplexity file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GptforgeError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise GptforgeError(f"{p} is empty; expected a text file")
    return text


def windows(n_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window over n_targets targets: inputs seq[begin:end], targets
    seq[begin+1:end+1], of which those at index >= first_scored are scored."""
    out, scored_to, begin = [], 0, 0
    while scored_to < n_targets:
        end = min(begin + window, n_targets)
        out.append((begin, end, scored_to))
        scored_to = end
        begin += stride
    return out


@torch.no_grad()
def rolling_nll(model: torch.nn.Module, seq: list[int], *, stride: int, batch_size: int = 8,
                progress=None) -> float:
    """Total negative log-likelihood (nats, float) of seq[1:] given what precedes each token, by sliding
    windows of the model's context_length with `stride` (see the module docstring).

    Args:
        seq: token ids, >= 2 (the first is only context, e.g. the end-of-text token).
        progress: optional callable given the number of tokens scored after each batch.
    """
    window = model.cfg.context_length
    n_targets = len(seq) - 1
    spans = windows(n_targets, window, stride)
    ids = torch.tensor(seq, dtype=torch.long)
    device = next(model.parameters()).device
    total, counted = 0.0, 0
    for i in range(0, len(spans), batch_size):
        chunk = spans[i:i + batch_size]
        T = max(end - begin for begin, end, _ in chunk)
        tokens = torch.zeros(len(chunk), T, dtype=torch.long)
        targets = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        for b, (begin, end, first) in enumerate(chunk):
            tokens[b, :end - begin] = ids[begin:end]
            keep = ids[begin + 1:end + 1].clone()
            keep[:first - begin] = IGNORE_INDEX  # already scored by an earlier window
            targets[b, :end - begin] = keep
        nll = token_nll(model(tokens.to(device)), targets.to(device))  # (B, T), 0 where ignored
        total += float(nll.double().sum())
        n = int((targets != IGNORE_INDEX).sum())
        counted += n
        if progress is not None:
            progress(n)
    assert counted == n_targets, (counted, n_targets)
    return total


def perplexity(model: torch.nn.Module, tokenizer, text: str, *, stride: int | None = None, batch_size: int = 8,
               progress: bool = False) -> dict[str, Any]:
    """Token-level perplexity and bits-per-byte of `text` under `model`.

    Args:
        model: a GPT in eval mode.
        tokenizer: its tokenizer (encode, eot_id).
        text: the text (non-empty).
        stride: tokens between window starts, 1..context_length (default: context_length // 2).
        batch_size: windows per forward pass.

    Returns:
        {"tokens", "bytes", "nll_sum" (nats), "perplexity", "bits_per_byte", "window", "stride", "windows",
        "elapsed_s", "tokens_per_s"}.

    Raises:
        GptforgeError: a stride out of range, or text the tokenizer cannot encode.
    """
    window = model.cfg.context_length
    stride = stride if stride is not None else max(window // 2, 1)
    if not 1 <= stride <= window:
        raise GptforgeError(f"--stride must be in 1..{window} (the context_length), got {stride}")
    started = time.perf_counter()
    seq = [tokenizer.eot_id] + tokenizer.encode(text)
    n_targets = len(seq) - 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_targets, desc="perplexity", unit="tok", leave=False, dynamic_ncols=True)
    try:
        total = rolling_nll(model, seq, stride=stride, batch_size=batch_size,
                            progress=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    n_bytes = len(text.encode("utf-8"))
    elapsed = time.perf_counter() - started
    return {"tokens": n_targets, "bytes": n_bytes, "nll_sum": total, "perplexity": math.exp(total / n_targets),
            "bits_per_byte": total / math.log(2) / n_bytes, "window": window, "stride": stride,
            "windows": len(windows(n_targets, window, stride)), "elapsed_s": elapsed,
            "tokens_per_s": n_targets / elapsed if elapsed else None}
