"""The pretraining loop: one optimizer step = gradient accumulation over micro-batches, then clip and AdamW.

Legend: B micro_batch_size (sequences), T context_length (tokens), V vocab_size.
The loss of every micro-batch is a *sum* over its target tokens divided by the number of target tokens in
the whole optimizer step, so accumulating k micro-batches yields exactly the gradient of one k-times larger
batch (per-token normalisation, also when some targets are ignored).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gptforge.checkpoint.io import find_checkpoint, load_weights, read_json, save_checkpoint
from gptforge.config import Config, config_from_dict, save_config
from gptforge.data.dataset import WindowSampler, open_split
from gptforge.data.prepare import load_meta
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT, IGNORE_INDEX, flops_per_token
from gptforge.tokenizer import load_tokenizer
from gptforge.train.optim import build_optimizer
from gptforge.train.schedule import accum_steps_at, lr_at
from gptforge.utils.logging import MetricsWriter, print0
from gptforge.utils.metrics import measure_peak_flops, mfu

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainResult:
    """What a finished run reports. Units: steps, tokens, nats per token, seconds."""

    run_dir: Path
    steps: int
    tokens_seen: int
    val_loss: float
    elapsed_s: float


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_context(device: torch.device, dtype: str):
    """bf16/fp16 autocast with fp32 master weights; `auto` means bf16 on CUDA with bf16 support, else fp32."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def token_loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (float32 scalar, nats) over non-ignored targets of one (B, T) batch."""
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], *,
               grad_clip: float, autocast=contextlib.nullcontext) -> tuple[float, float]:
    """Accumulate gradients over `batches` (already on the model's device), clip, and step AdamW.

    Returns:
        (mean loss per target token of the whole step in nats, global gradient norm before clipping).
    """
    n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
    total = torch.zeros((), device=batches[0][0].device)
    for x, y in batches:
        with autocast():
            loss = token_loss_sum(model, x, y) / n_targets
        loss.backward()
        total += loss.detach()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total.item(), grad_norm.item()


@torch.no_grad()
def evaluate(model: torch.nn.Module, sampler: WindowSampler, n_batches: int, device: torch.device,
             autocast=contextlib.nullcontext) -> float:
    """Mean loss per token (nats) over `n_batches` windows from `sampler`; the model is left in train mode."""
    model.eval()
    total, count = 0.0, 0
    for _ in range(n_batches):
        x, y = (t.to(device) for t in sampler.next_batch())
        with autocast():
            total += token_loss_sum(model, x, y).item()
        count += y.numel()
    model.train()
    return total / count


def _init_model_config(init_from: str, meta: dict):
    """The model section of the checkpoint to start from; its vocabulary must match the data's tokenizer."""
    ckpt = find_checkpoint(init_from)
    model_cfg = config_from_dict(read_json(ckpt / "config.json")).model
    if model_cfg.vocab_size != meta["vocab_size"]:
        raise GptforgeError(f"train.init_from={init_from} has vocab_size {model_cfg.vocab_size} but the data was "
                            f"tokenized with vocab_size {meta['vocab_size']}; prepare the data with "
                            f"--tokenizer {ckpt} to reuse the model's tokenizer")
    return model_cfg


def _val_sampler(cfg: Config, val_tokens) -> WindowSampler:
    """The same validation windows at every evaluation (a fixed seed), so val losses compare across steps."""
    return WindowSampler(val_tokens, context_length=cfg.model.context_length,
                         micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed + 1, split="val")


