"""The step loop of `train.loop`: optimizer steps as a list of named phases (schedule, step, log, validate,
checkpoint, stop), with throughput/MFU metering and the progress bar. Knows nothing of where batches come from.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from gptforge.errors import GptforgeError
from gptforge.model.gpt import flops_per_token
from gptforge.train.guards import Interrupt, SpikeFilter
from gptforge.train.schedule import accum_steps_at, lr_at
from gptforge.train.step import StepStats, autocast_context, evaluate, train_step
from gptforge.utils.gpus import PeakFlops
from gptforge.utils.logging import print0
from gptforge.utils.metrics import mfu

if TYPE_CHECKING:  # loop.py imports this module
    from gptforge.train.loop import Run, TrainResult


class Throughput:
    """Tokens per second and MFU over the steps since the last logged one.

    MFU never exceeds 1: if the achieved rate beats the peak in use (a peak measured while the machine was busy),
    the peak is raised to the achieved rate and the log says so.
    """

    def __init__(self, fpt: float, peak: PeakFlops, world_size: int) -> None:
        self.fpt, self.peak, self.world_size = fpt, peak, world_size
        self.start = self.window_start = time.perf_counter()
        self.window_tokens = 0

    def record(self, step: int, stats: StepStats, lr: float, tokens_seen: int) -> dict:
        now = time.perf_counter()
        tokens_per_s = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        if self.peak.raise_to(self.fpt * tokens_per_s / self.world_size):
            print0(f"note: achieved {self.peak.flops / 1e9:.1f} GFLOP/s per rank, above the peak in use; the peak "
                   f"for MFU is now that ({self.peak.source})")
        record = {"step": step, "train_loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
                  "tokens_per_s": round(tokens_per_s, 1),
                  "mfu": round(mfu(self.fpt, tokens_per_s, self.peak.flops * self.world_size), 5),
                  "tokens_seen": tokens_seen, "elapsed_s": round(now - self.start, 2)}
        if len(stats.terms) > 1:
            record.update({f"train_{k}": v for k, v in stats.terms.items()})
        return record


def _announce(run: Run, full_accum: int, micro_seqs: int, fpt: float) -> PeakFlops:
    """Print the run's shape and return the peak FLOP/s for MFU (given, datasheet, cached or measured)."""
    t, info = run.cfg.train, run.info
    dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    peak = PeakFlops.given(t.peak_flops) if t.peak_flops else PeakFlops.for_device(info.device, dtype)
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    total = run.model.num_parameters()
    params = f"{total / 1e6:.2f}M parameters" + (f" ({trainable:,} trainable)" if trainable != total else "")
    batch = (f"{full_accum * micro_seqs * run.cfg.model.context_length} tokens" if run.task.fixed_shape
             else f"{full_accum * micro_seqs} sequences")
    print0(f"{run.task.name}: {params}, {fpt / 1e6:.1f} MFLOPs/token; device {info.device} x {info.world_size}; "
           f"batch {batch} ({full_accum} x {t.micro_batch_size} x {info.dp_size} ranks"
           f"{f', each {info.tensor_parallel} tensor-parallel' if info.tensor_parallel > 1 else ''}); "
           f"peak {peak.flops / 1e9:.1f} GFLOP/s ({peak.source})")
    return peak


