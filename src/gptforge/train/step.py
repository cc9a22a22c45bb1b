"""One optimizer step (gradient accumulation, clipping, AdamW) and validation, for any objective.

Legend: W world_size (ranks). The step's loss terms are normalised by unit counts summed over all micro-batches
of the step on all ranks (see `train/objectives.py`), so accumulating k micro-batches on W ranks yields exactly
the gradient of one k*W-times larger batch, also when some targets are ignored or rows are padded.
Nothing here knows where batches come from or writes files.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptforge.data.batches import Batch, ValSet
from gptforge.distributed.env import DistInfo, all_reduce_sum
from gptforge.distributed.parallelize import gradient_sync
from gptforge.train.objectives import LanguageModeling, Objective, total_loss

SINGLE = DistInfo()
LM = LanguageModeling()


@dataclass
class StepStats:
    """One optimizer step. Units: nats per unit of each term (tokens for "lm", examples for "cls").

    Attributes:
        loss: weighted total loss of the step (over all ranks).
        grad_norm: global gradient norm before clipping.
        skipped: None, or why the update was not applied.
        terms: the mean of each loss term.
        tokens: real (non-padding) input tokens of the step on all ranks.
        targets: scored next-token targets of the step on all ranks.
    """

    loss: float
    grad_norm: float = float("nan")
    skipped: str | None = None
    terms: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    targets: int = 0


def compute_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """train.dtype resolved: `auto` means bf16 on CUDA with bf16 support, else fp32."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return getattr(torch, dtype)


def autocast_context(device: torch.device, dtype: str, *, fsdp_mixed: bool = False):
    """bf16/fp16 autocast with fp32 master weights (`dtype` as train.dtype). Under FSDP2 the low-precision compute
    comes from its MixedPrecisionPolicy instead (`fsdp_mixed`), so there is no autocast."""
    compute = compute_dtype(device, dtype)
    if compute == torch.float32 or fsdp_mixed:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute)


def _step_counts(objective: Objective, batches: list[Batch], device: torch.device,
                 dist_info: DistInfo) -> tuple[dict[str, float], int, int]:
    """Per-term unit counts, real tokens and scored targets of the whole step on all ranks (one all-reduce)."""
    names = list(objective.weights)
    local = [sum(objective.counts(b)[k] for b in batches) for k in names]
    local += [sum(b.n_tokens for b in batches), sum(b.n_targets for b in batches)]
    total = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=device), dist_info).tolist()
    # tensor-parallel ranks hold the same rows: count each row once (the unit counts keep the replicas, which
    # cancels against the loss scale W below)
    replicas = dist_info.tensor_parallel
    return dict(zip(names, total[:-2])), int(total[-2]) // replicas, int(total[-1]) // replicas


def compute_gradients(model: torch.nn.Module, batches: list[Batch], *, objective: Objective = LM,
                      autocast=contextlib.nullcontext, scaler: torch.amp.GradScaler | None = None,
                      dist_info: DistInfo = SINGLE) -> StepStats:
    """Backward over all micro-batches of one step (gradients synchronised only on the last one).

    Args:
        batches: this rank's micro-batches, on the model's device.

    Returns:
        StepStats with `loss`, `terms`, `tokens` and `targets` filled in (over all ranks).
    """
    device, W = batches[0].tokens.device, dist_info.world_size
    counts, n_tokens, n_targets = _step_counts(objective, batches, device, dist_info)
    names = list(objective.weights)
    sums = torch.zeros(len(names) + 1, device=device)
    for i, batch in enumerate(batches):
        with gradient_sync(model, enabled=i == len(batches) - 1):
            with autocast():
                parts = objective.loss_sums(model, batch)
                # x W because DDP/FSDP average gradients over ranks; the sum over ranks is what we want.
                loss = total_loss(parts, counts, objective.weights, scale=W)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        sums += torch.stack([parts[k].detach().float() for k in names] + [loss.detach().float()])
    sums = all_reduce_sum(sums, dist_info).tolist()
    terms = {k: sums[j] / counts[k] if counts[k] else float("nan") for j, k in enumerate(names)}
    return StepStats(loss=sums[-1] / W, terms=terms, tokens=n_tokens, targets=n_targets)


