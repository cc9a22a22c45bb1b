"""`gptforge prepare` killed with SIGKILL and run again resumes, and its shards are byte-identical to an
uninterrupted run's (with fuzzy dedup and two worker processes)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 1.5 MB of paragraphs, a tenth of them near copies of earlier ones."""
    rng = random.Random(0)
    paragraphs = []
    for i in range(3000):
        if i > 10 and rng.random() < 0.1:
            words = rng.choice(paragraphs).split(" ")
            words[rng.randrange(len(words))] = "changed"
            paragraphs.append(" ".join(words))
        else:
            paragraphs.append(" ".join(rng.choice(WORDS) + str(rng.randrange(30)) for _ in range(rng.randint(40, 120))))
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def command(corpus: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "gptforge", "prepare", "--corpus", str(corpus), "--out", str(out), "--quiet",
            "--documents", "paragraphs", "--vocab_size", "400", "--num_proc", "2", "--shard_tokens", "4000",
            "--dedup", "fuzzy"]


def shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "shards").rglob("*.bin"))}


def test_sigkill_then_rerun_gives_identical_shards(corpus: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(command(corpus, reference), check=True, capture_output=True)
    n_shards = len(shards(reference))
    assert n_shards > 20

    out = tmp_path / "out"
    work = tmp_path / ".out.prepare"
    kill_at = random.Random().randint(2, n_shards // 2)  # a different point each run
    proc = subprocess.Popen(command(corpus, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (work / "state.json").is_file() and len(list(work.glob("shards/*/*.bin"))) >= kill_at:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole job: main process, forkserver and workers
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not (out / "meta.json").exists()  # nothing looks complete

    rerun = subprocess.run(command(corpus, out), check=True, capture_output=True, text=True)
    assert "resuming the interrupted preparation" in rerun.stderr
    assert shards(out) == shards(reference)
    got, want = (json.loads((d / "meta.json").read_text()) for d in (out, reference))
    assert got["sources"] == want["sources"] and got["sources"][0]["removed"]["near_duplicate"] > 100
    assert not work.exists()