def _optimizer_step(run: Run, step: int, *, full_accum: int, micro_seqs: int, autocast, spike: SpikeFilter
                    ) -> tuple[StepStats, float]:
    """Set the scheduled lr, draw the (ramped) number of micro-batches, and run one train_step."""
    cfg, info = run.cfg, run.info
    lr = lr_at(step, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
               decay_steps=cfg.optim.lr_decay_steps or cfg.train.max_steps, min_lr_ratio=cfg.optim.min_lr_ratio, schedule=cfg.optim.lr_schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    accum = full_accum
    if run.task.fixed_shape:
        micro_tokens = micro_seqs * cfg.model.context_length
        accum = accum_steps_at(run.tokens_seen, full_accum_steps=full_accum, micro_step_tokens=micro_tokens,
                               ramp_start_tokens=cfg.optim.batch_ramp_start_tokens,
                               ramp_tokens=cfg.optim.batch_ramp_tokens)
    batches = [run.task.train.next_batch().to(info.device) for _ in range(accum)]
    stats = train_step(run.train_model, run.optimizer, batches, grad_clip=cfg.optim.grad_clip,
                       objective=run.task.objective, autocast=autocast, scaler=run.scaler, dist_info=info, skip=spike)
    return stats, lr


def run_steps(run: Run, progress: bool, *, save: Callable[[Run, int, float], None]) -> TrainResult:
    """Optimizer steps with logging, evaluation, checkpoints, the non-finite stop and the time limit.

    Returns: a `train.loop.TrainResult`.
    """
    from gptforge.train.loop import TrainResult

    cfg, t, info = run.cfg, run.cfg.train, run.info
    full_accum = cfg.grad_accum_steps(info.dp_size)  # tensor-parallel ranks share their micro-batches
    fpt = flops_per_token(cfg.model)
    meter = Throughput(fpt, _announce(run, full_accum, t.micro_batch_size * info.dp_size, fpt), info.world_size)
    fsdp_mixed = info.distributed and t.data_parallel == "fsdp"
    autocast = lambda: autocast_context(info.device, t.dtype, fsdp_mixed=fsdp_mixed)  # noqa: E731
    # The bar only on a terminal: in a piped log it would interleave with the step lines.
    bar = tqdm(total=t.max_steps, initial=run.start_step, desc=run.task.name, unit="step", dynamic_ncols=True,
               disable=not (progress and info.is_main_process and sys.stderr.isatty()))
    log = bar.write if not bar.disable else print0
    run.train_model.train()
    with Interrupt(info) as interrupt:
        step, val, skipped = _steps(run, bar, log, meter, autocast, interrupt, full_accum, save)
    bar.close()
    return TrainResult(run_dir=run.run_dir, steps=step, tokens_seen=run.tokens_seen,
                       val_loss=val.get("val_loss", float("nan")), elapsed_s=time.perf_counter() - meter.start,
                       skipped_steps=skipped, val_metrics=val)


def _steps(run: Run, bar, log, meter: Throughput, autocast, interrupt: Interrupt, full_accum: int,
           save: Callable) -> tuple[int, dict, int]:
    """The step loop proper; returns (last step, last validation metrics, skipped steps)."""
    t, info = run.cfg.train, run.info
    spike = SpikeFilter(t.spike_zscore, t.spike_window)
    step, val, skipped_total, bad_streak = run.start_step, {}, 0, 0
    while step < t.max_steps:
        stats, lr = _optimizer_step(run, step, full_accum=full_accum, micro_seqs=t.micro_batch_size * info.dp_size,
                                    autocast=autocast, spike=spike)
        step += 1
        run.tokens_seen += stats.tokens
        run.targets_seen += stats.targets
        meter.window_tokens += stats.tokens
        skipped_total += stats.skipped is not None
        bad_streak = bad_streak + 1 if stats.skipped and stats.skipped.startswith("non-finite") else 0
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False, **({"val": f"{val['val_loss']:.4f}"} if val else {}))
        timed_out = t.max_time_s > 0 and time.perf_counter() - meter.start >= t.max_time_s
        last = step == t.max_steps or timed_out
        record: dict = {}
        if step % t.log_interval == 0 or last or stats.skipped:
            record = meter.record(step, stats, lr, run.tokens_seen)
            if run.task.log_stats is not None:
                record.update(run.task.log_stats())
        if stats.skipped:
            record.update(skipped=stats.skipped, skipped_total=skipped_total)
            log(f"step {step}: update skipped ({stats.skipped})")
        if bad_streak >= t.max_nonfinite_steps:
            if run.metrics:
                run.metrics.write(record)
            raise GptforgeError(f"stopping at step {step}: {bad_streak} steps in a row had a non-finite loss or "
                                f"gradient norm (train.max_nonfinite_steps={t.max_nonfinite_steps}); the weights were "
                                f"not updated by them; lower optim.lr or check the data, then --resume")
        if run.task.val_sets and (step % t.eval_interval == 0 or last):
            val = evaluate(run.train_model, run.task.val_sets, info.device, objective=run.task.objective,
                           autocast=autocast, dist_info=info)
            record = {"step": step, **record, **val}
            extra = "".join(f", {k} {v:.4f}" for k, v in val.items() if k != "val_loss")
            log(f"step {step}: train loss {stats.loss:.4f}, val loss {val['val_loss']:.4f}{extra}")
        if record and run.metrics:
            run.metrics.write(record)
        stop = interrupt.stop_now()
        if step % t.checkpoint_interval == 0 or last or stop:
            save(run, step, val.get("val_loss", float("nan")))
        if stop:
            log(f"interrupted at step {step}; checkpoint written")
            raise KeyboardInterrupt
        if timed_out:
            log(f"stopping at step {step}: train.max_time_s={t.max_time_s:g} reached")
            break
    return step, val, skipped_total
