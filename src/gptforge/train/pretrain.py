"""Pretraining: the training loop (`train.loop`) over random windows of prepared token files.

Legend: T context_length. This module only builds the pretraining `Task`: the data's tokenizer, the window
source (one corpus: `WindowSource`; a weighted mixture: `MixtureSource`, logging tokens seen and epochs per
source), the validation windows (one set per source of a mixture), and the model config's vocabulary
reconciled with the data's. Shards are read through memory maps; their checksums are verified at start.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from gptforge.checkpoint.io import find_checkpoint, read_json
from gptforge.config import Config, ModelConfig, config_from_dict, validate
from gptforge.data.dataset import MixtureSource, WindowSource, validation_windows
from gptforge.data.shards import load_meta, open_sources, verify_checksums
from gptforge.distributed.env import DistInfo
from gptforge.errors import GptforgeError
from gptforge.tokenizer import load_tokenizer
from gptforge.train.adapters import lora_hooks
from gptforge.train.loop import Task, TrainResult, train
from gptforge.utils.logging import print0

LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def _init_model_config(init_from: str, meta: dict, user: ModelConfig) -> ModelConfig:
    """The model section of the checkpoint to start from, with the user's lora_* fields on top (continued
    pretraining with LoRA adapters); its vocabulary must match the data's tokenizer.

    Raises:
        GptforgeError: a vocabulary mismatch, a checkpoint that itself has adapters (merge it first), or LoRA
        settings the checkpoint's architecture does not allow (banded attention, shared layers).
    """
    ckpt = find_checkpoint(init_from)
    model_cfg = config_from_dict(read_json(ckpt / "config.json")).model
    if model_cfg.lora_r:
        raise GptforgeError(f"train.init_from={init_from} has LoRA adapters (model.lora_r={model_cfg.lora_r}); "
                            f"fold them in first with: gptforge merge {init_from} --out NEW_RUN")
    model_cfg = dataclasses.replace(model_cfg, **{f: getattr(user, f) for f in LORA_FIELDS})
    if model_cfg.vocab_size != meta["vocab_size"]:
        raise GptforgeError(f"train.init_from={init_from} has vocab_size {model_cfg.vocab_size} but the data was "
                            f"tokenized with vocab_size {meta['vocab_size']}; prepare the data with "
                            f"--tokenizer {ckpt} to reuse the model's tokenizer")
    return model_cfg


def pretrain_task(cfg: Config, info: DistInfo, ckpt: Path | None, *, data_dir: Path) -> Task:
    """The pretraining Task for `data_dir` (made by `gptforge prepare`); sets cfg.model from `init_from` or the
    data's vocabulary.

    Raises:
        GptforgeError: missing or corrupt data, a vocabulary that does not match a checkpoint, or a training split
        shorter than one window.
    """
    t = cfg.train
    meta, tokenizer = load_meta(data_dir), load_tokenizer(data_dir)
    verify_checksums(data_dir, meta)
    if t.init_from and not ckpt:
        cfg.model = _init_model_config(t.init_from, meta, cfg.model)
        validate(cfg)  # the user's LoRA settings against the checkpoint's architecture
    elif cfg.model.vocab_size != meta["vocab_size"]:
        if ckpt:
            raise GptforgeError(f"cannot resume: the checkpoint's vocab_size is {cfg.model.vocab_size}, the data's "
                                f"{meta['vocab_size']} (resume with the data the run was started on)")
        print0(f"note: model.vocab_size set to {meta['vocab_size']} from the data's tokenizer "
               f"(config had {cfg.model.vocab_size})")
        cfg.model.vocab_size = meta["vocab_size"]
    T = cfg.model.context_length
    sources = open_sources(data_dir, meta)
    common = dict(context_length=T, micro_batch_size=t.micro_batch_size, rank=info.rank, world_size=info.world_size)
    if len(sources) == 1:
        source = WindowSource(sources[0].train, seed=t.seed, **common)
    else:
        source = MixtureSource([s.train for s in sources], [s.weight for s in sources], [s.name for s in sources],
                               seed=t.seed, **common)
    val_sets = {}
    for s in sources:
        name = "val" if len(sources) == 1 else s.name
        if len(s.val) > T:
            val_sets[name] = partial(validation_windows, s.val, max_tokens=t.eval_tokens, **common)
        else:
            print0(f"warning: the validation split of {s.name} has {len(s.val)} tokens, fewer than context_length + 1 "
                   f"= {T + 1}; no val loss will be computed for it (prepare with a larger --val_fraction)")
    setup_model, save_extra = lora_hooks() if cfg.model.lora_r else (None, None)
    return Task(name="pretrain", tokenizer=tokenizer, train=source, val_sets=val_sets, fixed_shape=True,
                log_stats=source.log_stats if isinstance(source, MixtureSource) else None,
                setup_model=setup_model, save_extra=save_extra)


def pretrain(cfg: Config, data_dir: str | Path, run_dir: str | Path, *, progress: bool = True,
             resume: str | None = None) -> TrainResult:
    """Train a GPT on prepared token files, writing checkpoints and metrics into `run_dir`.

    Runs as one process, or as one rank of a torchrun job (DDP or FSDP2 per `train.data_parallel`).
    `resume` is "latest" (the newest intact checkpoint in run_dir) or a checkpoint directory.

    Raises:
        GptforgeError: missing/corrupt data or checkpoint, a split shorter than one window, or too many
        non-finite steps in a row.
    """
    return train(cfg, partial(pretrain_task, data_dir=Path(data_dir)), run_dir, progress=progress, resume=resume)
