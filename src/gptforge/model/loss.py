"""Next-token losses and log-likelihoods: the one place both training and evaluation score tokens.

Legend: B batch rows, T positions, V vocab_size. Targets equal to IGNORE_INDEX (-100) are not scored (padding,
masked prompt tokens, positions without a next token). Everything is computed in float32 whatever the logits'
dtype, so bf16 training and fp32 evaluation score the same way. This module knows nothing of models or data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of the targets.

    Args:
        logits: (B, T, V) any float dtype.
        targets: (B, T) int64 token ids, IGNORE_INDEX where nothing is scored.

    Returns:
        (B, T) float32, nats; exactly 0 at ignored positions.
    """
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.float().reshape(B * T, V), targets.reshape(B * T), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return nll.view(B, T)


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the next-token cross-entropies over non-ignored targets: float32 scalar, nats.

    Training divides it by the number of scored targets of the whole optimizer step (see `train.objectives`),
    evaluation by the number of scored targets of the whole validation set.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def count_targets(targets: torch.Tensor) -> int:
    """How many positions of `targets` (any shape, int64) are scored (not IGNORE_INDEX)."""
    return int((targets != IGNORE_INDEX).sum())


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and whether it is the greedy (arg-max) choice.

    Args:
        logits: (B, T, V) any float dtype.
        targets: (B, T) int64; IGNORE_INDEX positions get log-probability 0 and greedy True.

    Returns:
        (logprobs (B, T) float32 in nats, is_greedy (B, T) bool). Ties count as greedy when the target's logit
        equals the maximum.
    """
    logits = logits.float()
    scored = targets != IGNORE_INDEX
    safe = targets.clamp_min(0)[..., None]  # (B, T, 1)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, safe).squeeze(-1)  # (B, T)
    is_greedy = logits.gather(-1, safe).squeeze(-1) >= logits.amax(dim=-1)
    return logprobs.masked_fill(~scored, 0.0), is_greedy | ~scored


def continuation_scores(logits: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor,
                        n_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Total log-likelihood of each continuation and whether all of its tokens are greedy.

    The scored positions of many continuations arrive flattened; `segments` says which continuation each
    belongs to (evaluation packs the continuations of several items into one forward pass).

    Args:
        logits: (N, V) any float dtype, the logits at the N positions that predict a continuation token.
        targets: (N,) int64, the continuation tokens those positions predict.
        segments: (N,) int64 in [0, n_segments), the continuation each position belongs to.
        n_segments: the number of continuations S.

    Returns:
        (logprob_sum (S,) float64 in nats, all_greedy (S,) bool); a continuation with no positions gets 0 and
        True.
    """
    logprobs, is_greedy = target_logprobs(logits[None], targets[None])  # (1, N) each
    total = torch.zeros(n_segments, dtype=torch.float64, device=logits.device)
    total.index_add_(0, segments, logprobs[0].double())
    misses = torch.zeros(n_segments, dtype=torch.int64, device=logits.device)
    misses.index_add_(0, segments, (~is_greedy[0]).long())
    return total, misses == 0
