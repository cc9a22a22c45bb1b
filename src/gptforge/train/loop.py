"""The training loop, one for every task: build, then optimizer steps with logging, validation and checkpoints.

Legend: B micro_batch_size (sequences), T context_length (tokens), W world_size (ranks).
A `Task` says what is trained: where micro-batches come from (a `BatchSource` with `state_dict`), the
validation sets, the objective (loss terms and their normalisation, `train/objectives.py`) and how to adapt the
model once its weights are loaded (freezing, adapters). `pretrain` (train/pretrain.py) and `finetune`
(finetune/) are thin wrappers that build a Task. Resuming restores weights, optimizer, the source's position and
every RNG, so a resumed run is bitwise the run left alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gptforge.checkpoint.io import (
    abandon_later_checkpoints,
    checkpoint_format,
    find_checkpoint,
    find_resume_checkpoint,
    full_model_state,
    full_optimizer_state,
    load_model_weights,
    load_optimizer_state,
    load_torch_file,
    read_json,
    save_checkpoint,
)
from gptforge.checkpoint.sharded import PendingSave, load_optimizer, load_trainer_state, save_sharded
from gptforge.config import Config, advisories, config_from_dict, save_config
from gptforge.data.batches import BatchSource, ValSet
from gptforge.distributed.env import DistInfo, all_gather_object, barrier, init_distributed, teardown
from gptforge.distributed.materialize import materialize, snapshot_added
from gptforge.distributed.parallelize import shard_model, wrap_model
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT
from gptforge.model.lora import lora_missing_ok
from gptforge.train.objectives import LanguageModeling, Objective
from gptforge.train.optim import build_optimizer
from gptforge.train.progress import run_steps
from gptforge.train.rng import capture_rng, restore_rng
from gptforge.train.step import compute_dtype
from gptforge.utils.device import meta_device, resolve_device
from gptforge.utils.io import atomic_write_text
from gptforge.utils.logging import MetricsWriter, print0

# What a run writes at the top of its directory (checkpoints/ holds the rest); a new run refuses to start where any
# of them already exists.
RUN_FILES = ("config.yaml", "metrics.jsonl", "tokenizer.json", "char_tokenizer.json", "labels.json", "latest", "best",
             "tensorboard", "metrics.png")


@dataclass
class Task:
    """What the loop trains on.

    Attributes:
        name: "pretrain", "sft", "classify", ... (logged, and the progress bar's label).
        tokenizer: saved into the run directory and every checkpoint.
        train: this rank's endless stream of micro-batches; its state is checkpointed.
        val_sets: named validation sets (see `data.batches.ValSet`); empty means no validation.
        objective: the loss terms.
        setup_model: called on the freshly built model while it is still on the meta device (no weights yet),
            before sharding (e.g. freeze the base, add LoRA adapters); None: train every parameter. It may set
            `requires_grad` and add modules (their parameters are initialised by the module's
            `reset_parameters()` and may be absent from `init_from` weights); it must not read weights or rename
            existing parameters. `init_from` and resumed weights are loaded after it.
        init_missing_ok: name prefixes of parameters allowed to be absent from `train.init_from` weights (a new
            classification head, say); they keep their fresh initialisation.
        fixed_shape: every micro-batch holds exactly B x T real tokens (pretraining windows), which the batch-size
            ramp needs.
        save_extra: writes extra files into each checkpoint directory before its manifest is made (adapters).
        log_stats: numbers added to every logged metrics record (e.g. tokens seen per mixture source).
    """

    name: str
    tokenizer: object
    train: BatchSource
    val_sets: dict[str, ValSet] = field(default_factory=dict)
    objective: Objective = field(default_factory=LanguageModeling)
    setup_model: Callable[[GPT], None] | None = None
    init_missing_ok: tuple[str, ...] = ()
    fixed_shape: bool = False
    save_extra: Callable[[Path], None] | None = None
    log_stats: Callable[[], dict] | None = None


# make_task(cfg, info, resume_checkpoint) -> Task. It may set cfg.model fields that come from the data or the
# initial weights (vocab_size, n_labels) before the model is built.
TaskFactory = Callable[[Config, DistInfo, Path | None], Task]


@dataclass
class TrainResult:
    """What a finished run reports. Units: steps, tokens, nats per unit of the main loss term, seconds."""

    run_dir: Path
    steps: int
    tokens_seen: int
    val_loss: float
    elapsed_s: float
    skipped_steps: int = 0
    val_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """Everything the step loop needs, built once by `_build`."""

    cfg: Config
    info: DistInfo
    run_dir: Path
    task: Task
    model: GPT  # unwrapped: checkpoints read it
    train_model: torch.nn.Module  # compiled / DDP / FSDP view used for steps
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    metrics: MetricsWriter | None = None
    start_step: int = 0
    tokens_seen: int = 0
    targets_seen: int = 0
    checkpoint_group: object = None  # gloo group for background checkpoint writes (train.async_checkpoint)
    pending_save: PendingSave | None = None  # a sharded checkpoint still being written in the background


def train(cfg: Config, make_task: TaskFactory, run_dir: str | Path, *, progress: bool = True,
          resume: str | None = None) -> TrainResult:
    """Train a model on the task `make_task` builds, writing checkpoints and metrics into `run_dir`.

    Runs as one process, or as one rank of a torchrun job (DDP or FSDP2 per `train.data_parallel`).
    `resume` is "latest" (the newest intact checkpoint in run_dir) or a checkpoint directory.

    Raises:
        GptforgeError: missing/corrupt data or checkpoint, a run directory already used, or too many
        non-finite steps in a row.
    """
    info = init_distributed(resolve_device(cfg.train.device))
    run = None
    try:
        run = _build(cfg, make_task, Path(run_dir), info, resume)
        try:
            result = run_steps(run, progress, save=_save)
        except KeyboardInterrupt:  # the interrupt checkpoint may still be in flight
            _finish_save(run)
            raise
        _finish_save(run)
        return result
    finally:
        if run is not None and run.metrics is not None:
            run.metrics.close()
        del run  # release the DDP/FSDP wrappers (and their hold on the process group) before it is destroyed
        teardown(info)


def _resume_model_config(cfg: Config, ckpt: Path):
    """The checkpoint's architecture; the run's config may not change it (vocab_size is data-derived). A run
    started from `train.init_from` took its architecture from that checkpoint, not from the config, so the same
    command line resumes it."""
    saved = config_from_dict(read_json(ckpt / "config.json")).model
    if cfg.train.init_from:
        return saved
    for f in dataclasses.fields(saved):
        mine, theirs = getattr(cfg.model, f.name), getattr(saved, f.name)
        if f.name != "vocab_size" and mine != theirs:
            raise GptforgeError(f"cannot resume: model.{f.name}={mine} but the checkpoint {ckpt} has {theirs} "
                                "(the architecture cannot change on resume)")
    return saved


def _build_model(cfg: Config, task: Task, ckpt: Path | None, info: DistInfo) -> tuple[GPT, torch.nn.Module]:
    """Build on the meta device, apply the task's hook, shard, then materialise this rank's part on its device
    and fill it: resumed weights, or the seeded GPT-2 initialisation (the same at any world size) followed by
    `init_from` weights, each read straight into the shards. Returns (model, module to call in steps)."""
    t = cfg.train
    with meta_device():
        model = GPT(cfg.model)
        before = {name for name, _ in model.named_parameters()}
        if task.setup_model is not None:
            task.setup_model(model)
    added = snapshot_added(model, before)
    shard_model(model, info, data_parallel=t.data_parallel, activation_checkpointing=t.activation_checkpointing,
                param_dtype=compute_dtype(info.device, t.dtype))
    materialize(model, info.device, seed=None if ckpt else t.seed, added=added)
    if ckpt:
        load_model_weights(model, ckpt)
        print0(f"resuming from {ckpt}")
    elif t.init_from:
        source = find_checkpoint(t.init_from)
        new = tuple(f"{owner}.{name}" for owner, (_, names) in added.items() for name in names)
        load_model_weights(model, source, missing_ok=task.init_missing_ok + new + lora_missing_ok(model))
        print0(f"initialised from {source}")
    return model, wrap_model(model, info, data_parallel=t.data_parallel, compile=t.compile)


def _with_tensor_parallel(info: DistInfo, tensor_parallel: int, data_parallel: str) -> DistInfo:
    """`info` with train.tensor_parallel set, checked against the world size and data_parallel."""
    if tensor_parallel == 1:
        return info
    if info.world_size % tensor_parallel:
        raise GptforgeError(f"train.tensor_parallel={tensor_parallel} must divide the number of ranks "
                            f"({info.world_size}; launch with torchrun --nproc_per_node N)")
    if info.world_size > tensor_parallel and data_parallel != "fsdp":
        raise GptforgeError("train.tensor_parallel with more ranks than tensor-parallel ones needs "
                            "train.data_parallel=fsdp (FSDP2 over the data-parallel dimension)")
    return dataclasses.replace(info, tensor_parallel=tensor_parallel)


def _build(cfg: Config, make_task: TaskFactory, run_dir: Path, info: DistInfo, resume: str | None) -> Run:
    """Task, model (fresh, `init_from`, or a checkpoint), parallel wrappers, optimizer, run directory."""
    t = cfg.train
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    if run_dir.exists() and not run_dir.is_dir():
        raise GptforgeError(f"--out {run_dir} is a file, not a run directory; choose a new --out (nothing was "
                            "changed)")
    if not resume and any((run_dir / "checkpoints").glob("step_*")):
        raise GptforgeError(f"{run_dir} already holds checkpoints of a run; pass --resume to continue it, or choose "
                            "a new --out (nothing was changed)")
    taken = [name for name in RUN_FILES if (run_dir / name).exists()] if not resume else []
    if taken:  # never overwrite files this run did not write (a user's, or a run that died before a checkpoint)
        raise GptforgeError(f"{run_dir} already holds {', '.join(taken)}, which a run would overwrite; choose a new "
                            "--out (nothing was changed)")
    info = _with_tensor_parallel(info, t.tensor_parallel, t.data_parallel)
    ckpt = find_resume_checkpoint(run_dir if resume == "latest" else resume, info=info) if resume else None
    if ckpt:
        cfg.model = _resume_model_config(cfg, ckpt)
    # the task shards data over data-parallel ranks: tensor-parallel ranks of one replica read the same rows
    task = make_task(cfg, dataclasses.replace(info, rank=info.dp_rank, world_size=info.dp_size, tensor_parallel=1),
                     ckpt)
    for note in advisories(cfg):
        print0(f"warning: {note}")
    model, train_model = _build_model(cfg, task, ckpt, info)
    run = Run(cfg=cfg, info=info, run_dir=run_dir, task=task, model=model, train_model=train_model,
              optimizer=build_optimizer(model, cfg.optim, info.device.type),
              scaler=torch.amp.GradScaler(info.device.type) if t.dtype == "float16" else None)
    if t.async_checkpoint and _format(cfg, info) != "sharded":
        print0("warning: train.async_checkpoint has no effect on consolidated checkpoints (set "
               "train.checkpoint_format=sharded to write in the background)")
    elif t.async_checkpoint and info.distributed:
        import torch.distributed as dist

        run.checkpoint_group = dist.new_group(backend="gloo")  # background writes must not share training's group
    if ckpt:
        _restore(run, ckpt)
    if info.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        run.metrics = MetricsWriter(run_dir / "metrics.jsonl", purge_step=run.start_step + 1 if ckpt else None)
        save_config(cfg, run_dir / "config.yaml")
        task.tokenizer.save(run_dir)
    barrier(info)
    return run


def _restore(run: Run, ckpt: Path) -> None:
    """Optimizer, scaler, batch source, RNG states and counters from `ckpt` (either format, written at any world
    size); metrics.jsonl cut back to its step."""
    if checkpoint_format(ckpt) == "sharded":
        load_optimizer(run.model, run.optimizer, ckpt, run.info)
        trainer, saved_world = load_trainer_state(ckpt, run.info)
        rng = trainer["rng"]
    else:
        load_optimizer_state(run.model, run.optimizer, load_torch_file(ckpt / "optimizer.pt"))
        trainer = load_torch_file(ckpt / "trainer.pt")
        saved_world, rng = len(trainer["rng"]), trainer["rng"][min(run.info.rank, len(trainer["rng"]) - 1)]
    if saved_world != run.info.world_size:
        print0(f"note: checkpoint was written by {saved_world} ranks, now {run.info.world_size}; "
               "the data order continues exactly, per-rank RNG streams restart from rank 0's")
    run.task.train.load_state_dict(trainer["sampler"])
    restore_rng(rng)
    if run.scaler is not None and trainer.get("scaler"):
        run.scaler.load_state_dict(trainer["scaler"])
    state = read_json(ckpt / "state.json")
    run.start_step, run.tokens_seen = state["step"], state["tokens_seen"]
    run.targets_seen = state.get("targets_seen", run.tokens_seen)
    if run.info.is_main_process and ckpt.parent == run.run_dir / "checkpoints":
        for moved in abandon_later_checkpoints(run.run_dir, run.start_step):
            print0(f"note: moved checkpoint from after step {run.start_step} aside to {moved}")
    metrics = run.run_dir / "metrics.jsonl"
    if run.info.is_main_process and metrics.is_file():  # drop lines logged after the checkpoint
        keep = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                if line.strip() and _step_of(line) <= run.start_step]
        atomic_write_text(metrics, "".join(line + "\n" for line in keep))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def _format(cfg: Config, info: DistInfo) -> str:
    """train.checkpoint_format resolved: "auto" is sharded under FSDP or tensor parallelism, else consolidated."""
    chosen = cfg.train.checkpoint_format
    if chosen == "auto":
        sharded = info.distributed and (cfg.train.data_parallel == "fsdp" or info.tensor_parallel > 1)
        return "sharded" if sharded else "consolidated"
    return chosen


def _save(run: Run, step: int, val_loss: float) -> None:
    """Write checkpoint `step` (a collective): sharded (every rank its own part, perhaps in the background) or
    consolidated (gathered on rank 0), per `train.checkpoint_format`."""
    state = {"tokens_seen": run.tokens_seen, "targets_seen": run.targets_seen,
             "val_loss": None if math.isnan(val_loss) else val_loss}
    scaler = run.scaler.state_dict() if run.scaler is not None else {}
    if _format(run.cfg, run.info) == "sharded":
        _finish_save(run)
        trainer_state = {"sampler": run.task.train.state_dict(), "rng": capture_rng(), "scaler": scaler}
        run.pending_save = save_sharded(
            run.run_dir, step=step, model=run.model, optimizer=run.optimizer, cfg=run.cfg, tokenizer=run.task.tokenizer,
            trainer_state=trainer_state, state=state, info=run.info, keep=run.cfg.train.keep_checkpoints,
            extra=run.task.save_extra, background=run.cfg.train.async_checkpoint, process_group=run.checkpoint_group)
        if not run.cfg.train.async_checkpoint:
            _finish_save(run)
        return
    model_state = full_model_state(run.model)
    optimizer_state = full_optimizer_state(run.model, run.optimizer)
    rng = all_gather_object(capture_rng(), run.info)
    if run.info.is_main_process:
        trainer_state = {"sampler": run.task.train.state_dict(), "rng": rng, "scaler": scaler}
        save_checkpoint(run.run_dir, step=step, model_state=model_state, cfg=run.cfg, tokenizer=run.task.tokenizer,
                        optimizer_state=optimizer_state, trainer_state=trainer_state, extra=run.task.save_extra,
                        state=state, keep=run.cfg.train.keep_checkpoints)
    barrier(run.info)


def _finish_save(run: Run) -> None:
    """Commit a sharded checkpoint still being written, if any (a collective: waits for every rank's writes)."""
    if run.pending_save is not None:
        pending, run.pending_save = run.pending_save, None
        pending.finish(run.info)
