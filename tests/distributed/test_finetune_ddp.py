"""Fine-tuning under torchrun: 2 DDP ranks (gloo, CPU) give the weights and validation metrics of one process
with the same global batch (dropout off: ranks draw their own masks), for classification (score head + auxiliary LM loss) and SFT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.integration.test_finetune import data  # noqa: F401  (the fixture: SST-2/GSM8K subsets, a tiny base)

from gptforge.checkpoint.io import find_resume_checkpoint, load_checkpoint

pytestmark = pytest.mark.distributed
ARGS = ["--quiet", "--epochs", 0, "--max_steps", 4, "--micro_batch_size", 4, "--global_batch_size", 16,
        "--eval_interval", 2, "--checkpoint_interval", 4, "--lr", 1e-3, "--dropout", 0, "--classifier_dropout", 0, "--log_interval", 1]


def run(nproc, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run([*head, "-m", "gptforge", "finetune", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def val_metrics(out: Path):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


@pytest.mark.parametrize("task", ["classify", "sft"])
def test_two_ranks_equal_one_process(data, tmp_path, task):  # noqa: F811
    files = (["--data", data / "train.tsv", "--val_data", data / "dev.tsv"] if task == "classify" else
             ["--data", data / "gsm.jsonl", "--prompt_field", "question", "--completion_field", "answer"])
    common = ["--init", data / "base", "--task", task, *files, *ARGS]
    run(1, *common, "--out", tmp_path / "one")
    run(2, *common, "--out", tmp_path / "two")
    a = load_checkpoint(find_resume_checkpoint(tmp_path / "one"))[0].state_dict()
    b = load_checkpoint(find_resume_checkpoint(tmp_path / "two"))[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5, msg=k)
    for x, y in zip(val_metrics(tmp_path / "one"), val_metrics(tmp_path / "two"), strict=True):
        assert x["step"] == y["step"] and x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-5)
        if task == "classify":
            assert x["val_accuracy"] == y["val_accuracy"] and x["val_macro_f1"] == pytest.approx(y["val_macro_f1"])
