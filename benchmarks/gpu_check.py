"""GPU check: gptforge's training throughput, MFU and memory on one NVIDIA GPU (written for an H200), in < 8 min.

Phase 1: GPT-3 Small (the `gpt3-small` preset: context 2048, alternating dense / banded attention) with bf16
autocast over fp32 weights, as `gptforge pretrain` trains it: eager first (a baseline that cannot fail),
then `torch.compile` with SDPA restricted to its fused kernels (flash for the dense layers; SDPA's flash kernel
takes no band mask, so banded layers use the memory-efficient one; the math fallback is excluded). Phase 2:
`gpt3-xl` (1.3B) with FSDP2 built the way `gptforge pretrain` builds it (meta device, `fully_shard` per block
and root with bf16 MixedPrecisionPolicy, seeded init materialised into the shards; a single-process world of
size 1). Phase 3, while time is left: the largest GPT-3 preset that `gptforge.plan` says fits this GPU with
FSDP2 plus activation checkpointing of every block; an out-of-memory error falls back to a smaller
micro-batch, then a smaller preset. Every phase has a time budget; one table is printed at the end (and each
row as soon as it is measured).

MFU = flops_per_token x tokens/s / peak (the PaLM convention gptforge logs; activation recomputation is not
counted), with the peak from `gptforge.utils.gpus` (the H200 entry: 989 TFLOP/s dense bf16). "planned" is
`gptforge.plan.memory_per_gpu` for the same setup, so the table also checks the planner against
`torch.cuda.max_memory_allocated`.

Data are random tokens (no files). Imports only torch and gptforge's config, model, plan, distributed, train.optim
and utils modules (no `datasets`). Run it with `benchmarks/gpu_check.sh`; `--cpu-smoke` rehearses every code
path on the CPU with tiny shapes (gloo instead of NCCL, aot_eager instead of inductor) in under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptforge.config import Config, ModelConfig, load_config
from gptforge.model.gpt import GPT, IGNORE_INDEX, count_parameters, flops_per_token
from gptforge.plan import GIB, USABLE_FRACTION, memory_per_gpu
from gptforge.train.optim import build_optimizer
from gptforge.utils.gpus import peak_flops_for

GPT3_PRESETS = ("gpt3-small", "gpt3-medium", "gpt3-large", "gpt3-xl", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b",
                "gpt3-175b")


@dataclass
class Row:
    """One line of the result table. Units: tokens, seconds, GiB."""

    phase: str
    model: str
    params: int
    setup: str
    micro_batch: int
    context_length: int
    steps: int = 0
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    first_step_s: float = 0.0
    peak_gib: float | None = None
    planned_gib: float = 0.0
    note: str = ""


class Budget:
    """A wall-clock deadline (seconds since `start`), checked between steps; nothing is interrupted mid-step."""

    def __init__(self, start: float, until_s: float) -> None:
        self.deadline = start + until_s

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(cfg: ModelConfig, micro_batch: int, device: torch.device, gen: torch.Generator):
    """(x, y) of shape (B, T) int64: random tokens; y is x shifted by one, as the window sampler makes them."""
    seq = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.context_length + 1), generator=gen)
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               autocast) -> torch.Tensor:
    """gptforge's optimizer step for one micro-batch: token-mean cross-entropy (fp32), backward, clip at 1.0,
    AdamW. Returns the loss tensor (not synchronised)."""
    with autocast():
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure(row: Row, step_fn, *, device: torch.device, budget: Budget, warmup: int, max_steps: int,
            tokens_per_step: int, fpt: float, peak: float) -> None:
    """Time `step_fn` into `row`: the first step alone (compilation), `warmup` more, then up to `max_steps`
    timed steps while the budget lasts. Also records peak memory on CUDA."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    loss = step_fn()
    synchronize(device)
    row.first_step_s = time.perf_counter() - start
    for _ in range(warmup):
        if budget.left_s() <= 0:
            break
        loss = step_fn()
    synchronize(device)
    steps, start = 0, time.perf_counter()
    while steps < max_steps and (steps < 2 or budget.left_s() > 0):  # at least 2 timed steps
        loss = step_fn()
        steps += 1
    synchronize(device)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss).item():
        row.note = (row.note + "; " if row.note else "") + "non-finite loss"
    row.steps = steps
    row.tokens_per_s = steps * tokens_per_step / elapsed
    row.mfu = fpt * row.tokens_per_s / peak
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / GIB


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower()


