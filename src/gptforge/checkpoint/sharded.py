"""Sharded checkpoints: every rank writes its own part of the weights and optimizer state, in parallel and
optionally in the background, with `torch.distributed.checkpoint` (DCP); any world size reads them back.

Layout of a sharded RUN_DIR/checkpoints/step_NNNNNNNN/ (schema 2, state.json "format": "sharded"):
    model/                 DCP directory: .metadata and __R_I.distcp files; weights by parameter name (the tied
                           output head stored once, as wte.weight)
    optimizer/             DCP directory: AdamW state keyed by parameter name, and the param groups
    trainer/rank_RRRRR.pt  rank R's data-source state, RNG states and grad-scaler state (weights_only)
    config.json, tokenizer file(s), task extras
    state.json             schema_version, format, world_size, step, counters, and the sha256 of every other file
                           by relative path (each rank hashes a share of the files)
DCP stores each tensor's global shape and the offsets of every shard, so loading into a model sharded over a
different number of ranks reshards, and a single process without a process group consolidates (`load_model`).
A checkpoint is written under a hidden name and renamed into place once every rank has finished, so a partial
checkpoint is never found. All ranks must see the same filesystem (as DCP's file writer assumes).
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptforge.config import Config
from gptforge.distributed.env import DistInfo, all_gather_object, barrier
from gptforge.errors import GptforgeError
from gptforge.utils.io import atomic_replace_dir, atomic_write_json, atomic_write_text, sha256_file

MODEL_DIR, OPTIMIZER_DIR, TRAINER_DIR = "model", "optimizer", "trainer"
TIED_KEYS = ("lm_head.weight",)
SINGLE = DistInfo()


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's view of the weights by clean name (DTensor shards under FSDP, plain tensors otherwise); they
    share storage with the parameters. The tied head is left out."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v for k, v in get_model_state_dict(_unwrap(model)).items() if k not in TIED_KEYS}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _check_finite(state: dict[str, torch.Tensor], step: int, info: DistInfo) -> None:
    """Raise on every rank if any rank's shard of any weight is NaN or infinite (a collective)."""
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(_local(v)).all()), None)
    names = [n for n in all_gather_object(bad, info) if n]
    if names:
        raise GptforgeError(f"refusing to write checkpoint step {step}: parameter {names[0]} is not finite")


@dataclass
class PendingSave:
    """A sharded checkpoint being written; `finish` returns once it is committed (renamed into place)."""

    run_dir: Path
    tmp: Path
    final: Path
    step: int
    state: dict[str, Any]
    keep: int
    background: Future | None = None

    def finish(self, info: DistInfo) -> Path:
        """Wait for a background write and commit, or commit now (a collective on every rank)."""
        if self.background is not None:
            return self.background.result()
        return _commit(self, info, group=None)


def save_sharded(run_dir: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config,
                 tokenizer, trainer_state: dict, state: dict[str, Any], info: DistInfo, keep: int = 3,
                 extra=None, background: bool = False, process_group=None) -> PendingSave:
    """Start writing checkpoint `step` (a collective: call on every rank). Each rank writes its shards of the
    weights and optimizer state, and its own `trainer_state` (data source, RNG, scaler); rank 0 adds config,
    tokenizer and `extra` files. With `background`, the shards are first copied to CPU memory (this rank's
    weights and optimizer state once more), then a background thread writes them, hashes and commits while
    training continues; under torchrun pass a gloo `process_group` reserved for checkpoint traffic (the thread's
    collectives must not interleave with training's).

    Returns:
        A PendingSave; `finish(info)` on every rank makes (or waits until) the checkpoint is visible.

    Raises:
        GptforgeError: a weight is NaN or infinite (nothing is written).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    root = Path(run_dir) / "checkpoints"
    pending = PendingSave(Path(run_dir), root / f".tmp_step_{step:08d}", root / f"step_{step:08d}", step, state,
                          keep)
    weights = model_state(model)
    _check_finite(weights, step, info)
    optim = get_optimizer_state_dict(_unwrap(model), optimizer)
    if info.is_main_process:
        shutil.rmtree(pending.tmp, ignore_errors=True)
        (pending.tmp / TRAINER_DIR).mkdir(parents=True)
    barrier(info)
    torch.save(trainer_state, pending.tmp / TRAINER_DIR / f"rank_{info.rank:05d}.pt")
    if info.is_main_process:
        atomic_write_json(pending.tmp / "config.json", cfg.to_dict())
        tokenizer.save(pending.tmp)
        if extra is not None:
            extra(pending.tmp)
    if not background:
        _write(pending.tmp, weights, optim, info, group=None)
        return pending
    from torch.distributed.checkpoint.staging import BlockingAsyncStager

    stager = BlockingAsyncStager()
    weights, optim = stager.stage(weights), stager.stage(optim)  # CPU copies: training may now change the originals
    group = process_group if info.distributed else None

    def write_and_commit() -> Path:
        _write(pending.tmp, weights, optim, info, group=group)
        return _commit(pending, info, group=group)

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptforge-checkpoint")
    pending.background = executor.submit(write_and_commit)
    executor.shutdown(wait=False)
    return pending


def _write(tmp: Path, weights: dict, optim: dict, info: DistInfo, *, group) -> None:
    import torch.distributed.checkpoint as dcp

    with _quiet_single_process():
        for name, sd in ((MODEL_DIR, weights), (OPTIMIZER_DIR, optim)):
            dcp.save(sd, checkpoint_id=tmp / name, process_group=group, no_dist=not info.distributed)


def _commit(pending: PendingSave, info: DistInfo, *, group) -> Path:
    """Hash the files (each rank a share), write the manifest and rename the checkpoint into place; point
    RUN_DIR/latest at it and prune old ones (a collective over `group`). Returns its path."""
    from gptforge.checkpoint.io import SCHEMA_VERSION, prune_checkpoints

    _barrier(info, group)
    files = sorted(str(p.relative_to(pending.tmp)) for p in pending.tmp.rglob("*") if p.is_file())
    mine = {rel: sha256_file(pending.tmp / rel) for i, rel in enumerate(files) if i % info.world_size == info.rank}
    manifest = {k: v for part in _gather(mine, info, group) for k, v in part.items()}
    if info.is_main_process:
        atomic_write_json(pending.tmp / "state.json", {
            "schema_version": SCHEMA_VERSION, "format": "sharded", "world_size": info.world_size,
            "step": pending.step, **pending.state, "files": dict(sorted(manifest.items()))})
        atomic_replace_dir(pending.tmp, pending.final)
        atomic_write_text(pending.run_dir / "latest", pending.final.name + "\n")
        prune_checkpoints(pending.run_dir, pending.keep)
    _barrier(info, group)
    return pending.final


def _barrier(info: DistInfo, group) -> None:
    if info.distributed:
        torch.distributed.barrier(group=group)


def _gather(obj, info: DistInfo, group) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load that it assumes one process; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _saved_tensors(directory: Path) -> dict[str, Any]:
    """Name -> DCP tensor metadata (global size, dtype) of a DCP directory.

    Raises:
        GptforgeError: the directory or its .metadata file is missing or unreadable.
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # missing, truncated or not a DCP directory
        raise GptforgeError(f"cannot read sharded checkpoint {directory}: {str(exc).strip().splitlines()[0]}"
                            ) from None
    return metadata.state_dict_metadata


