"""Training objectives: what a batch's loss is, as sums and the counts that normalise them.

An objective has named loss *terms* (e.g. "lm" for next-token cross-entropy, "cls" for a classifier's
cross-entropy) with weights. For each term it computes, per micro-batch, a float32 `sum` of per-unit losses
(`loss_sums`, which runs the model) and a `count` of units (`counts`, from the data alone: scored targets,
examples). The loop all-reduces the counts of a whole optimizer step first and then back-propagates
`sum(weight * term_sum / term_count)`, so gradient accumulation over micro-batches and ranks gives exactly the
gradient of one large batch, whatever the padding and masking. Evaluation uses the same two methods.

The model is always called through `model(...)` (its forward), never another method, so DDP's and FSDP's
hooks see every use of the parameters.
"""

from __future__ import annotations

from typing import Protocol

import torch

from gptforge.data.batches import Batch
from gptforge.model.loss import loss_sum, token_nll


class Objective(Protocol):
    """Loss terms with weights; `main` names the term reported as the run's loss and validation loss."""

    weights: dict[str, float]
    main: str

    def counts(self, batch: Batch) -> dict[str, int]:
        """Units each term is averaged over, from the data alone (no forward pass)."""
        ...

    def loss_sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Float32 scalar sums of per-unit losses for each term (runs the model; differentiable)."""
        ...

    def eval_sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, tuple[float, int]]:
        """(sum, count) for each reported validation metric, e.g. losses and numbers of correct predictions."""
        ...


class LanguageModeling:
    """Next-token cross-entropy over the scored targets (pretraining, and SFT with its prompt mask)."""

    weights = {"lm": 1.0}
    main = "lm"

    def counts(self, batch: Batch) -> dict[str, int]:
        return {"lm": batch.n_targets}

    def loss_sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return {"lm": loss_sum(model(batch.tokens), batch.targets)}

    def eval_sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, tuple[float, int]]:
        # Per-token losses summed in float64: the total does not depend on how windows are grouped into batches.
        return {"lm": (token_nll(model(batch.tokens), batch.targets).double().sum().item(), batch.n_targets)}


def total_loss(sums: dict[str, torch.Tensor], counts: dict[str, float], weights: dict[str, float],
               scale: float = 1.0) -> torch.Tensor:
    """sum over terms of weight * term_sum / term_count * scale (a term with no units contributes 0)."""
    parts = [weights[k] * sums[k] * (scale / counts[k]) for k in weights if counts.get(k, 0) > 0]
    return torch.stack(parts).sum() if parts else next(iter(sums.values())) * 0.0