def pretrain(cfg: Config, data_dir: str | Path, run_dir: str | Path, *, progress: bool = True) -> TrainResult:
    """Train a GPT from scratch on prepared token files and write checkpoints into `run_dir`.

    `cfg.model.vocab_size` is taken from the data's tokenizer. Logs to RUN_DIR/metrics.jsonl.

    Raises:
        GptforgeError: missing/corrupt data, a split shorter than one window, or an invalid config.
    """
    run_dir, t = Path(run_dir), cfg.train
    torch.manual_seed(t.seed)
    device = resolve_device(t.device)
    meta = load_meta(data_dir)
    tokenizer = load_tokenizer(data_dir)
    if cfg.model.vocab_size != meta["vocab_size"] and not t.init_from:
        print0(f"note: model.vocab_size set to {meta['vocab_size']} from the data's tokenizer "
               f"(config had {cfg.model.vocab_size})")
        cfg.model.vocab_size = meta["vocab_size"]
    train_sampler = WindowSampler(open_split(data_dir, "train", meta["dtype"]), context_length=cfg.model.context_length,
                                  micro_batch_size=t.micro_batch_size, seed=t.seed)
    val_tokens = open_split(data_dir, "val", meta["dtype"])
    val_sampler = _val_sampler(cfg, val_tokens) if len(val_tokens) > cfg.model.context_length else None

    if t.init_from:
        cfg.model = _init_model_config(t.init_from, meta)
    model = GPT(cfg.model)
    if t.init_from:
        load_weights(model, find_checkpoint(t.init_from) / "model.safetensors")
        print0(f"initialised from {find_checkpoint(t.init_from)}")
    model = model.to(device)
    train_model = torch.compile(model) if t.compile else model
    optimizer = build_optimizer(model, cfg.optim, device.type)
    autocast = lambda: autocast_context(device, t.dtype)  # noqa: E731
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    tokenizer.save(run_dir)
    metrics = MetricsWriter(run_dir / "metrics.jsonl")

    full_accum = cfg.grad_accum_steps()
    micro_tokens = t.micro_batch_size * cfg.model.context_length
    decay_steps = cfg.optim.lr_decay_steps or t.max_steps
    fpt = flops_per_token(cfg.model)
    peak = t.peak_flops or measure_peak_flops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print0(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {fpt / 1e6:.1f} MFLOPs/token; device {device}; "
           f"batch {full_accum * micro_tokens} tokens ({full_accum} x {t.micro_batch_size} x "
           f"{cfg.model.context_length}); peak {peak / 1e9:.1f} GFLOP/s ({'given' if t.peak_flops else 'measured'})")

    def checkpoint(step: int, val_loss: float | None) -> None:
        save_checkpoint(run_dir, step=step, model=model, cfg=cfg, tokenizer=tokenizer, optimizer=optimizer,
                        state={"tokens_seen": tokens_seen, "val_loss": val_loss}, keep=t.keep_checkpoints)

    tokens_seen, step, val_loss = 0, 0, float("nan")
    start = window_start = time.perf_counter()
    window_tokens = 0
    bar = tqdm(total=t.max_steps, desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
    model.train()
    while step < t.max_steps:
        lr = lr_at(step, lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps, decay_steps=decay_steps,
                   min_lr_ratio=cfg.optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        accum = accum_steps_at(tokens_seen, full_accum_steps=full_accum, micro_step_tokens=micro_tokens,
                               ramp_start_tokens=cfg.optim.batch_ramp_start_tokens,
                               ramp_tokens=cfg.optim.batch_ramp_tokens)
        batches = [tuple(x.to(device, non_blocking=True) for x in train_sampler.next_batch()) for _ in range(accum)]
        loss, grad_norm = train_step(train_model, optimizer, batches, grad_clip=cfg.optim.grad_clip,
                                     autocast=autocast)
        step += 1
        tokens_seen += accum * micro_tokens
        window_tokens += accum * micro_tokens
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", val=f"{val_loss:.4f}", refresh=False)
        timed_out = t.max_time_s > 0 and time.perf_counter() - start >= t.max_time_s
        last = step == t.max_steps or timed_out
        record: dict = {}
        if step % t.log_interval == 0 or last:
            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            record = {"step": step, "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": round(tokens_per_s, 1), "mfu": round(mfu(fpt, tokens_per_s, peak), 5),
                      "tokens_seen": tokens_seen, "elapsed_s": round(now - start, 2)}
            window_start, window_tokens = now, 0
        if val_sampler is not None and (step % t.eval_interval == 0 or last):
            val_loss = evaluate(train_model, _val_sampler(cfg, val_tokens), t.eval_steps, device, autocast)
            record = {"step": step, **record, "val_loss": val_loss}
            print0(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f}")
        if record:
            metrics.write(record)
        if step % t.checkpoint_interval == 0 or last:
            checkpoint(step, val_loss)
        if timed_out:
            print0(f"stopping at step {step}: train.max_time_s={t.max_time_s:g} reached")
            break
    bar.close()
    return TrainResult(run_dir=run_dir, steps=step, tokens_seen=tokens_seen, val_loss=val_loss,
                       elapsed_s=time.perf_counter() - start)
