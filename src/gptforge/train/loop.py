"""The pretraining loop: one optimizer step = gradient accumulation over micro-batches, then clip and AdamW.

Legend: B micro_batch_size (sequences), T context_length (tokens), V vocab_size, W world_size (ranks).
The loss of every micro-batch is a *sum* over its target tokens divided by the number of target tokens in
the whole optimizer step on all ranks, so accumulating k micro-batches on W ranks yields exactly the gradient
of one k*W-times larger batch (per-token normalisation, also when some targets are ignored). Resuming from a
checkpoint restores weights, optimizer, sampler and every RNG, so a resumed run is bitwise the run left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gptforge.checkpoint.io import (
    abandon_later_checkpoints,
    find_checkpoint,
    find_resume_checkpoint,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    load_torch_file,
    load_weights,
    read_json,
    save_checkpoint,
)
from gptforge.config import Config, config_from_dict, save_config
from gptforge.data.dataset import WindowSampler, open_split
from gptforge.data.prepare import load_meta
from gptforge.distributed.env import DistInfo, all_reduce_sum, barrier, init_distributed, teardown
from gptforge.distributed.parallelize import gradient_sync, parallelize
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT, IGNORE_INDEX, flops_per_token
from gptforge.tokenizer import load_tokenizer
from gptforge.train.guards import Interrupt, SpikeFilter
from gptforge.train.optim import build_optimizer
from gptforge.train.rng import capture_rng, restore_rng
from gptforge.train.schedule import accum_steps_at, lr_at
from gptforge.utils.device import resolve_device
from gptforge.utils.gpus import peak_flops_for
from gptforge.utils.io import atomic_write_text
from gptforge.utils.logging import MetricsWriter, print0
from gptforge.utils.metrics import mfu

Batch = tuple[torch.Tensor, torch.Tensor]
SINGLE = DistInfo()


@dataclass
class TrainResult:
    """What a finished run reports. Units: steps, tokens, nats per token, seconds."""

    run_dir: Path
    steps: int
    tokens_seen: int
    val_loss: float
    elapsed_s: float
    skipped_steps: int = 0


class StepStats(tuple):
    """(loss, grad_norm) of one optimizer step, plus `.skipped`: None, or why the update was not applied."""

    skipped: str | None

    def __new__(cls, loss: float, grad_norm: float, skipped: str | None = None):
        obj = super().__new__(cls, (loss, grad_norm))
        obj.skipped = skipped
        return obj

    loss = property(lambda self: self[0])
    grad_norm = property(lambda self: self[1])


def _compute_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """train.dtype resolved: `auto` means bf16 on CUDA with bf16 support, else fp32."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return getattr(torch, dtype)


def autocast_context(device: torch.device, dtype: str, *, fsdp_mixed: bool = False):
    """bf16/fp16 autocast with fp32 master weights (`dtype` as train.dtype). Under FSDP2 the low-precision compute
    comes from its MixedPrecisionPolicy instead (`fsdp_mixed`), so there is no autocast."""
    compute = _compute_dtype(device, dtype)
    if compute == torch.float32 or fsdp_mixed:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute)


