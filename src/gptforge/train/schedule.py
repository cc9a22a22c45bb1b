"""Learning-rate and batch-size schedules (GPT-3 paper, Appendix B). Pure functions of the step or tokens."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup_steps: int, decay_steps: int, min_lr_ratio: float,
          schedule: str = "cosine") -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup to `lr` over `warmup_steps` (step 0 gets lr / warmup_steps, step warmup_steps - 1 gets lr),
    then a cosine from `lr` to `min_lr_ratio * lr` reached at `decay_steps`, then constant
    (Appendix B: "cosine decay for learning rate down to 10% of its value ... after that training continues
    at 10% of the original learning rate"). `schedule` "linear" decays along a straight line instead (GPT-1's
    fine-tuning: "linear learning rate decay schedule with warmup over 0.2% of training", Radford et al. 2018,
    section 4.1, with min_lr_ratio 0).
    """
    min_lr = lr * min_lr_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    if schedule == "linear":
        return lr - progress * (lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def accum_steps_at(tokens_seen: int, *, full_accum_steps: int, micro_step_tokens: int,
                   ramp_start_tokens: int, ramp_tokens: int) -> int:
    """Micro-steps for the next optimizer step under the batch-size ramp (Appendix B).

    The batch grows linearly in tokens from `ramp_start_tokens` to the full batch
    (`full_accum_steps * micro_step_tokens`) over the first `ramp_tokens` training tokens; it is rounded
    down to whole micro-steps (at least one). `ramp_tokens == 0` disables the ramp.
    """
    if ramp_tokens <= 0 or tokens_seen >= ramp_tokens:
        return full_accum_steps
    full_tokens = full_accum_steps * micro_step_tokens
    batch_tokens = ramp_start_tokens + (full_tokens - ramp_start_tokens) * tokens_seen / ramp_tokens
    return max(1, min(full_accum_steps, int(batch_tokens // micro_step_tokens)))
