"""`gptforge prepare` / `pretrain` / `contamination` on bad data input: one-line errors, exit status 2, and nothing
half-written left looking complete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.data.prepare import prepare


def gptforge(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptforge", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("d")
    (tmp / "c.txt").write_text("".join(f"line {i} of some plain text to train on\n" for i in range(3000)))
    prepare(str(tmp / "c.txt"), tmp / "data", tokenizer="char", num_proc=1, shard_tokens=20_000, progress=False)
    return tmp


def mixture(tmp: Path, body: str) -> Path:
    path = tmp / "mix.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("case, message", [
    ("unknown_source", "source 'b': corpus not found: "),
    ("zero_weight", "source 'a': weight must be a positive number, got 0"),
    ("hf_unreachable", "cannot reach the Hugging Face hub for hf:someone/dataset (127.0.0.1:9"),
    ("hf_offline", "cannot load hf:someone/dataset from the Hugging Face hub: "),
    ("report_without_dedup", "--dedup_report needs --dedup exact or --dedup fuzzy"),
    ("empty_reference", "quality reference: corpus is empty"),
    ("missing_shard", "listed in meta.json is missing"),
    ("bad_checksum", "does not match its sha256 in meta.json"),
    ("contamination_no_data", "data directory not found"),
])
def test_one_line_errors(data: Path, tmp_path: Path, case: str, message: str) -> None:
    corpus, out, env = data / "c.txt", tmp_path / "out", None
    (tmp_path / "empty.txt").write_text("")
    if case == "unknown_source":
        args = ["prepare", "--mixture", mixture(tmp_path, f"sources:\n  a: {{corpus: {corpus}, weight: 1}}\n"
                                                          "  b: {corpus: no_such_dir/x.txt, weight: 1}\n"), "--out", out]
    elif case == "zero_weight":
        args = ["prepare", "--mixture", mixture(tmp_path, f"sources:\n  a: {{corpus: {corpus}, weight: 0}}\n"),
                "--out", out]
    elif case in ("hf_unreachable", "hf_offline"):
        args = ["prepare", "--corpus", "hf:someone/dataset", "--out", out, "--tokenizer", "char"]
        # (test_hf_interop.py sets HF_HUB_OFFLINE=1 for the whole session: set both ways explicitly)
        env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"} \
            if case == "hf_unreachable" else \
            {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    elif case == "report_without_dedup":
        args = ["prepare", "--corpus", corpus, "--out", out, "--dedup_report", tmp_path / "r.jsonl"]
    elif case == "empty_reference":
        args = ["prepare", "--corpus", corpus, "--out", out, "--tokenizer", "char", "--num_proc", "1",
                "--quality_reference", tmp_path / "empty.txt"]
    elif case in ("missing_shard", "bad_checksum"):
        shutil.copytree(data / "data", tmp_path / "data")
        meta = json.loads((tmp_path / "data" / "meta.json").read_text())
        shard = tmp_path / "data" / meta["sources"][0]["shards"][1]["file"]
        if case == "missing_shard":
            shard.unlink()
        else:
            raw = bytearray(shard.read_bytes())
            raw[0] ^= 1
            shard.write_bytes(bytes(raw))
        args = ["pretrain", "--preset", "debug", "--data", tmp_path / "data", "--out", tmp_path / "run"]
    else:
        args = ["contamination", tmp_path / "nope", "--out", tmp_path / "clean.json", "--data_dir", tmp_path]
    proc = gptforge(*args, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (out / "meta.json").exists() and not (tmp_path / ".out.prepare").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mixture_prepare_and_summary(data: Path, tmp_path: Path) -> None:
    (tmp_path / "other.txt").write_text("".join(f"another source, sentence {i}\n" for i in range(500)) * 2)
    mix = mixture(tmp_path, f"sources:\n  plain: {{corpus: {data / 'c.txt'}, weight: 3, documents: lines}}\n"
                            "  other: {corpus: other.txt, weight: 1, documents: lines}\n")
    proc = gptforge("prepare", "--mixture", mix, "--out", tmp_path / "out", "--tokenizer", "char", "--quiet",
                    "--dedup", "exact", "--num_proc", "1")
    assert proc.returncode == 0, proc.stderr
    assert "normalised to plain 0.75, other 0.25" in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["source", "weight", "documents"]
    assert lines[1].split()[:4] == ["plain", "0.750", "3,000", "3,000"]
    assert lines[2].split()[:5] == ["other", "0.250", "1,000", "500", "50.00"]  # the second copy removed
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["sources"][1]["removed"]["exact_duplicate"] == 500