def token_loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (float32 scalar, nats) over non-ignored targets of one (B, T) batch."""
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def compute_gradients(model: torch.nn.Module, batches: list[Batch], *, autocast=contextlib.nullcontext,
                      scaler: torch.amp.GradScaler | None = None, dist_info: DistInfo = SINGLE) -> float:
    """Backward over all micro-batches (gradients synchronised only on the last one).

    Returns: the step's mean loss per target token over all ranks (nats).
    """
    device, W = batches[0][0].device, dist_info.world_size
    n_targets = all_reduce_sum(torch.tensor(sum(int((y != IGNORE_INDEX).sum()) for _, y in batches),
                                            device=device, dtype=torch.float64), dist_info).item()
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        with gradient_sync(model, enabled=i == len(batches) - 1):
            with autocast():
                # x W because DDP/FSDP average gradients over ranks; the sum over ranks is what we want.
                loss = token_loss_sum(model, x, y) * (W / n_targets)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    return (all_reduce_sum(total, dist_info) / W).item()


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
               grad_clip: float, autocast=contextlib.nullcontext, scaler: torch.amp.GradScaler | None = None,
               dist_info: DistInfo = SINGLE, skip: Callable[[float], str | None] | None = None) -> StepStats:
    """Accumulate gradients over `batches` (on the model's device), clip, and step AdamW.

    The update is skipped (gradients dropped, weights untouched) when the loss or gradient norm is not
    finite, or when `skip(loss)` names a reason (the loss-spike filter).
    """
    loss = compute_gradients(model, batches, autocast=autocast, scaler=scaler, dist_info=dist_info)
    grad_norm = clip_gradients(model, optimizer, grad_clip, scaler)
    skipped = None
    if not math.isfinite(loss):
        skipped = "non-finite loss"
    elif not math.isfinite(grad_norm):
        skipped = "fp16 overflow" if scaler is not None else "non-finite gradient norm"
    elif skip is not None:
        skipped = skip(loss)
    if skipped is None:
        (scaler.step if scaler is not None else lambda o: o.step())(optimizer)
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss, grad_norm, skipped)


@torch.no_grad()
def evaluate(model: torch.nn.Module, sampler: WindowSampler, n_batches: int, device: torch.device,
             autocast=contextlib.nullcontext, dist_info: DistInfo = SINGLE) -> float:
    """Mean loss per token (nats) over `n_batches` windows per rank; the model is left in train mode."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for _ in range(n_batches):
        x, y = (t.to(device) for t in sampler.next_batch())
        with autocast():
            total[0] += token_loss_sum(model, x, y).double()
        total[1] += y.numel()
    model.train()
    total = all_reduce_sum(total, dist_info)
    return (total[0] / total[1]).item()


def _val_sampler(cfg: Config, val_tokens, info: DistInfo) -> WindowSampler:
    """The same validation windows at every evaluation (a fixed seed), so val losses compare across steps."""
    return WindowSampler(val_tokens, context_length=cfg.model.context_length, micro_batch_size=cfg.train.micro_batch_size,
                         seed=cfg.train.seed + 1, rank=info.rank, world_size=info.world_size, split="val")


def _init_model_config(init_from: str, meta: dict):
    """The model section of the checkpoint to start from; its vocabulary must match the data's tokenizer."""
    ckpt = find_checkpoint(init_from)
    model_cfg = config_from_dict(read_json(ckpt / "config.json")).model
    if model_cfg.vocab_size != meta["vocab_size"]:
        raise GptforgeError(f"train.init_from={init_from} has vocab_size {model_cfg.vocab_size} but the data was "
                            f"tokenized with vocab_size {meta['vocab_size']}; prepare the data with "
                            f"--tokenizer {ckpt} to reuse the model's tokenizer")
    return model_cfg


def _resume_model_config(cfg: Config, ckpt: Path):
    """The checkpoint's architecture; the run's config may not change it (vocab_size is data-derived)."""
    saved = config_from_dict(read_json(ckpt / "config.json")).model
    for f in dataclasses.fields(saved):
        mine, theirs = getattr(cfg.model, f.name), getattr(saved, f.name)
        if f.name != "vocab_size" and mine != theirs:
            raise GptforgeError(f"cannot resume: model.{f.name}={mine} but the checkpoint {ckpt} has {theirs} "
                                "(the architecture cannot change on resume)")
    return saved


@dataclass
class _Run:
    """Everything the loop needs, built once by `_build`."""

    cfg: Config
    info: DistInfo
    run_dir: Path
    model: GPT  # unwrapped: checkpoints read it
    train_model: torch.nn.Module  # compiled / DDP / FSDP view used for steps
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    tokenizer: object
    sampler: WindowSampler
    val_tokens: np.ndarray
    metrics: MetricsWriter | None = None
    start_step: int = 0
    tokens_seen: int = 0


def _build(cfg: Config, data_dir: Path, run_dir: Path, info: DistInfo, resume: str | None) -> _Run:
    """Data, model (fresh, `init_from`, or a checkpoint), parallel wrappers, optimizer, sampler, run directory."""
    t = cfg.train
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    meta, tokenizer = load_meta(data_dir), load_tokenizer(data_dir)
    if not resume and any((run_dir / "checkpoints").glob("step_*")):
        raise GptforgeError(f"{run_dir} already holds checkpoints of a run; pass --resume to continue it, or choose "
                            "a new --out (nothing was changed)")
    ckpt = find_resume_checkpoint(run_dir if resume == "latest" else resume) if resume else None
    if ckpt:
        cfg.model = _resume_model_config(cfg, ckpt)
    if t.init_from and not ckpt:
        cfg.model = _init_model_config(t.init_from, meta)
    elif cfg.model.vocab_size != meta["vocab_size"]:
        if ckpt:
            raise GptforgeError(f"cannot resume: the checkpoint's vocab_size is {cfg.model.vocab_size}, the data's "
                                f"{meta['vocab_size']} (resume with the data the run was started on)")
        print0(f"note: model.vocab_size set to {meta['vocab_size']} from the data's tokenizer "
               f"(config had {cfg.model.vocab_size})")
        cfg.model.vocab_size = meta["vocab_size"]
    model = GPT(cfg.model)
    if ckpt or t.init_from:
        source = ckpt or find_checkpoint(t.init_from)
        load_weights(model, source / "model.safetensors")
        print0(f"{'resuming' if ckpt else 'initialised'} from {source}")
    model = model.to(info.device)
    train_model = parallelize(model, info, data_parallel=t.data_parallel, compile=t.compile,
                              activation_checkpointing=t.activation_checkpointing,
                              param_dtype=_compute_dtype(info.device, t.dtype))
    sampler = WindowSampler(open_split(data_dir, "train", meta["dtype"]), context_length=cfg.model.context_length,
                            micro_batch_size=t.micro_batch_size, seed=t.seed, rank=info.rank,
                            world_size=info.world_size)
    run = _Run(cfg=cfg, info=info, run_dir=run_dir, model=model, train_model=train_model,
               optimizer=build_optimizer(model, cfg.optim, info.device.type),
               scaler=torch.amp.GradScaler(info.device.type) if t.dtype == "float16" else None,
               tokenizer=tokenizer, sampler=sampler, val_tokens=open_split(data_dir, "val", meta["dtype"]))
    if ckpt:
        _restore(run, ckpt)
    if info.is_main_process:
        run.metrics = MetricsWriter(run_dir / "metrics.jsonl", purge_step=run.start_step + 1 if ckpt else None)
    if info.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        tokenizer.save(run_dir)
    barrier(info)
    return run


def _restore(run: _Run, ckpt: Path) -> None:
    """Optimizer, scaler, sampler, RNG states and counters from `ckpt`; metrics.jsonl cut back to its step."""
    load_optimizer_state(run.model, run.optimizer, load_torch_file(ckpt / "optimizer.pt"))
    trainer = load_torch_file(ckpt / "trainer.pt")
    if len(trainer["rng"]) != run.info.world_size:
        print0(f"note: checkpoint was written by {len(trainer['rng'])} ranks, now {run.info.world_size}; "
               "the data order continues exactly, per-rank RNG streams restart from rank 0's")
    run.sampler.load_state_dict(trainer["sampler"])
    restore_rng(trainer["rng"][min(run.info.rank, len(trainer["rng"]) - 1)])
    if run.scaler is not None and trainer.get("scaler"):
        run.scaler.load_state_dict(trainer["scaler"])
    state = read_json(ckpt / "state.json")
    run.start_step, run.tokens_seen = state["step"], state["tokens_seen"]
    if run.info.is_main_process and ckpt.parent == run.run_dir / "checkpoints":
        for moved in abandon_later_checkpoints(run.run_dir, run.start_step):
            print0(f"note: moved checkpoint from after step {run.start_step} aside to {moved}")
    metrics = run.run_dir / "metrics.jsonl"
    if run.info.is_main_process and metrics.is_file():  # drop lines logged after the checkpoint
        keep = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                if line.strip() and _step_of(line) <= run.start_step]
        atomic_write_text(metrics, "".join(line + "\n" for line in keep))


