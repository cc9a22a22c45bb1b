"""Turning next-token logits into tokens: penalties, temperature, top-k, top-p, then a draw.

Legend: B batch rows, V vocab_size. All functions take and return logits (B, V) float32. Every row may have its
own parameters (the engine batches requests that asked for different things); a knob given as a float applies to
all rows, as a (B,) tensor to each row. Numerics: temperature divides logits *after* subtracting each row's
maximum, so the best token's scaled logit is exactly 0 and a temperature that underflows (1e-38, or one too
small for float32) gives -inf to every other token: the draw becomes greedy instead of producing NaN. A draw
is one uniform number per row pushed through the row's cumulative distribution (inverse transform sampling),
so each request consumes exactly one number of its own generator per token, whatever else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gptforge.errors import GptforgeError

_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32; smaller temperatures are clamped to it


@dataclass
class SamplingParams:
    """How to generate. `temperature` 0 means greedy; `top_k` 0 means off (a k above V is clamped to V);
    `top_p` 1.0 means off (the most likely token is always kept); `repetition_penalty` 1.0 means off
    (Keskar et al. 2019: a seen token's positive logit is divided by it, a negative one multiplied; "seen"
    covers the prompt and the output); `presence_penalty` and `frequency_penalty` 0 mean off (OpenAI API: a
    generated token's logit drops by presence_penalty once and by frequency_penalty per occurrence, range
    [-2, 2]); `stop` strings end a row (the stop text itself is not returned); `seed` makes samples
    reproducible."""

    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        numbers = (self.temperature, self.top_p, self.repetition_penalty, self.presence_penalty,
                   self.frequency_penalty)
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers)
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "max_new_tokens", "an integer >= 0"),
            (finite and self.temperature >= 0, "temperature", "a number >= 0 (0 means greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0 (0 means off)"),
            (finite and 0 < self.top_p <= 1, "top_p", "in (0, 1] (1 means off)"),
            (finite and self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 means off)"),
            (finite and -2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2] (0 means off)"),
            (finite and -2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2] (0 means off)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty text"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed",
             "an integer in [0, 2**63)"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise GptforgeError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_seen(self) -> bool:
        """Whether sampling needs the set of tokens seen so far (prompt and output)."""
        return self.repetition_penalty != 1.0

    @property
    def uses_counts(self) -> bool:
        """Whether sampling needs how often each token was generated."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _per_row(value: float | torch.Tensor, logits: torch.Tensor) -> float | torch.Tensor:
    """A float stays a float; a (B,) tensor becomes (B, 1) on the logits' device."""
    return value.to(logits.device, logits.dtype)[:, None] if isinstance(value, torch.Tensor) else value


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor
                             ) -> torch.Tensor:
    """Penalise tokens already in the row's context. `seen` (B, V) bool; `penalty` > 0, 1 means off."""
    if not isinstance(penalty, torch.Tensor) and penalty == 1.0:
        return logits
    penalty = _per_row(penalty, logits)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float | torch.Tensor,
                             frequency: float | torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: logits - presence * (count > 0) - frequency * count. `counts` (B, V) float32, how
    often each token was generated so far in the row."""
    presence, frequency = _per_row(presence, logits), _per_row(frequency, logits)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def filter_top_k(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept), set the rest to -inf. `k` 0 (or a
    k >= V) means off."""
    V = logits.shape[-1]
    if not isinstance(k, torch.Tensor):
        if k <= 0 or k >= V:
            return logits
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
        return logits.masked_fill(logits < kth, float("-inf"))
    k = k.to(logits.device)
    k = torch.where((k <= 0) | (k >= V), torch.full_like(k, V), k)
    kth = torch.sort(logits, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose probability
    reaches p; the most likely token is always kept; p 1 means off."""
    if not isinstance(p, torch.Tensor):
        if p >= 1.0:
            return logits
    else:  # rows that switched the filter off keep every token (cumulative sums may round past 1)
        p = torch.where(p >= 1.0, torch.full_like(p, float("inf")), p).to(logits.device, logits.dtype)[:, None]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def scale_by_temperature(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """(logits - row max) / temperature, with temperatures clamped to the smallest normal float32, so the best
    token scores exactly 0 and nothing is NaN (ties at the maximum all score 0)."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    if isinstance(temperature, torch.Tensor):
        return shifted / temperature.to(logits.device, logits.dtype).clamp_min(_TINY)[:, None]
    return shifted / max(temperature, _TINY)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse transform sampling: probs (B, V) (need not sum to 1), uniforms (B,) in [0, 1) -> tokens (B,)
    int64. A token of probability 0 is never drawn."""
    # float64: 50k float32 additions would round visibly (MPS has no float64: its rows are drawn on the CPU)
    cdf = (probs.cpu() if probs.device.type == "mps" else probs).double().cumsum(dim=-1)
    target = uniforms.to(cdf.device, torch.float64) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)
    return tokens.to(probs.device)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor, *,
                seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Choose the next token of every row, each with its own parameters.

    Args:
        logits: (B, V) next-token logits, any float dtype.
        params: B sampling parameters, one per row.
        uniforms: (B,) float in [0, 1), one draw per row (ignored for greedy rows).
        seen: (B, V) bool, tokens in each row's prompt and output (needed when a row has a repetition penalty).
        counts: (B, V) float32, each row's generated-token counts (needed for presence/frequency penalties).

    Returns:
        (B,) int64 token ids.
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, torch.tensor([p.repetition_penalty for p in params]))
    if counts is not None:
        logits = apply_presence_frequency(logits, counts, torch.tensor([p.presence_penalty for p in params]),
                                          torch.tensor([p.frequency_penalty for p in params]))
    greedy = [p.greedy for p in params]
    if all(greedy):
        return logits.argmax(dim=-1)
    scaled = scale_by_temperature(logits, torch.tensor([p.temperature or 1.0 for p in params]))
    if any(0 < p.top_k < logits.shape[-1] for p in params):
        scaled = filter_top_k(scaled, torch.tensor([p.top_k for p in params]))
    if any(p.top_p < 1.0 for p in params):
        scaled = filter_top_p(scaled, torch.tensor([p.top_p for p in params]))
    tokens = draw(torch.softmax(scaled, dim=-1), uniforms)
    if any(greedy):
        tokens = torch.where(torch.tensor(greedy, device=tokens.device), logits.argmax(dim=-1), tokens)
    return tokens


def sample_next(logits: torch.Tensor, params: SamplingParams, *, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the next token of every row with the same parameters: logits (B, V) -> tokens (B,) int64.
    `generator` (on the CPU) supplies the rows' uniform draws, in row order."""
    uniforms = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64)
    return sample_rows(logits, [params] * logits.shape[0], uniforms, seen=seen if params.uses_seen else None)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's own log-probabilities (before penalties and temperature) of chosen tokens.

    Args:
        logits: (B, V) any float dtype.
        tokens: (B,) int64, the chosen token of each row.
        top_n: how many of the most likely tokens to return as well (0..V).

    Returns:
        (chosen (B,) float32 nats, top_ids (B, top_n) int64, top_logprobs (B, top_n) float32), top ones in
        decreasing order.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, top_n, dim=-1) if top_n else None
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    if top is None:
        empty = torch.empty(logits.shape[0], 0)
        return chosen, empty.long(), empty
    return chosen, top.indices, top.values
