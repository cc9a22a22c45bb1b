"""Atomic file and directory writes: a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError


def cache_dir() -> Path:
    """gptforge's per-user cache: `$GPTFORGE_CACHE_DIR`, else `~/.cache/gptforge` (not created here)."""
    env = os.environ.get("GPTFORGE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "gptforge"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, fsync the result, then rename it to `path` (same directory, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write UTF-8 text to `path` atomically; return the path."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return Path(path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written `tmp_dir` to `final_dir`, replacing an older copy only after the move succeeds."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if old.exists():
        shutil.rmtree(old)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (memory stays flat for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_jsonl(lines: Iterable[str], path: Path, expected: str) -> list[tuple[int, dict]]:
    """The JSON objects of a JSONL file's lines, each with its 1-based line number; blank lines are skipped.

    Raises:
        GptforgeError: "{path}:{line}: ..." for a line that is not JSON or not an object, or a file without
            records; each message ends with `expected` (the format the caller wants, in words).
    """
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GptforgeError(f"{path}:{n}: not a JSON line ({exc.msg}); expected {expected}") from None
        if not isinstance(obj, dict):
            raise GptforgeError(f"{path}:{n}: not a JSON object (got {type(obj).__name__}); expected {expected}")
        records.append((n, obj))
    if not records:
        raise GptforgeError(f"{path} holds no records; expected {expected}")
    return records
