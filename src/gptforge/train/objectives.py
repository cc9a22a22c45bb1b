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
import torch.nn.functional as F

from gptforge.data.batches import Batch
from gptforge.model.loss import IGNORE_INDEX, loss_sum, token_nll


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


class Classification:
    """GPT-1's fine-tuning objective (Radford et al. 2018, section 3.2, eq. 5): L3 = L2 + lm_weight * L1.

    "cls" is the cross-entropy of the `score` head's class logits on the last real token of each example (unit:
    examples); "lm" (only with `lm_weight > 0`) the auxiliary next-token loss on the example text (unit: scored
    targets). Both come from one forward pass (`head="both"`). Validation reports the classification loss
    (`val_loss`), `val_accuracy` and `val_macro_f1` (the unweighted mean over classes of per-class F1; a class
    absent from both the predictions and the labels is left out of the mean).
    """

    main = "cls"

    def __init__(self, n_labels: int, lm_weight: float = 0.0) -> None:
        self.n_labels, self.lm_weight = n_labels, lm_weight
        self.weights = {"cls": 1.0, **({"lm": lm_weight} if lm_weight > 0 else {})}

    def counts(self, batch: Batch) -> dict[str, int]:
        return {"cls": batch.n_rows, **({"lm": batch.n_targets} if self.lm_weight > 0 else {})}

    def _forward(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.lm_weight > 0:
            return model(batch.tokens, head="both", lengths=batch.lengths)
        return None, model(batch.tokens, head="classify", lengths=batch.lengths)

    def loss_sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        lm_logits, classes = self._forward(model, batch)
        sums = {"cls": F.cross_entropy(classes.float(), batch.labels, reduction="sum")}
        if lm_logits is not None:
            sums["lm"] = loss_sum(lm_logits, batch.targets)
        return sums

    def eval_sums(self, model: torch.nn.Module, batch: Batch) -> dict[str, tuple[float, int]]:
        # Padding rows of a short last batch carry label IGNORE_INDEX and are left out of every metric.
        classes = model(batch.tokens, head="classify", lengths=batch.lengths).float()  # (B, K)
        real = batch.labels != IGNORE_INDEX
        labels, predicted = batch.labels[real], classes[real].argmax(-1)
        n = int(real.sum())
        out = {"cls": (F.cross_entropy(classes[real], labels, reduction="sum").item() if n else 0.0, n),
               "accuracy": (float((predicted == labels).sum()), n)}
        # Per-class TP/FP/FN as fractions of the examples: F1 = 2TP / (2TP + FP + FN) does not depend on the
        # shared denominator, so `finalize` can compute it after the sums are added over batches and ranks.
        for k in range(self.n_labels):
            out[f"tp_{k}"] = (float(((predicted == k) & (labels == k)).sum()), n)
            out[f"fp_{k}"] = (float(((predicted == k) & (labels != k)).sum()), n)
            out[f"fn_{k}"] = (float(((predicted != k) & (labels == k)).sum()), n)
        return out

    def finalize(self, metrics: dict[str, float]) -> dict[str, float]:
        """Replace the per-class TP/FP/FN entries of `evaluate`'s output by `val_macro_f1` (per set too)."""
        out = {k: v for k, v in metrics.items() if not k.startswith(("val_tp_", "val_fp_", "val_fn_"))}
        suffixes = {k.partition("/")[2] for k in metrics if k.startswith("val_tp_")}
        for suffix in suffixes:
            tail = f"/{suffix}" if suffix else ""
            f1s = []
            for k in range(self.n_labels):
                tp, fp, fn = (metrics.get(f"val_{m}_{k}{tail}", 0.0) for m in ("tp", "fp", "fn"))
                if tp + fp + fn > 0:
                    f1s.append(2 * tp / (2 * tp + fp + fn))
            out[f"val_macro_f1{tail}"] = sum(f1s) / len(f1s) if f1s else float("nan")
        return out
