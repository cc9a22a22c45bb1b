"""Scale features on 2 CPU processes (gloo, torchrun): meta-device init equal at any world size, sharded
checkpoints that reshard 2 -> 1 and 1 -> 2 ranks, fall back past a damaged shard, feed export and generate, and
resume bitwise exactly after SIGKILL (with background writes)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gptforge
from gptforge.checkpoint.convert import export_hf
from gptforge.checkpoint.io import load_checkpoint, read_json
from gptforge.model.gpt import GPT

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.distributed
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}


def launch(*args, ranks: int = 2):
    """`python -m gptforge ...` or a worker script, under torchrun with 2 ranks, or as one plain process."""
    prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if ranks == 2 else []
    proc = subprocess.run([sys.executable, *prefix, *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    # a failure shows the lines that name it (an abort's message sits above torchrun's summary) and the tail
    named = [line for line in proc.stderr.splitlines() if any(w in line for w in ("terminate", "Error", "error:"))]
    assert proc.returncode == 0, "\n".join(named[:20]) + "\n" + proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def pretrain(char_data, out, *extra, ranks: int):
    args = ["-m", "gptforge", "pretrain", "--preset", "debug", "--data", char_data, "--out", out, "--quiet",
            "--global_batch_tokens", 256, "--log_interval", 1, "--eval_interval", 5, "--checkpoint_interval", 5,
            "--keep_checkpoints", 10, *extra]
    return launch(*args, *(["--data_parallel", "fsdp"] if ranks == 2 else []), ranks=ranks)


def losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def weights(run):
    return load_checkpoint(run)[0].state_dict()


@pytest.fixture(scope="module")
def one_rank(char_data, tmp_path_factory):
    """10 steps in one process, written as sharded checkpoints at steps 5 and 10."""
    out = tmp_path_factory.mktemp("one") / "run"
    pretrain(char_data, out, "--max_steps", 10, "--checkpoint_format", "sharded", ranks=1)
    return out


@pytest.fixture(scope="module")
def two_ranks(char_data, tmp_path_factory):
    """10 steps on 2 ranks with FSDP2 (sharded checkpoints by default) at steps 5 and 10."""
    out = tmp_path_factory.mktemp("two") / "run"
    pretrain(char_data, out, "--max_steps", 10, ranks=2)
    return out


def test_meta_device_init_is_bitwise_the_same_at_any_world_size(tmp_path):
    launch(HERE / "scale_worker.py", "init", tmp_path / "two.pt", ranks=2)
    launch(HERE / "scale_worker.py", "init", tmp_path / "one.pt", ranks=1)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert sorted(two) == sorted(one) and "extra_head.weight" in two  # the task hook's module is there
    assert all(torch.equal(two[k], one[k]) for k in one)
    sys.path.insert(0, str(HERE))
    from scale_worker import config

    plain = GPT(config(False).model)
    plain.init_weights(seed=7)
    for name, value in plain.state_dict().items():  # a plain CPU model with init_weights(7): the same values
        assert torch.equal(two[name], value), name
    assert 0.05 < two["extra_head.weight"].std() < 0.2  # nn.Linear's reset_parameters, not garbage or zeros


def test_sharded_checkpoints_reshard_from_two_ranks_to_one_and_back(char_data, one_rank, two_ranks, tmp_path):
    five = "checkpoints/step_00000005"
    assert read_json(one_rank / five / "state.json")["world_size"] == 1
    state = read_json(two_ranks / five / "state.json")
    assert state["format"] == "sharded" and state["world_size"] == 2 and state["schema_version"] == 2
    assert {"model/__0_0.distcp", "model/__1_0.distcp", "optimizer/__1_0.distcp"} <= set(state["files"])
    to_one = pretrain(char_data, tmp_path / "to_one", "--max_steps", 10, "--resume", two_ranks / five, ranks=1)
    assert "checkpoint was written by 2 ranks, now 1" in to_one.stdout + to_one.stderr
    pretrain(char_data, tmp_path / "to_two", "--max_steps", 10, "--resume", one_rank / five, ranks=2)
    for resumed, reference in ((tmp_path / "to_one", one_rank), (tmp_path / "to_two", two_ranks)):
        got, want = losses(resumed), losses(reference)
        assert sorted(got) == [6, 7, 8, 9, 10]
        assert all(abs(got[s] - want[s]) < 1e-6 for s in got), (got, want)


def test_a_truncated_shard_makes_resume_fall_back_with_a_one_line_note(char_data, two_ranks, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_ranks, run)
    shard = run / "checkpoints" / "step_00000010" / "model" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-64])
    proc = pretrain(char_data, run, "--max_steps", 10, "--resume", ranks=2)
    log = proc.stdout + proc.stderr
    notes = [line for line in log.splitlines() if "damaged" in line]
    assert notes == [f"warning: skipping damaged checkpoint: checkpoint file is corrupt or truncated (sha256 "
                     f"mismatch): {shard}"]
    assert f"resuming from {run / 'checkpoints' / 'step_00000005'}" in log
    a, b = weights(run), weights(two_ranks)  # steps 6-10 retrained at the same world size: bitwise the same
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_and_generate_read_a_sharded_checkpoint(tmp_path):
    launch(HERE / "scale_worker.py", "save", tmp_path, ranks=2)
    sharded, consolidated = tmp_path / "sharded", tmp_path / "consolidated"
    a, b = weights(sharded), weights(consolidated)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (load_file(str(export_hf(run, tmp_path / f"hf_{run.name}") / "model.safetensors"))
              for run in (sharded, consolidated))
    assert sorted(ea) == sorted(eb) and all(torch.equal(ea[k], eb[k]) for k in ea)
    texts = [gptforge.load(run).generate("the quick", max_new_tokens=12, temperature=0) for run in (sharded,
                                                                                                consolidated)]
    assert texts[0] == texts[1] and len(texts[0]) > 0
    cli = subprocess.run([sys.executable, "-m", "gptforge", "generate", sharded, "--prompt", "the quick",
                          "--temperature", "0", "--max_new_tokens", "12"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and cli.stdout.strip() == "the quick" + texts[0], cli.stderr[-2000:]
    assert "Warning" not in cli.stderr


def test_killed_fsdp_run_resumes_bitwise_exactly_from_background_sharded_checkpoints(char_data, tmp_path):
    args = ["--max_steps", 24, "--checkpoint_interval", 4, "--dropout", 0.1]
    pretrain(char_data, tmp_path / "ref", *args, ranks=2)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gptforge",
           "pretrain", "--preset", "debug", "--data", char_data, "--out", run, "--quiet", "--global_batch_tokens", 256,
           "--log_interval", 1, "--eval_interval", 5, "--data_parallel", "fsdp", "--async_checkpoint", "true", *args]
    proc = subprocess.Popen(list(map(str, cmd)), env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics, deadline = run / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run / "latest").is_file() and metrics.is_file() and len(metrics.read_text().splitlines()) >= 10:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    pretrain(char_data, run, *args, "--async_checkpoint", "true", "--resume", ranks=2)
    a, b = weights(tmp_path / "ref"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "ref") == losses(run)
