"""Tensor parallelism on CPU ranks (gloo): 2 ranks (tp 2) and 4 ranks (FSDP2 over dp 2 x tp 2, a 2-D mesh) give
the losses and gradients of one process, from the same seeded initialisation; `gptforge pretrain
--tensor_parallel 2` trains like one process and writes a sharded checkpoint that one process reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint.io import load_checkpoint

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.distributed


def run(out: Path, ranks: int) -> dict:
    prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    proc = subprocess.run([sys.executable, *prefix, str(HERE / "tp_worker.py"), str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("tp") / "one.pt", 1)


@pytest.mark.parametrize("ranks", [2, 4], ids=["tp2", "fsdp2xtp2"])
def test_tensor_parallel_matches_one_process(single, tmp_path, ranks):
    got = run(tmp_path / "tp.pt", ranks)
    assert len(got["losses"]) == 3 and single["losses"][0] > 5.0  # untrained: about ln(256)
    assert all(abs(a - b) < 1e-6 for a, b in zip(got["losses"], single["losses"])), (got["losses"], single["losses"])
    assert sorted(got["grads"]) == sorted(single["grads"])
    for name, grad in single["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=1e-6, msg=name)


def test_pretrain_with_tensor_parallel_trains_like_one_process(char_data, tmp_path):
    args = ["-m", "gptforge", "pretrain", "--preset", "debug", "--data", char_data, "--quiet", "--max_steps", 6,
            "--global_batch_tokens", 256, "--log_interval", 1, "--eval_interval", 6, "--checkpoint_interval", 6]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, prefix in ((tmp_path / "one", []), (tmp_path / "tp", ["-m", "torch.distributed.run", "--standalone",
                                                                    "--nproc_per_node", "2"])):
        extra = ["--tensor_parallel", "2"] if prefix else []
        proc = subprocess.run([sys.executable, *prefix, *map(str, args), "--out", str(out), *extra],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def log(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    one, tp = log(tmp_path / "one"), log(tmp_path / "tp")
    assert [r["step"] for r in tp] == [r["step"] for r in one] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, tp):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-6 and a["tokens_seen"] == b["tokens_seen"]
    assert abs(one[-1]["val_loss"] - tp[-1]["val_loss"]) < 1e-6
    a, b = load_checkpoint(tmp_path / "one")[0].state_dict(), load_checkpoint(tmp_path / "tp")[0].state_dict()
    for name, value in a.items():  # the sharded tensor-parallel checkpoint consolidates in one process
        torch.testing.assert_close(b[name], value, rtol=0, atol=1e-6, msg=name)