def _dcp_load(state: dict, directory: Path, *, no_dist: bool) -> None:
    import torch.distributed.checkpoint as dcp

    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=directory, no_dist=no_dist)
    except Exception as exc:  # DCP wraps per-rank failures (a damaged shard, ...) in its own exception types
        message = str(exc).strip().splitlines()
        raise GptforgeError(f"cannot load sharded checkpoint {directory}: {message[-1] if message else exc}") from None


def load_model(model: nn.Module, ckpt: Path, *, missing_ok: tuple[str, ...] = (), no_dist: bool = False) -> None:
    """Load the weights of sharded checkpoint `ckpt` into `model` (plain, or sharded over any number of ranks:
    each rank reads only the parts of shards that overlap its own). A collective unless `no_dist`.

    Parameters whose names start with one of `missing_ok` may be absent (they keep their values).

    Raises:
        GptforgeError: missing/unexpected parameters or a shape mismatch (naming the first), or unreadable files.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    saved = _saved_tensors(ckpt / MODEL_DIR)
    mine = model_state(model)
    missing = [k for k in mine if k not in saved and not k.startswith(missing_ok)]
    unexpected = [k for k in saved if k not in mine and k not in TIED_KEYS]
    if missing or unexpected:
        raise GptforgeError(f"weights in {ckpt / MODEL_DIR} do not fit the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    for k, v in mine.items():
        if k in saved and tuple(saved[k].size) != tuple(v.shape):
            raise GptforgeError(f"weights in {ckpt / MODEL_DIR} do not fit the model: {k} has shape "
                                f"{tuple(saved[k].size)}, the model {tuple(v.shape)}")
    request = {k: v for k, v in mine.items() if k in saved}
    _dcp_load(request, ckpt / MODEL_DIR, no_dist=no_dist)
    set_model_state_dict(_unwrap(model), request, options=StateDictOptions(strict=False))


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path, info: DistInfo = SINGLE) -> None:
    """Load the optimizer state of sharded checkpoint `ckpt` (saved at any world size) into `optimizer`."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = get_optimizer_state_dict(_unwrap(model), optimizer)  # allocates the state (a zero step at lr 0)
    _dcp_load(state, ckpt / OPTIMIZER_DIR, no_dist=not info.distributed)
    set_optimizer_state_dict(_unwrap(model), optimizer, optim_state_dict=state)


def load_trainer_state(ckpt: Path, info: DistInfo) -> tuple[dict, int]:
    """This rank's trainer state (data source, RNG, scaler) and the world size that wrote the checkpoint; at
    another world size every rank gets rank 0's (a source whose state is global continues exactly)."""
    from gptforge.checkpoint.io import load_torch_file

    saved = len(list((ckpt / TRAINER_DIR).glob("rank_*.pt")))
    rank = info.rank if saved == info.world_size else 0
    return load_torch_file(ckpt / TRAINER_DIR / f"rank_{rank:05d}.pt"), saved
