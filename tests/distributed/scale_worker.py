"""Run under `torchrun --nproc_per_node 2` (FSDP2 over gloo) or as one plain process (no process group).

    init OUT       build a model the way the training loop does (meta device, a task hook that freezes the position
                   embedding and adds a head, activation checkpointing, FSDP2 when distributed), then rank 0 saves
                   the full initial weights to OUT (torch.save)
    save DIR       build, take one AdamW step on fixed random tokens, then write DIR/sharded as a sharded checkpoint
                   (every rank its shards) and DIR/consolidated as a consolidated one of the same weights (a tiny
                   BPE tokenizer trained here, so both can be exported to Hugging Face format)
"""

import sys
from pathlib import Path

import torch
from torch import nn

from gptforge.checkpoint.io import full_model_state, save_checkpoint
from gptforge.checkpoint.sharded import save_sharded
from gptforge.config import load_config
from gptforge.data.batches import Batch
from gptforge.distributed.env import barrier, init_distributed, teardown
from gptforge.tokenizer import train_bpe
from gptforge.train.loop import Task, _build_model
from gptforge.train.optim import build_optimizer
from gptforge.train.rng import capture_rng
from gptforge.train.step import train_step

TEXT = ["the quick brown fox jumps over the lazy dog. " * 20, "a stitch in time saves nine; " * 20]


class Head(nn.Linear):
    """A module a task adds on the meta device (like a classification head); initialised by reset_parameters."""


def add_head(model: nn.Module) -> None:
    model.wpe.weight.requires_grad_(False)
    model.extra_head = Head(model.cfg.d_model, 3)


def config(fsdp: bool):
    overrides = [("vocab_size", 300), ("attention_pattern", "dense"), ("seed", 7), ("activation_checkpointing", True)]
    return load_config(preset="debug", overrides=overrides + [("data_parallel", "fsdp" if fsdp else "ddp")])


def main(mode: str, out: str) -> None:
    info = init_distributed(torch.device("cpu"))
    cfg = config(info.distributed)
    hook = add_head if mode == "init" else None
    task = Task(name="test", tokenizer=None, train=None, setup_model=hook)
    model, train_model = _build_model(cfg, task, None, info)
    if mode == "init":
        state = full_model_state(model)
        if info.is_main_process:
            torch.save(state, out)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 300, (4 * info.world_size, 16), generator=g)
        rows = slice(4 * info.rank, 4 * (info.rank + 1))
        optimizer = build_optimizer(model, cfg.optim, "cpu")
        train_step(train_model, optimizer, [Batch(x[rows], x[rows].roll(-1, 1))], grad_clip=1.0, dist_info=info)
        tokenizer = train_bpe(TEXT, vocab_size=300)
        save_sharded(Path(out) / "sharded", step=1, model=model, optimizer=optimizer, cfg=cfg, tokenizer=tokenizer,
                     trainer_state={"rng": capture_rng()}, state={}, info=info).finish(info)
        state = full_model_state(model)
        if info.is_main_process:
            save_checkpoint(Path(out) / "consolidated", step=1, cfg=cfg, tokenizer=tokenizer, model_state=state)
        barrier(info)
    teardown(info)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