def _step_of(line: str) -> int:
    import json

    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def _save(run: _Run, step: int, val_loss: float) -> None:
    """Write a consolidated checkpoint from rank 0 (state gathering is collective under FSDP)."""
    model_state = full_model_state(run.model)
    optimizer_state = full_optimizer_state(run.model, run.optimizer)
    rng = [capture_rng()]
    if run.info.distributed:
        rng = [None] * run.info.world_size
        torch.distributed.all_gather_object(rng, capture_rng())
    if run.info.is_main_process:
        trainer_state = {"sampler": run.sampler.state_dict(), "rng": rng,
                         "scaler": run.scaler.state_dict() if run.scaler is not None else {}}
        save_checkpoint(run.run_dir, step=step, model_state=model_state, cfg=run.cfg, tokenizer=run.tokenizer,
                        optimizer_state=optimizer_state, trainer_state=trainer_state,
                        state={"tokens_seen": run.tokens_seen, "val_loss": None if math.isnan(val_loss) else val_loss},
                        keep=run.cfg.train.keep_checkpoints)
    barrier(run.info)


def pretrain(cfg: Config, data_dir: str | Path, run_dir: str | Path, *, progress: bool = True,
             resume: str | None = None) -> TrainResult:
    """Train a GPT on prepared token files, writing checkpoints and metrics into `run_dir`.

    Runs as one process, or as one rank of a torchrun job (DDP or FSDP2 per `train.data_parallel`).
    `resume` is "latest" (the newest intact checkpoint in run_dir) or a checkpoint directory.

    Raises:
        GptforgeError: missing/corrupt data or checkpoint, a split shorter than one window, or too many
        non-finite steps in a row.
    """
    info = init_distributed(resolve_device(cfg.train.device))
    try:
        run = _build(cfg, Path(data_dir), Path(run_dir), info, resume)
        return _loop(run, progress)
    finally:
        teardown(info)


