"""Shared fixtures: tiny configs, the shared real-data folder, and a byte-level mock tokenizer."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptforge.config import ModelConfig


def shared_data_dir() -> Path:
    """`../shared/data` beside the repository (override with GPTFORGE_SHARED_DATA)."""
    env = os.environ.get("GPTFORGE_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def skip_without_shared_data(path: Path) -> None:
    """Skip a test that needs ../shared/data when it is absent; under CI (CI=true) that is a failure instead,
    so a misplaced data folder can never turn the real-data tests into silent skips."""
    message = f"shared data not found at {path} (set GPTFORGE_SHARED_DATA to the shared/data folder)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def skip_without_shared_data_msg(message: str) -> None:
    """As `skip_without_shared_data`, with the caller's own message."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "tinyshakespeare" / "input.txt").is_file():
        skip_without_shared_data(path)
    return path


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """STYLE.md 3.7's unit-test size."""
    return ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=256, context_length=16)


class ByteTokenizer:
    """Ids 0..255 are bytes, 256 is end-of-text: enough to test generation without a trained tokenizer."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return b"" if token == self.eot_id else bytes([token])

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (tiny models: as fast, and immune to OpenMP stalls on a busy
    shared CPU); the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep the tests' measured-peak cache (and downloads) out of the user's ~/.cache/gptforge; CLI subprocesses
    inherit it. Measured once per session, then read from there."""
    previous = os.environ.get("GPTFORGE_CACHE_DIR")
    os.environ["GPTFORGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("GPTFORGE_CACHE_DIR", None)
    else:
        os.environ["GPTFORGE_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """Tiny Shakespeare prepared with the character tokenizer (vocab 66), once per test session."""
    from gptforge.data.prepare import prepare

    src = shared_data_dir() / "tinyshakespeare" / "input.txt"
    if not src.is_file():
        skip_without_shared_data(src.parent.parent)
    out = tmp_path_factory.mktemp("char") / "data"
    prepare(str(src), out, tokenizer="char", progress=False)
    return out


def kill_mid_run(args: list, metrics: Path, *, lines: tuple[int, int], env: dict | None = None) -> None:
    """Start `python -m gptforge ARGS` and SIGKILL it once `metrics` (its metrics.jsonl) has a random number of
    lines in the range `lines`: a crash at an arbitrary step, for the exact-resume tests.

    Raises:
        AssertionError: the run finished (or 120 s passed) before it could be killed.
    """
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    kill_after, deadline = random.Random().randint(*lines), time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
