"""Turning next-token logits into tokens: repetition penalty, temperature, top-k, top-p, then a draw.

Legend: B batch rows, V vocab_size. All functions take and return logits (B, V) float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gptforge.errors import GptforgeError


@dataclass
class SamplingParams:
    """How to generate. `temperature` 0 means greedy; `top_k` 0 means off (a k above V is clamped to V);
    `top_p` 1.0 means off (the most likely token is always kept); `repetition_penalty` 1.0 means off
    (Keskar et al. 2019: a seen token's positive logit is divided by it, a negative one multiplied);
    `stop` strings end a row (the stop text itself is not returned); `seed` makes samples reproducible."""

    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        finite = all(math.isfinite(v) for v in (self.temperature, self.top_p, self.repetition_penalty))
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "max_new_tokens", "an integer >= 0"),
            (finite and self.temperature >= 0, "temperature", "a number >= 0 (0 means greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0 (0 means off)"),
            (finite and 0 < self.top_p <= 1, "top_p", "in (0, 1] (1 means off)"),
            (finite and self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 means off)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty text"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed",
             "an integer in [0, 2**63)"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise GptforgeError(f"{name} must be {allowed}, got {getattr(self, name)!r}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens already in the row's context. `seen` (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept), set the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose probability
    reaches p; the most likely token is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, *, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the next token of every row: logits (B, V) -> tokens (B,) int64."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