def _announce(run: _Run, full_accum: int, micro_tokens: int, fpt: float) -> float:
    """Print the run's shape and return the peak FLOP/s for MFU (given, datasheet, or measured)."""
    t, info = run.cfg.train, run.info
    peak, peak_source = (t.peak_flops, "given") if t.peak_flops else peak_flops_for(
        info.device, torch.bfloat16 if info.device.type == "cuda" else torch.float32)  # datasheet table, else measured
    print0(f"model: {run.model.num_parameters() / 1e6:.2f}M parameters, {fpt / 1e6:.1f} MFLOPs/token; device "
           f"{info.device} x {info.world_size}; batch {full_accum * micro_tokens} tokens ({full_accum} x "
           f"{t.micro_batch_size} x {run.cfg.model.context_length} x {info.world_size} ranks); peak "
           f"{peak / 1e9:.1f} GFLOP/s ({peak_source})")
    return peak


def _optimizer_step(run: _Run, step: int, *, full_accum: int, micro_tokens: int, autocast,
                    spike: SpikeFilter) -> tuple[StepStats, float, int]:
    """Set the scheduled lr, draw the (ramped) number of micro-batches, and run one train_step.

    Returns: (step stats, lr used, tokens consumed by all ranks).
    """
    cfg, info = run.cfg, run.info
    lr = lr_at(step, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
               decay_steps=cfg.optim.lr_decay_steps or cfg.train.max_steps, min_lr_ratio=cfg.optim.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    accum = accum_steps_at(run.tokens_seen, full_accum_steps=full_accum, micro_step_tokens=micro_tokens,
                           ramp_start_tokens=cfg.optim.batch_ramp_start_tokens, ramp_tokens=cfg.optim.batch_ramp_tokens)
    batches = [tuple(x.to(info.device, non_blocking=True) for x in run.sampler.next_batch()) for _ in range(accum)]
    stats = train_step(run.train_model, run.optimizer, batches, grad_clip=cfg.optim.grad_clip, autocast=autocast,
                       scaler=run.scaler, dist_info=info, skip=spike)
    return stats, lr, accum * micro_tokens


class _Throughput:
    """Tokens per second and MFU over the steps since the last logged one."""

    def __init__(self, fpt: float, peak: float) -> None:
        self.fpt, self.peak = fpt, peak
        self.start = self.window_start = time.perf_counter()
        self.window_tokens = 0

    def record(self, step: int, stats: StepStats, lr: float, tokens_seen: int) -> dict:
        now = time.perf_counter()
        tokens_per_s = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        return {"step": step, "train_loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
                "tokens_per_s": round(tokens_per_s, 1), "mfu": round(mfu(self.fpt, tokens_per_s, self.peak), 5),
                "tokens_seen": tokens_seen, "elapsed_s": round(now - self.start, 2)}


def _loop(run: _Run, progress: bool) -> TrainResult:
    """Optimizer steps with logging, evaluation, checkpoints, the non-finite stop and the time limit."""
    cfg, t, info = run.cfg, run.cfg.train, run.info
    full_accum = cfg.grad_accum_steps(info.world_size)
    micro_tokens = t.micro_batch_size * cfg.model.context_length * info.world_size  # all ranks
    fpt = flops_per_token(cfg.model)
    meter = _Throughput(fpt, _announce(run, full_accum, micro_tokens, fpt) * info.world_size)
    fsdp_mixed = info.distributed and t.data_parallel == "fsdp"
    autocast = lambda: autocast_context(info.device, t.dtype, fsdp_mixed=fsdp_mixed)  # noqa: E731
    val_ok = len(run.val_tokens) > cfg.model.context_length
    if not val_ok:
        print0(f"warning: the validation split has {len(run.val_tokens)} tokens, fewer than context_length + 1 = "
               f"{cfg.model.context_length + 1}; no val loss will be computed (prepare with a larger --val_fraction)")
    spike = SpikeFilter(t.spike_zscore, t.spike_window)
    bar = tqdm(total=t.max_steps, initial=run.start_step, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not (progress and info.is_main_process))
    run.train_model.train()
    with Interrupt(info) as interrupt:
        step, val_loss, skipped_total = _steps(run, bar, meter, autocast, spike, val_ok, interrupt, full_accum,
                                               micro_tokens)
    bar.close()
    return TrainResult(run_dir=run.run_dir, steps=step, tokens_seen=run.tokens_seen, val_loss=val_loss,
                       elapsed_s=time.perf_counter() - meter.start, skipped_steps=skipped_total)


def _steps(run: _Run, bar, meter: _Throughput, autocast, spike: SpikeFilter, val_ok: bool, interrupt: Interrupt,
           full_accum: int, micro_tokens: int) -> tuple[int, float, int]:
    """The step loop proper; returns (last step, last val loss, skipped steps)."""
    cfg, t, info = run.cfg, run.cfg.train, run.info
    step, val_loss, skipped_total, bad_streak = run.start_step, float("nan"), 0, 0
    while step < t.max_steps:
        stats, lr, step_tokens = _optimizer_step(run, step, full_accum=full_accum, micro_tokens=micro_tokens,
                                                 autocast=autocast, spike=spike)
        step += 1
        run.tokens_seen += step_tokens
        meter.window_tokens += step_tokens
        skipped_total += stats.skipped is not None
        bad_streak = bad_streak + 1 if stats.skipped and stats.skipped.startswith("non-finite") else 0
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.4f}", val=f"{val_loss:.4f}", refresh=False)
        timed_out = t.max_time_s > 0 and time.perf_counter() - meter.start >= t.max_time_s
        last = step == t.max_steps or timed_out
        record: dict = {}
        if step % t.log_interval == 0 or last or stats.skipped:
            record = meter.record(step, stats, lr, run.tokens_seen)
        if stats.skipped:
            record.update(skipped=stats.skipped, skipped_total=skipped_total)
            print0(f"step {step}: update skipped ({stats.skipped})")
        if bad_streak >= t.max_nonfinite_steps:
            if run.metrics:
                run.metrics.write(record)
            raise GptforgeError(f"stopping at step {step}: {bad_streak} steps in a row had a non-finite loss or "
                                f"gradient norm (train.max_nonfinite_steps={t.max_nonfinite_steps}); the weights were "
                                f"not updated by them; lower optim.lr or check the data, then --resume")
        if val_ok and (step % t.eval_interval == 0 or last):
            val_loss = evaluate(run.train_model, _val_sampler(cfg, run.val_tokens, info), t.eval_steps, info.device,
                                autocast, info)
            record = {"step": step, **record, "val_loss": val_loss}
            print0(f"step {step}: train loss {stats.loss:.4f}, val loss {val_loss:.4f}")
        if record and run.metrics:
            run.metrics.write(record)
        stop = interrupt.stop_now()
        if step % t.checkpoint_interval == 0 or last or stop:
            _save(run, step, val_loss)
        if stop:
            print0(f"interrupted at step {step}; checkpoint written")
            raise KeyboardInterrupt
        if timed_out:
            print0(f"stopping at step {step}: train.max_time_s={t.max_time_s:g} reached")
            break
    return step, val_loss, skipped_total
