"""LoRA under torchrun (2 CPU ranks, gloo): DDP and FSDP2 train the adapters as one process does and never touch
the frozen base."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptforge.checkpoint.io import find_resume_checkpoint

pytestmark = pytest.mark.distributed
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pretrain(char_data, out, *extra, ranks: int):
    prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if ranks == 2 else []
    args = ["-m", "gptforge", "pretrain", "--preset", "debug", "--data", char_data, "--out", out, "--quiet",
            "--global_batch_tokens", 256, "--log_interval", 1, "--eval_interval", 5, "--checkpoint_interval", 6,
            *extra]
    proc = subprocess.run([sys.executable, *prefix, *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def test_lora_under_ddp_and_fsdp_equals_one_process(char_data, tmp_path):
    base = tmp_path / "base"
    pretrain(char_data, base, "--max_steps", 3, ranks=1)
    lora = ["--max_steps", 6, "--init_from", base, "--lora_r", 4, "--lora_targets", "qkv,mlp_fc", "--lr", "1e-2",
            "--warmup_steps", 0, "--checkpoint_format", "consolidated"]
    runs = {"one": tmp_path / "one", "ddp": tmp_path / "ddp", "fsdp": tmp_path / "fsdp"}
    pretrain(char_data, runs["one"], *lora, ranks=1)
    pretrain(char_data, runs["ddp"], *lora, "--data_parallel", "ddp", ranks=2)
    pretrain(char_data, runs["fsdp"], *lora, "--data_parallel", "fsdp", ranks=2)
    base_w = load_file(str(find_resume_checkpoint(base) / "model.safetensors"))
    want = losses(runs["one"])
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    for name, run in runs.items():
        got = losses(run)
        assert all(abs(got[s] - want[s]) < 1e-4 for s in want), (name, got, want)
        ckpt = find_resume_checkpoint(run)
        w = load_file(str(ckpt / "model.safetensors"))
        assert all(torch.equal(base_w[k], w[k]) for k in base_w), name  # the base is frozen on every rank
        adapter = load_file(str(ckpt / "adapter.safetensors"))
        assert sorted(adapter) == sorted(k for k in w if "lora" in k) and adapter["blocks.0.mlp.fc.lora_B"].abs().max() > 0
        optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
        assert sorted(optimizer["state"]) == sorted(adapter), name  # no optimizer state for frozen weights
