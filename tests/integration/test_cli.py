"""prepare -> pretrain -> generate through the real command line, on real text, plus every bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import gptforge
from conftest import skip_without_shared_data_msg


def run(*args, env_extra=None, check=True):
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "gptforge", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A small BPE model trained for a few steps on the first 60 KB of Tiny Shakespeare."""
    from conftest import shared_data_dir

    src = shared_data_dir() / "tinyshakespeare" / "input.txt"
    if not src.is_file():
        skip_without_shared_data_msg("shared data not found")
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "shakespeare_head.txt"
    corpus.write_bytes(src.read_bytes()[:60_000])
    run("prepare", "--corpus", corpus, "--tokenizer", "bpe", "--vocab_size", 512, "--out", root / "data", "--quiet")
    run("pretrain", "--preset", "debug", "--data", root / "data", "--out", root / "run", "--max_steps", 30,
        "--context_length", 32, "--d_model", 64, "--lr", "3e-3", "--checkpoint_interval", 20, "--quiet")
    return root


def test_pipeline_outputs(trained_run):
    meta = json.loads((trained_run / "data" / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    lines = [json.loads(line) for line in (trained_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 5 and {"train_loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(lines[0])
    vals = [r["val_loss"] for r in lines if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] < 6.3  # ln(512) = 6.24 at init; learning happened
    assert lines[-1]["step"] == 30
    ckpts = sorted(p.name for p in (trained_run / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_00000020", "step_00000030"]
    assert (trained_run / "run" / "latest").read_text().strip() == "step_00000030"
    assert (trained_run / "run" / "config.yaml").is_file()


def test_generate_cli_and_api_agree(trained_run):
    run_dir = trained_run / "run"
    proc = run("generate", run_dir, "--prompt", "ROMEO:", "--max_new_tokens", 20, "--temperature", 0)
    lm = gptforge.load(run_dir)
    expected = "ROMEO:" + lm.generate("ROMEO:", max_new_tokens=20, temperature=0)
    assert proc.stdout == expected + "\n"
    streamed = run("generate", run_dir, "--prompt", "ROMEO:", "--max_new_tokens", 20, "--temperature", 0, "--stream")
    assert streamed.stdout == expected + "\n"
    tokens = lm.tokenizer.encode("First Citizen:")
    logits = lm.model(__import__("torch").tensor([tokens]))
    assert logits.shape == (1, len(tokens), 512)


def test_generate_seeded_and_batched(trained_run):
    run_dir = trained_run / "run"
    args = ["generate", run_dir, "--prompt", "To be", "--prompt", "KING:", "--max_new_tokens", 15, "--seed", 3,
            "--top_k", 40, "--top_p", 0.9]
    a, b = run(*args).stdout, run(*args).stdout
    assert a == b and a.count("-" * 40) == 1


def test_generate_stop_strings_both_forms(trained_run):
    """`--stop A B` and `--stop A --stop B` are the same two stop strings; the output ends before the first one."""
    run_dir = trained_run / "run"
    lm = gptforge.load(run_dir)
    free = lm.generate("ROMEO:", max_new_tokens=40, temperature=0)
    first, second = free[3:5], free[10:12]  # two pieces of text the greedy continuation contains
    cut = min(free.index(first), free.index(second))
    base = ["generate", run_dir, "--prompt", "ROMEO:", "--max_new_tokens", 40, "--temperature", 0]
    one_flag = run(*base, "--stop", second, first).stdout
    two_flags = run(*base, "--stop", first, "--stop", second).stdout
    assert one_flag == two_flags == "ROMEO:" + free[:cut] + "\n"


@pytest.mark.parametrize("args,message", [
    (["prepare", "--corpus", "/no/such/file.txt", "--out", "{tmp}/d", "--quiet"], "corpus not found"),
    (["prepare", "--corpus", "{tmp}/empty.txt", "--out", "{tmp}/d", "--quiet"], "empty"),
    (["prepare", "--corpus", "{tmp}/empty.txt", "--out", "{tmp}/d", "--val_fraction", "0.9", "--quiet"],
     "val_fraction"),
    (["pretrain", "--preset", "debug", "--data", "{tmp}/nodata", "--out", "{tmp}/r"], "nodata"),
    (["pretrain", "--preset", "debgu", "--data", "{run}/../data", "--out", "{tmp}/r"], "did you mean 'debug'"),
    (["pretrain", "--preset", "debug", "--data", "{run}/../data", "--out", "{tmp}/r", "--n_hed", "2"],
     "did you mean 'n_head'"),
    (["pretrain", "--preset", "debug", "--data", "{run}/../data", "--out", "{tmp}/r", "--n_head", "3"],
     "model.n_head=3 must divide"),
    (["pretrain", "--data", "{run}/../data", "--out", "{tmp}/r"], "exactly one of --preset"),
    (["pretrain", "--data", "{run}/../data", "--out", "{tmp}/r", "--resume"], "no checkpoint in"),
    (["pretrain", "--data", "{run}/../data", "--out", "{tmp}/r", "--resume", "{tmp}/corrupt"], "sha256 mismatch"),
    (["pretrain", "--preset", "debug", "--data", "{run}/../data", "--out", "{run}", "--resume", "--n_layer", "3"],
     "cannot resume: model.n_layer=3"),
    (["generate", "{tmp}/missing_run", "--prompt", "x"], "not found"),
    (["generate", "{run}", "--prompt", "x" * 2000], "context_length is 32"),
    (["generate", "{run}", "--prompt", "x", "--top_p", "0"], "top_p must be in (0, 1]"),
    (["generate", "{run}", "--prompt", "x", "--temperature", "-1"], "temperature must be a number >= 0"),
    (["generate", "{tmp}/corrupt", "--prompt", "x"], "corrupt"),
    (["pretrain", "--preset", "debug", "--data", "{run}/../data", "--out", "{run}"], "already holds checkpoints"),
    (["pretrain", "--config", "{tmp}/empty.txt", "--data", "{run}/../data", "--out", "{tmp}/r"], "is empty"),
    (["prepare", "--corpus", "{tmp}/c.txt.gz", "--out", "{tmp}/d", "--quiet"], "gzip-compressed"),
    (["generate", "{run}", "--prompt", "x", "--device", "tpu"], "unknown device 'tpu'"),
    (["generate", "{run}", "--prompt", "x", "--seed", "99999999999999999999999"], "seed must be an integer"),
])
def test_bad_input_gives_one_line_error(trained_run, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    import gzip

    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"some text\n" * 100))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    src = trained_run / "run" / "checkpoints" / "step_00000030"
    for f in src.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    args = [a.format(tmp=tmp_path, run=trained_run / "run") for a in args]
    proc = run(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_demo_never_deletes_what_it_did_not_write(trained_run, tmp_path):
    """A training run (or any user folder) given as `demo --out` is refused and left untouched; a previous demo run
    is replaced; a demo run with a foreign file added is refused."""
    victim = tmp_path / "victim"
    shutil.copytree(trained_run / "run", victim)
    (victim / "data").mkdir()  # the layout the README recommends: data/ beside checkpoints/
    before = sorted(str(p.relative_to(victim)) for p in victim.rglob("*"))
    corpus = trained_run / "shakespeare_head.txt"
    demo = ["demo", "--corpus", corpus, "--vocab_size", 300, "--max_time_s", 1, "--max_steps", 3, "--eval_interval", 3]
    proc = run(*demo, "--out", victim, check=False)
    assert proc.returncode == 2 and "is not a run made by `gptforge demo`" in proc.stderr
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == before

    fresh = tmp_path / "demo"
    run(*demo, "--out", fresh)
    assert (fresh / ".gptforge-demo").is_file() and (fresh / "latest").is_file()
    again = run(*demo, "--out", fresh)  # a previous demo run is the demo's own output: replaced
    assert "replacing the previous demo run" in again.stdout and (fresh / "latest").is_file()
    (fresh / "notes.txt").write_text("mine")
    proc = run(*demo, "--out", fresh, check=False)
    assert proc.returncode == 2 and "notes.txt" in proc.stderr and (fresh / "notes.txt").read_text() == "mine"
