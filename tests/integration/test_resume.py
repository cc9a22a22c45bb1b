"""Fault tolerance: SIGKILL + --resume is bitwise exact, damaged checkpoints fall back, pickles are refused,
non-finite steps are skipped and stop the run."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_mid_run
from gptforge.checkpoint.io import find_resume_checkpoint, load_torch_file
from gptforge.config import load_config
from gptforge.errors import GptforgeError
from gptforge.train import objectives
from gptforge.train.guards import SpikeFilter
from gptforge.train.pretrain import pretrain

ARGS = ["--preset", "debug", "--max_steps", "60", "--checkpoint_interval", "7", "--eval_interval", "10",
        "--log_interval", "1", "--dropout", "0.1", "--global_batch_tokens", "128", "--keep_checkpoints", "2"]


def cli(*args):
    return [sys.executable, "-m", "gptforge", *map(str, args)]


def final_weights(run_dir):
    ckpt = find_resume_checkpoint(run_dir)
    return load_file(str(ckpt / "model.safetensors")), ckpt.name


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows]


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(cli("pretrain", *ARGS, "--data", char_data, "--out", out, "--quiet"), check=True, capture_output=True)
    return out


def test_sigkill_then_resume_is_bitwise_identical(char_data, reference, tmp_path):
    out = tmp_path / "run"
    kill_mid_run(["pretrain", *ARGS, "--data", char_data, "--out", out, "--quiet"], out / "metrics.jsonl",
                 lines=(9, 45))
    subprocess.run(cli("pretrain", *ARGS, "--data", char_data, "--out", out, "--quiet", "--resume"), check=True,
                   capture_output=True)
    ref_w, ref_name = final_weights(reference)
    got_w, got_name = final_weights(out)
    assert ref_name == got_name == "step_00000060"
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert losses(out) == losses(reference)


def test_resume_falls_back_past_a_corrupt_checkpoint(reference, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    newest = sorted((run / "checkpoints").iterdir())[-1]
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[:-100])  # truncated
    assert find_resume_checkpoint(run) == sorted((run / "checkpoints").iterdir())[-2]
    with pytest.raises(GptforgeError, match=r"corrupt or truncated.*model\.safetensors"):
        find_resume_checkpoint(newest)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/gptforge_pwned",))


def test_malicious_pickle_is_refused(reference, tmp_path):
    path = tmp_path / "optimizer.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state": Evil()}, fh)
    if os.path.exists("/tmp/gptforge_pwned"):
        os.remove("/tmp/gptforge_pwned")
    with pytest.raises(GptforgeError, match="refusing to load .*optimizer.pt"):
        load_torch_file(path)
    assert not os.path.exists("/tmp/gptforge_pwned")
    # and resuming from a checkpoint whose optimizer.pt was swapped for a pickle fails cleanly
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    newest = sorted((run / "checkpoints").iterdir())[-1]
    shutil.copy(path, newest / "optimizer.pt")
    with pytest.raises(GptforgeError, match="sha256 mismatch"):
        find_resume_checkpoint(newest)


def test_best_checkpoint_is_kept(reference):
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    best = (reference / "best").read_text().strip()
    assert names[-2:] == ["step_00000056", "step_00000060"] and best in names  # newest 2 plus the best
    assert len(names) == (2 if best in names[-2:] else 3)
    vals = {n: json.loads((reference / "checkpoints" / n / "state.json").read_text())["val_loss"] for n in names}
    assert vals[best] == min(vals.values())


def test_non_finite_steps_are_skipped_then_stop_the_run(char_data, tmp_path, monkeypatch):
    real = objectives.loss_sum
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        out = real(logits, targets)
        return out * float("nan") if calls["n"] > 8 else out  # steps 1-2 fine (4 micro-steps each), then NaN

    monkeypatch.setattr(objectives, "loss_sum", poisoned)
    cfg = load_config(preset="debug", overrides=[("max_steps", 50), ("max_nonfinite_steps", 3),
                                                 ("global_batch_tokens", 256), ("checkpoint_interval", 1)])
    with pytest.raises(GptforgeError, match="3 steps in a row had a non-finite loss"):
        pretrain(cfg, char_data, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows if r["step"] > 2] == ["non-finite loss"] * 3
    for ckpt in (tmp_path / "run" / "checkpoints").iterdir():  # no checkpoint holds a NaN
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


def test_spike_filter():
    spike = SpikeFilter(zscore=3.0, window=5)
    assert [spike(v) for v in (2.0, 2.1, 1.9, 2.0, 2.05)] == [None] * 5
    assert spike(9.0).startswith("loss spike") and spike(2.02) is None


def test_compile_on_cpu(char_data, tmp_path):
    cfg = load_config(preset="debug", overrides=[("max_steps", 4), ("compile", "true"), ("eval_interval", 4)])
    result = pretrain(cfg, char_data, tmp_path / "run", progress=False)
    assert result.steps == 4 and result.val_loss < 4.3  # ln(66) = 4.19 at init


def test_activation_checkpointing_matches_plain(char_data, tmp_path):
    plain = pretrain(load_config(preset="debug", overrides=[("max_steps", 3)]), char_data, tmp_path / "a",
                          progress=False)
    ckpt = pretrain(load_config(preset="debug", overrides=[("max_steps", 3), ("activation_checkpointing", "true")]),
                         char_data, tmp_path / "b", progress=False)
    assert abs(plain.val_loss - ckpt.val_loss) < 1e-6
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000003" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_inference_load_skips_a_damaged_checkpoint_and_ignores_training_only_files(reference, tmp_path):
    from gptforge.checkpoint.io import load_checkpoint

    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    older, newest = sorted((run / "checkpoints").iterdir())[-2:]
    (newest / "optimizer.pt").write_bytes(b"garbage")  # not needed for inference
    assert load_checkpoint(run)[3]["step"] == 60
    (newest / "model.safetensors").write_bytes(b"\0" * 10)
    assert load_checkpoint(run)[3]["step"] == int(older.name.split("_")[1])
    with pytest.raises(GptforgeError, match="model.safetensors"):
        load_checkpoint(newest)


def test_latest_naming_a_deleted_checkpoint_warns_and_falls_back(reference, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    (run / "latest").write_text("step_00000099\n")
    assert find_resume_checkpoint(run).name == "step_00000060"
    assert "latest names step_00000099, which does not exist; using step_00000060" in capsys.readouterr().err