# ---- Phase 1: one GPU, bf16 autocast, eager and torch.compile -------------------------------------------------

def _train_single(row: Row, cfg: Config, *, device, peak, micro_batch, compile_backend, budget, warmup,
                  max_steps, compiled: bool) -> None:
    """Build, optionally compile, and measure; the model dies with this frame."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    train_model = torch.compile(model, backend=compile_backend) if compiled else model

    def autocast():
        if not compiled:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        stack = contextlib.ExitStack()  # fused kernels only: flash (dense layers), memory-efficient (band masks)
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]))
        return stack

    def step():
        return train_step(train_model, optimizer, *random_batch(cfg.model, micro_batch, device, gen), autocast)

    measure(row, step, device=device, budget=budget, warmup=warmup, max_steps=max_steps,
            tokens_per_step=micro_batch * cfg.model.context_length, fpt=flops_per_token(cfg.model), peak=peak)


def phase_single(cfg: Config, name: str, *, device, micro_batch, compile_backend, compiled: bool, **kw) -> Row:
    """Phase 1: one GPU, fp32 weights under bf16 autocast (what `gptforge pretrain` does), eager or compiled."""
    setup = f"bf16 autocast, {'compile (' + compile_backend + '), flash SDPA' if compiled else 'eager'}"
    planned = memory_per_gpu(cfg.model, micro_batch_size=micro_batch, world_size=1, strategy="ddp")
    row = Row("1", name, count_parameters(cfg.model), setup, micro_batch, cfg.model.context_length,
              planned_gib=planned.total_bytes / GIB)
    try:
        _train_single(row, cfg, device=device, micro_batch=micro_batch, compile_backend=compile_backend,
                      compiled=compiled, **kw)
    except Exception as exc:  # report and go on: a failed phase must not cost the other phases
        row.note = f"{'out of memory' if is_oom(exc) else type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    finally:
        if compiled:
            torch._dynamo.reset()  # drop compiled graphs and what they reference before phase 2
        release(device)
    return row


# ---- Phases 2 and 3: FSDP2, single process ---------------------------------------------------------------------

def init_single_process_group(device: torch.device) -> None:
    """A world of one rank (NCCL on CUDA, gloo on CPU) on a free local port, which FSDP2's mesh needs."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def build_fsdp_model(cfg: ModelConfig, device: torch.device, *, checkpointing: bool, meta: bool) -> nn.Module:
    """GPT sharded with gptforge's own wrappers: optionally every block checkpointed, then `fully_shard` per block
    and at the root with bf16 compute and fp32 gradient reduction (MixedPrecisionPolicy, not autocast). With
    `meta`, as `gptforge pretrain` builds it: on the meta device, then materialised and initialised (seeded,
    sharding-invariant, drawn on the CPU); else built directly on `device` (faster to start for the largest)."""
    from gptforge.distributed.env import DistInfo
    from gptforge.distributed.materialize import materialize
    from gptforge.distributed.parallelize import apply_activation_checkpointing, apply_fsdp

    torch.manual_seed(0)
    with torch.device("meta" if meta else device):
        model = GPT(cfg)
    if checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, DistInfo(device=device), param_dtype=torch.bfloat16)
    if meta:
        materialize(model, device, seed=0)
    return model


def fsdp_candidates(configs: dict[str, Config], memory_gib: float, batches=(4, 2, 1)):
    """(name, micro_batch) pairs, largest model first, that the planner says fit `memory_gib` (fsdp+ac)."""
    out = []
    for name in sorted(configs, key=lambda n: -count_parameters(configs[n].model)):
        for b in batches:
            est = memory_per_gpu(configs[name].model, micro_batch_size=b, world_size=1, strategy="fsdp+ac")
            if est.fits(memory_gib):
                out.append((name, b))
    return out


