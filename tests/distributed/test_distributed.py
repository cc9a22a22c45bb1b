"""Two CPU processes with gloo, launched by torchrun: DDP equals one big batch; FSDP2 save/reload continues
identically; a SIGKILLed DDP run resumes bitwise exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint.io import find_resume_checkpoint, load_checkpoint
from gptforge.data.batches import Batch
from gptforge.train.step import compute_gradients

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.distributed


def torchrun(*args, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("micro_steps", [1, 2])
def test_ddp_two_ranks_equal_one_process_with_the_whole_batch(tmp_path, micro_steps):
    sys.path.insert(0, str(HERE))
    import ddp_worker

    proc = torchrun(HERE / "ddp_worker.py", tmp_path / "ddp.pt", micro_steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    x, y = ddp_worker.global_batch(micro_steps)
    m = ddp_worker.model()
    loss = compute_gradients(m, [Batch(x, y)]).loss
    assert abs(ddp["loss"] - loss) < 1e-6
    for k, p in m.named_parameters():
        torch.testing.assert_close(ddp["grads"][k], p.grad, rtol=0, atol=1e-6)


def pretrain_args(char_data, out, *extra):
    return ["-m", "gptforge", "pretrain", "--preset", "debug", "--data", char_data, "--out", out, "--quiet",
            "--global_batch_tokens", 256, "--log_interval", 1, "--eval_interval", 5, *extra]


def weights(run_dir):
    return load_checkpoint(find_resume_checkpoint(run_dir))[0].state_dict()  # either checkpoint format


@pytest.mark.slow  # ~30-40 s; test_scale.py's killed FSDP run resuming bitwise covers the default path
def test_fsdp_saves_reloads_and_continues_identically(char_data, tmp_path):
    common = ["--data_parallel", "fsdp", "--checkpoint_interval", 5]
    full = torchrun(*pretrain_args(char_data, tmp_path / "full", "--max_steps", 10, *common))
    assert full.returncode == 0, full.stderr[-3000:]
    half = torchrun(*pretrain_args(char_data, tmp_path / "half", "--max_steps", 5, *common))
    assert half.returncode == 0, half.stderr[-3000:]
    resumed = torchrun(*pretrain_args(char_data, tmp_path / "half", "--max_steps", 10, *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "half")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the consolidated FSDP checkpoint loads in a single process at world size 1
    single = subprocess.run([sys.executable, *map(str, pretrain_args(char_data, tmp_path / "half", "--max_steps", 12,
                                                                     *common, "--resume"))],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]


def test_val_loss_at_two_ranks_equals_one_process(char_data, tmp_path):
    """Same global batch, same validation tokens: 2-rank DDP and a single process report the same val loss."""
    args = ["--max_steps", 5, "--eval_interval", 5, "--eval_tokens", 4096, "--checkpoint_interval", 5]
    two = torchrun(*pretrain_args(char_data, tmp_path / "two", *args))
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *map(str, pretrain_args(char_data, tmp_path / "one", *args))],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    def val(run):
        return [json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
                if "val_loss" in json.loads(x)][-1]

    assert abs(val(tmp_path / "two") - val(tmp_path / "one")) < 1e-5


def test_killed_ddp_run_resumes_exactly(char_data, tmp_path):
    args = ["--max_steps", 40, "--checkpoint_interval", 6, "--dropout", 0.1]
    ref = torchrun(*pretrain_args(char_data, tmp_path / "ref", *args))
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *map(str, pretrain_args(char_data, tmp_path / "run", *args))]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 15:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = torchrun(*pretrain_args(char_data, tmp_path / "run", *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows]

    assert losses(tmp_path / "ref") == losses(tmp_path / "run")
