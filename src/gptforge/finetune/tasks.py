"""Fine-tuning Tasks for the one training loop (`train.loop`): SFT (next-token loss on completions) and GPT-1-style
classification, both starting from the weights of `--init` (a run directory or a `gptforge import` of GPT-2).

Legend: T context_length. The model keeps the init checkpoint's architecture; the run's config contributes only
the training-time model fields (`TUNABLE_MODEL_FIELDS`: dropout, the classifier's dropout and LoRA settings) and
the data decides `n_labels`. The tokenizer is the init checkpoint's. Everything is read, tokenized and checked
before anything is written, so bad data fails with a one-line error and leaves no run directory behind.
"""

from __future__ import annotations

import dataclasses
import math
import random
from functools import partial
from pathlib import Path

from gptforge.checkpoint.io import LABELS_FILE, find_checkpoint, read_json
from gptforge.config import Config, ModelConfig, config_from_dict, validate
from gptforge.data.batches import ValSet
from gptforge.distributed.env import DistInfo
from gptforge.errors import GptforgeError
from gptforge.finetune.formats import (
    label_ids,
    label_set,
    read_classification,
    read_sft,
    tokenize_sft,
)
from gptforge.finetune.source import ExampleSource, Row, classification_row, sft_row, validation_batches
from gptforge.tokenizer import load_tokenizer
from gptforge.train.adapters import lora_hooks
from gptforge.train.loop import Task, TrainResult, train
from gptforge.train.objectives import Classification, LanguageModeling
from gptforge.utils.io import atomic_write_json
from gptforge.utils.logging import print0