def _train_fsdp(row: Row, cfg: Config, *, device, micro_batch, checkpointing: bool = True, meta: bool = False,
                **kw) -> None:
    """Build, shard and measure one FSDP candidate; the model dies with this frame."""
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model = build_fsdp_model(cfg.model, device, checkpointing=checkpointing, meta=meta)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    built_s = time.perf_counter() - start

    def step():
        return train_step(model, optimizer, *random_batch(cfg.model, micro_batch, device, gen), contextlib.nullcontext)

    measure(row, step, device=device, tokens_per_step=micro_batch * cfg.model.context_length,
            fpt=flops_per_token(cfg.model), **kw)
    row.note = f"built and sharded in {built_s:.0f} s" + (f"; {row.note}" if row.note else "")


def _try_fsdp(row: Row, cfg: Config, *, device, **kw) -> bool:
    """`_train_fsdp`, with a failure written into the row; True to stop trying candidates (it trained, or failed
    for a reason other than running out of memory), False to go on with a smaller one."""
    try:
        _train_fsdp(row, cfg, device=device, **kw)
        return True
    except Exception as exc:
        row.note = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        return not is_oom(exc)
    finally:
        release(device)


def phase_xl(cfg: Config, name: str, *, device, memory_gib, budget, **kw) -> list[Row]:
    """Phase 2: `name` (gpt3-xl) with FSDP2 and no activation checkpointing, built on the meta device; the
    largest micro-batch (8, 4, 2, 1) the planner says fits, smaller after an out-of-memory error."""
    init_single_process_group(device)
    rows: list[Row] = []
    for b in [b for b in (8, 4, 2, 1) if memory_per_gpu(cfg.model, micro_batch_size=b, world_size=1,
                                                       strategy="fsdp").fits(memory_gib)] or [1]:
        planned = memory_per_gpu(cfg.model, micro_batch_size=b, world_size=1, strategy="fsdp")
        row = Row("2", name, count_parameters(cfg.model), "FSDP2 (meta build), bf16 params", b,
                  cfg.model.context_length, planned_gib=planned.total_bytes / GIB)
        rows.append(row)
        if _try_fsdp(row, cfg, device=device, micro_batch=b, checkpointing=False, meta=True, budget=budget, **kw):
            return rows
    return rows


def phase_fsdp(configs: dict[str, Config], *, device, memory_gib, budget, **kw) -> list[Row]:
    """Phase 3: the planner's candidates, largest first, until one trains; returns a row per attempt."""
    init_single_process_group(device)
    rows: list[Row] = []
    for name, b in fsdp_candidates(configs, memory_gib):  # an OOM moves on to the next (smaller) candidate
        cfg = configs[name]
        planned = memory_per_gpu(cfg.model, micro_batch_size=b, world_size=1, strategy="fsdp+ac")
        row = Row("3", name, count_parameters(cfg.model), "FSDP2 + act. ckpt, bf16 params", b,
                  cfg.model.context_length, planned_gib=planned.total_bytes / GIB)
        rows.append(row)
        if budget.left_s() < 20:
            row.note = "skipped: time budget spent"
            break
        if _try_fsdp(row, cfg, device=device, micro_batch=b, budget=budget, **kw):
            return rows
    return rows


# ---- Main -----------------------------------------------------------------------------------------------------