def clip_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                   scaler: torch.amp.GradScaler | None = None) -> float:
    """Clip the global gradient norm to `grad_clip` (0: no clipping); return the norm before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm.item()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], *,
               grad_clip: float, objective: Objective = LM, autocast=contextlib.nullcontext,
               scaler: torch.amp.GradScaler | None = None, dist_info: DistInfo = SINGLE,
               skip: Callable[[float], str | None] | None = None) -> StepStats:
    """Accumulate gradients over `batches` (on the model's device), clip, and step AdamW.

    The update is skipped (gradients dropped, weights untouched) when the loss or gradient norm is not
    finite, or when `skip(loss)` names a reason (the loss-spike filter).
    """
    stats = compute_gradients(model, batches, objective=objective, autocast=autocast, scaler=scaler,
                              dist_info=dist_info)
    stats.grad_norm = clip_gradients(model, optimizer, grad_clip, scaler)
    if not math.isfinite(stats.loss):
        stats.skipped = "non-finite loss"
    elif not math.isfinite(stats.grad_norm):
        stats.skipped = "fp16 overflow" if scaler is not None else "non-finite gradient norm"
    elif skip is not None:
        stats.skipped = skip(stats.loss)
    if stats.skipped is None:
        (scaler.step if scaler is not None else lambda o: o.step())(optimizer)
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return stats


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_sets: dict[str, ValSet], device: torch.device, *,
             objective: Objective = LM, autocast=contextlib.nullcontext,
             dist_info: DistInfo = SINGLE) -> dict[str, float]:
    """Score every validation set; the model is left in train mode.

    Returns:
        `val_loss` (the main term's mean over all sets together, per unit) and `val_<metric>` for the objective's
        other metrics; with several sets also `val_loss/<set>` and `val_<metric>/<set>` for each. Sums and counts
        are added over all ranks, so the values do not depend on the micro-batch size or world size. An objective
        with a `finalize(metrics) -> metrics` method rewrites the result last (e.g. per-class counts to macro-F1).
    """
    model.eval()
    per_set: dict[str, dict[str, list[float]]] = {}
    for name, val_set in val_sets.items():
        acc: dict[str, list[float]] = {}
        for batch in val_set():
            with autocast():
                for metric, (s, c) in objective.eval_sums(model, batch.to(device)).items():
                    acc.setdefault(metric, [0.0, 0.0])
                    acc[metric][0] += s
                    acc[metric][1] += c
        per_set[name] = acc
    model.train()
    keys = [(n, m) for n in per_set for m in per_set[n]]
    flat = torch.tensor([v for n, m in keys for v in per_set[n][m]], dtype=torch.float64, device=device)
    flat = all_reduce_sum(flat, dist_info).tolist()
    totals = {key: (flat[2 * i], flat[2 * i + 1]) for i, key in enumerate(keys)}
    out: dict[str, float] = {}
    for metric in dict.fromkeys(m for _, m in keys):
        name = "val_loss" if metric == objective.main else f"val_{metric}"
        parts = [totals[(n, m)] for n, m in keys if m == metric]
        s, c = sum(p[0] for p in parts), sum(p[1] for p in parts)
        out[name] = s / c if c else float("nan")
        if len(per_set) > 1:
            for n, m in keys:
                if m == metric:
                    out[f"{name}/{n}"] = totals[(n, m)][0] / totals[(n, m)][1] if totals[(n, m)][1] else float("nan")
    finalize = getattr(objective, "finalize", None)  # metrics that are not ratios of sums (macro-F1)
    return finalize(out) if finalize is not None else out