# Model fields a fine-tuning run may set on top of the init checkpoint's architecture (the rest come from it).
TUNABLE_MODEL_FIELDS = ("dropout", "classifier_dropout", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def init_model_config(init: str | Path, run_model: ModelConfig, *, n_labels: int) -> ModelConfig:
    """The init checkpoint's architecture with the run's `TUNABLE_MODEL_FIELDS` and `n_labels` on top."""
    base = config_from_dict(read_json(find_checkpoint(init) / "config.json")).model
    if base.lora_r:
        raise GptforgeError(f"--init {init} has LoRA adapters (model.lora_r={base.lora_r}); fold them in first "
                            f"with: gptforge merge {init} --out NEW_RUN")
    tuned = {name: getattr(run_model, name) for name in TUNABLE_MODEL_FIELDS if hasattr(run_model, name)}
    return dataclasses.replace(base, **tuned, n_labels=n_labels)


def _encode(tokenizer, text: str, path: Path, line: int) -> list[int]:
    try:
        return tokenizer.encode(text)
    except GptforgeError as exc:
        raise GptforgeError(f"{path}:{line}: the --init model's tokenizer cannot encode this example ({exc})") \
            from None


def _split(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) with round(fraction * n) rows held out, chosen by `seed` (the file order kept)."""
    n_val = round(fraction * len(rows))
    if n_val == 0:
        return rows, []
    held = set(random.Random(seed).sample(range(len(rows)), n_val))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _sft_rows(path: Path, cfg: Config, tokenizer) -> tuple[list[Row], dict]:
    f, T = cfg.finetune, cfg.model.context_length
    examples, fmt = read_sft(path, prompt_field=f.prompt_field, completion_field=f.completion_field)
    rows, stats = [], {"format": fmt, "truncated": 0}
    for ex in examples:
        try:
            ids, scored = tokenize_sft(ex.segments, tokenizer, mask_prompt=f.mask_prompt)
        except GptforgeError as exc:
            raise GptforgeError(f"{path}:{ex.line}: the --init model's tokenizer cannot encode this example "
                                f"({exc})") from None
        row, truncated = sft_row(ids, scored, T)
        stats["truncated"] += truncated
        rows.append(row)
    return rows, stats


def _classification_rows(path: Path, cfg: Config, tokenizer, labels: list[str] | None
                         ) -> tuple[list[Row], list[str], dict]:
    f, T = cfg.finetune, cfg.model.context_length
    examples, text_field = read_classification(path, text_field=f.text_field, label_field=f.label_field)
    labels = labels or label_set(examples)
    ids = label_ids(examples, labels, path)
    rows, truncated = [], 0
    for ex, label in zip(examples, ids, strict=True):
        row, cut = classification_row(_encode(tokenizer, ex.text, path, ex.line), label, T,
                                      lm_targets=f.lm_loss_weight > 0)
        rows.append(row)
        truncated += cut
    return rows, labels, {"text_field": text_field, "truncated": truncated}


def _describe_targets(name: str, rows: list[Row]) -> str:
    tokens = sum(len(r.tokens) for r in rows)
    scored = sum(sum(t != -100 for t in r.targets) for r in rows)
    return f"{name}: {len(rows)} examples, {tokens:,} tokens, {scored:,} scored targets, {tokens - scored:,} masked"


def finetune_task(cfg: Config, info: DistInfo, ckpt: Path | None, *, data: Path, val_data: Path | None,
                  run_dir: Path) -> Task:
    """The SFT or classification Task (per `finetune.task`) for `data`; sets cfg.model from `train.init_from`
    (unless resuming), and train.max_steps / optim.warmup_steps from finetune.epochs / warmup_fraction.

    Raises:
        GptforgeError: no init checkpoint, unreadable data (naming the line and field), a label of the validation
            file outside the training labels, text the init tokenizer cannot encode, or a tokenizer larger than
            the model's vocabulary.
    """
    f, t = cfg.finetune, cfg.train
    if not t.init_from:
        raise GptforgeError("finetune needs --init RUN_DIR (a run directory, or one made by `gptforge import`)")
    source_ckpt = ckpt or find_checkpoint(t.init_from)
    tokenizer = load_tokenizer(source_ckpt)
    classify = f.task == "classify"
    if not ckpt:  # the architecture (context_length for truncation) first; n_labels once the labels are read
        cfg.model = init_model_config(t.init_from, cfg.model, n_labels=0)
        validate(cfg)  # the user's LoRA settings against the init checkpoint's architecture
    saved_labels = read_json(ckpt / LABELS_FILE)["labels"] if ckpt and classify else None
    if classify:
        rows, labels, stats = _classification_rows(data, cfg, tokenizer, saved_labels)
    else:
        (rows, stats), labels = _sft_rows(data, cfg, tokenizer), None
    if val_data is not None:
        val_rows = (_classification_rows(val_data, cfg, tokenizer, labels)[0] if classify
                    else _sft_rows(val_data, cfg, tokenizer)[0])
    else:
        rows, val_rows = _split(rows, f.val_fraction, t.seed)
    if not rows:
        raise GptforgeError(f"{data}: no training examples left after holding out finetune.val_fraction")
    if not ckpt and classify:
        cfg.model.n_labels = len(labels)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise GptforgeError(f"the tokenizer of {source_ckpt} has {tokenizer.vocab_size} tokens but the model's "
                            f"vocab_size is {cfg.model.vocab_size}")
    per_step = t.micro_batch_size * info.world_size * cfg.grad_accum_steps(info.world_size)
    if f.epochs > 0 and not ckpt:
        t.max_steps = max(1, math.ceil(f.epochs * len(rows) / per_step))
        print0(f"note: train.max_steps = {t.max_steps} ({f.epochs:g} epochs of {len(rows)} examples, "
               f"{per_step} per step)")
    if f.warmup_fraction > 0 and not ckpt:
        cfg.optim.warmup_steps = max(1, round(f.warmup_fraction * t.max_steps))
    print0(_describe_targets(f"{f.task} train ({stats.get('format', stats.get('text_field'))})", rows))
    if stats["truncated"]:
        print0(f"note: {stats['truncated']} examples of {data} were longer than context_length "
               f"{cfg.model.context_length} and were truncated")
    if val_rows:
        print0(_describe_targets(f"{f.task} val", val_rows))
    pad = tokenizer.eot_id
    common = dict(micro_batch_size=t.micro_batch_size, pad_id=pad, rank=info.rank, world_size=info.world_size)
    source = ExampleSource(rows, seed=t.seed, **common)
    val_sets: dict[str, ValSet] = {"val": partial(validation_batches, val_rows, **common)} if val_rows else {}
    if classify:
        print0(f"labels: {', '.join(f'{i}={name}' for i, name in enumerate(labels))}")
        objective = Classification(len(labels), f.lm_loss_weight)
    else:
        objective = LanguageModeling()

    # LoRA: the base frozen on the meta device, the classification head trained in full with the adapters
    setup_model, save_adapter = lora_hooks(("score.",) if classify else ()) if cfg.model.lora_r else (None, None)

    def save_extra(directory: Path) -> None:
        if save_adapter is not None:
            save_adapter(directory)
        if labels is not None:
            for target in (directory / LABELS_FILE, run_dir / LABELS_FILE):
                atomic_write_json(target, {"labels": labels, "text_field": stats["text_field"]})

    return Task(name=f.task, tokenizer=tokenizer, train=source, val_sets=val_sets, objective=objective,
                init_missing_ok=("score.",) if classify else (), save_extra=save_extra, log_stats=source.log_stats,
                setup_model=setup_model)


def finetune(cfg: Config, data: str | Path, run_dir: str | Path, *, init: str | Path | None = None,
             val_data: str | Path | None = None, progress: bool = True, resume: str | None = None) -> TrainResult:
    """Fine-tune the model of `init` (or `cfg.train.init_from`) on labeled data; see docs/finetuning.md.

    Args:
        cfg: the run config; `finetune.task` is "sft" or "classify".
        data: the training file (SFT: JSONL; classification: TSV, CSV or JSONL).
        run_dir: where checkpoints, metrics and (classification) labels.json go.
        init: a run directory or checkpoint to start from (sets cfg.train.init_from).
        val_data: a validation file in the same format; None holds out `finetune.val_fraction` of `data`.
        resume: "latest" or a checkpoint directory, as for pretraining.

    Raises:
        GptforgeError: bad data or config (see `finetune_task`), or any error of `train.loop.train`.
    """
    if init is not None:
        cfg.train.init_from = str(init)
    make_task = partial(finetune_task, data=Path(data), val_data=Path(val_data) if val_data else None,
                        run_dir=Path(run_dir))
    return train(cfg, make_task, run_dir, progress=progress, resume=resume)