def smoke_configs() -> tuple[Config, dict[str, Config]]:
    """Tiny shapes for --cpu-smoke: one model for phase 1 (and 2) and three sizes for phase 3's selection."""
    def tiny(d_model, n_layer):
        return load_config(preset="debug", overrides=[("d_model", d_model), ("n_layer", n_layer), ("n_head", 2),
                                                      ("context_length", 64), ("attention_pattern", "dense,local")])
    return tiny(64, 2), {"tiny-64": tiny(64, 2), "tiny-128": tiny(128, 2), "tiny-256": tiny(256, 4)}


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def format_table(rows: list[Row], header: str) -> str:
    lines = [header, f"{'phase':<6}{'model':<12}{'params':>9}  {'setup':<46}{'batch':>11}{'steps':>6}"
             f"{'tokens/s':>11}{'MFU':>7}{'1st step':>9}{'peak GiB':>9}{'planned':>8}  note"]
    for r in rows:
        batch = f"{r.micro_batch}x{r.context_length}"
        lines.append(f"{r.phase:<6}{r.model:<12}{r.params / 1e6:>8.1f}M  {r.setup:<46}{batch:>11}{r.steps:>6}"
                     f"{r.tokens_per_s:>11,.0f}{r.mfu:>7.1%}{r.first_step_s:>8.1f}s{_gib(r.peak_gib):>9}"
                     f"{_gib(r.planned_gib):>8}  {r.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, < 1 minute")
    parser.add_argument("--budget-s", type=float, default=None, help="soft time budget, seconds (440; smoke 50)")
    parser.add_argument("--micro-batch", type=int, default=None, help="phase 1 micro-batch, sequences (8; smoke 4)")
    parser.add_argument("--memory-gib", type=float, default=None, help="memory to plan phase 2 for (the GPU's)")
    parser.add_argument("--skip-compile", action="store_true", help="phase 1 eager only")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; smoke aot_eager)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("error: no CUDA device; use --cpu-smoke to rehearse on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    total_s = args.budget_s or (50.0 if smoke else 440.0)
    if smoke:
        small, fsdp_configs = smoke_configs()
        small_name, micro_batch, backend = "tiny-64", args.micro_batch or 4, args.compile_backend or "aot_eager"
        memory_gib = args.memory_gib or (
            memory_per_gpu(fsdp_configs["tiny-128"].model, micro_batch_size=4, world_size=1,
                           strategy="fsdp+ac").total_bytes / GIB / USABLE_FRACTION * 1.05)  # 2nd-largest fits
        warmup, max_steps, device_name = 1, 3, "CPU (smoke test)"
    else:
        small, small_name = load_config(preset="gpt3-small"), "gpt3-small"
        micro_batch, backend = args.micro_batch or 8, args.compile_backend or "inductor"
        fsdp_configs = {name: load_config(preset=name) for name in GPT3_PRESETS}
        memory_gib = args.memory_gib or torch.cuda.get_device_properties(device).total_memory / GIB
        warmup, max_steps, device_name = 2, 20, torch.cuda.get_device_name(device)
    peak, source = peak_flops_for(device, torch.bfloat16)
    header = (f"{device_name}; torch {torch.__version__}; peak {peak / 1e12:.1f} TFLOP/s bf16 ({source}); "
              f"planning for {_gib(memory_gib)} GiB; random tokens")
    print(header, flush=True)
    rows: list[Row] = []
    xl, xl_name = (fsdp_configs["tiny-128"], "tiny-128") if smoke else (fsdp_configs["gpt3-xl"], "gpt3-xl")
    # Budgets, as fractions of the total: eager until 10%, compiled until 40%, gpt3-xl until 65%, largest to 100%.
    phases = [(0.10, False)] + ([] if args.skip_compile else [(0.40, True)])
    try:
        for until, compiled in phases:
            rows.append(phase_single(small, small_name, device=device, peak=peak, micro_batch=micro_batch,
                                     compile_backend=backend, budget=Budget(start, until * total_s), warmup=warmup,
                                     max_steps=max_steps, compiled=compiled))
            print(format_table(rows[-1:], "").splitlines()[-1], flush=True)
        for row in phase_xl(xl, xl_name, device=device, peak=peak, memory_gib=memory_gib,
                            budget=Budget(start, 0.65 * total_s), warmup=1, max_steps=max_steps):
            rows.append(row)
            print(format_table([row], "").splitlines()[-1], flush=True)
        fsdp_rows = phase_fsdp(fsdp_configs, device=device, peak=peak, memory_gib=memory_gib,
                               budget=Budget(start, total_s), warmup=1, max_steps=max_steps)
        rows += fsdp_rows
        for row in fsdp_rows:
            print(format_table([row], "").splitlines()[-1], flush=True)
        if not fsdp_rows:
            rows.append(Row("3", "-", 0, "FSDP2 + act. ckpt", 0, 0, note="no preset fits by the planner"))
    except KeyboardInterrupt:  # gpu_check.sh's hard timeout sends SIGINT: still print what was measured
        rows.append(Row("-", "-", 0, "-", 0, 0, note="interrupted (time limit)"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    print()
    print(format_table(rows, f"gptforge GPU check, {time.perf_counter() - start:.0f} s total"))
    failed = [r for r in rows if r.steps == 0 and "out of memory" not in r.note and "skipped" not in r.note]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
