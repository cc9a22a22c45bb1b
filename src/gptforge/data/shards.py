"""Token shards on disk: the writer `prepare` uses, the memory-mapped reader `pretrain` uses, and the index.

A prepared data directory (format 2) holds, per source of the corpus or mixture, its token stream cut into
numbered shard files `shards/<source>/000000.bin, 000001.bin, ...` of `shard_tokens` tokens each (the last
one shorter): raw little-endian `meta["dtype"]` arrays, documents separated by `<|endoftext|>`. `meta.json`
is the index: for each source its shards (file, tokens, sha256) and the split point: the first
`tokens.train` tokens of the stream are the training split and the rest (the last `val_fraction` of it) the
validation split, as in nanoGPT. Format 1 directories (`train.bin` + `val.bin`) read as one source.

Depends on numpy and `gptforge.errors`/`utils.io` only; knows nothing of tokenizers or models.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptforge.errors import GptforgeError
from gptforge.utils.io import sha256_file

META_FILE = "meta.json"
SHARD_DIR = "shards"
V1_FILES = ("train.bin", "val.bin")
VERIFY_MAX_BYTES = 8 << 30  # checksums are verified at pretrain start up to this much data (a few seconds)


class TokenStream:
    """A read-only token sequence stored in consecutive arrays (memory-mapped shards), sliced like one array.

    `stream[a:b]` returns the tokens a..b-1 as a numpy array (a view into one shard when the range lies in
    one, else a copy joining the pieces); `len(stream)` is the token count; `view(a, b)` is a sub-stream.
    """

    def __init__(self, arrays: list[np.ndarray], start: int = 0, stop: int | None = None) -> None:
        self._arrays = [a for a in arrays if len(a)]
        self._bounds = np.cumsum([0] + [len(a) for a in self._arrays])
        total = int(self._bounds[-1])
        self.start = start
        self.stop = total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"view [{start}, {stop}) outside a stream of {total} tokens")

    @classmethod
    def open(cls, paths: list[Path], dtype: str) -> TokenStream:
        """Memory-map `paths` read-only, in order (nothing is read until sliced)."""
        return cls([np.memmap(p, dtype=dtype, mode="r") for p in paths if p.stat().st_size])

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def dtype(self) -> np.dtype:
        return self._arrays[0].dtype if self._arrays else np.dtype("uint16")

    def view(self, start: int, stop: int) -> TokenStream:
        """The sub-stream of tokens [start, stop) of this stream (no copy)."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"view [{start}, {stop}) outside a stream of {len(self)} tokens")
        out = TokenStream.__new__(TokenStream)
        out._arrays, out._bounds = self._arrays, self._bounds
        out.start, out.stop = self.start + start, self.start + stop
        return out

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenStream supports only contiguous slices, e.g. stream[a:b]")
        lo, hi, _ = key.indices(len(self))
        lo, hi = self.start + lo, self.start + max(lo, hi)
        if lo == hi:
            return np.zeros(0, dtype=self.dtype)
        i = int(np.searchsorted(self._bounds, lo, side="right")) - 1
        j = int(np.searchsorted(self._bounds, hi - 1, side="right")) - 1
        pieces = [self._arrays[k][max(lo, self._bounds[k]) - self._bounds[k]: min(hi, self._bounds[k + 1])
                                   - self._bounds[k]] for k in range(i, j + 1)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class ShardWriter:
    """Appends tokens to numbered shard files of exactly `shard_tokens` tokens (the last one shorter).

    The open shard is `NNNNNN.bin.part`; a full one is fsynced, renamed to `NNNNNN.bin` and checksummed. `state()`
    (after `sync()`) is all a resumed writer needs: the finished shards and the length of the open one; a writer
    built from it truncates the part file to that length, dropping whatever was written after the checkpoint.
    """

    def __init__(self, root: Path, rel_dir: str, *, shard_tokens: int, dtype: str, state: dict | None = None
                 ) -> None:
        self.root, self.rel_dir, self.shard_tokens = root, rel_dir, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        (root / rel_dir).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = list(state["shards"]) if state else []
        self.part_tokens = state["part_tokens"] if state else 0
        self._rewind()
        self._f = open(self._part_path(), "ab")
        self._f.truncate(self.part_tokens * self.dtype.itemsize)
        self._f.seek(0, os.SEEK_END)

    def _rewind(self) -> None:
        """Put the directory back to the recorded state: the open shard as `.part`, nothing after it.

        A shard renamed to `.bin` after the last checkpoint becomes the open `.part` again, and files of later
        shards are removed (all were written by this writer before an interruption).

        Raises:
            GptforgeError: the open shard holds fewer tokens than the state records (the work was damaged).
        """
        part = self._part_path()
        if not part.exists() and part.with_suffix("").exists():
            os.replace(part.with_suffix(""), part)
        for f in (self.root / self.rel_dir).iterdir():
            if f.name.split(".")[0].isdigit() and int(f.name.split(".")[0]) > len(self.shards):
                f.unlink()
        have = part.stat().st_size if part.exists() else 0
        if have < self.part_tokens * self.dtype.itemsize:
            raise GptforgeError(f"{part} holds {have} bytes, fewer than the {self.part_tokens} tokens recorded")

    def _part_path(self) -> Path:
        return self.root / self.rel_dir / f"{len(self.shards):06d}.bin.part"

    def write(self, tokens: np.ndarray) -> int:
        """Append `tokens` (any integer dtype; ids must fit `dtype`); returns the number of shards completed."""
        tokens = tokens.astype(self.dtype, copy=False)
        done = 0
        while len(tokens):
            room = self.shard_tokens - self.part_tokens
            self._f.write(tokens[:room].tobytes())
            self.part_tokens += min(room, len(tokens))
            tokens = tokens[room:]
            if self.part_tokens == self.shard_tokens:
                self._close_shard()
                done += 1
        return done

    def _close_shard(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        part = self._part_path()
        final = part.with_suffix("")  # drop ".part"
        os.replace(part, final)
        self.shards.append({"file": f"{self.rel_dir}/{final.name}", "tokens": self.part_tokens,
                            "sha256": sha256_file(final)})
        self.part_tokens = 0
        self._f = open(self._part_path(), "ab")

    def sync(self) -> None:
        """Make everything written so far durable (before a checkpoint records `state()`)."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def state(self) -> dict:
        return {"shards": list(self.shards), "part_tokens": self.part_tokens}

    def finish(self) -> list[dict]:
        """Close the last (shorter) shard, if it holds any tokens; returns every shard's entry."""
        if self.part_tokens:
            self._close_shard()
        self._f.close()
        self._part_path().unlink(missing_ok=True)
        return self.shards


@dataclass
class SourceSplits:
    """One source of a prepared data directory: its name, mixture weight, and train/val token streams."""

    name: str
    weight: float
    train: TokenStream
    val: TokenStream


def _corrupt(path: Path, what: str) -> GptforgeError:
    return GptforgeError(f"corrupt {path}: {what}; re-run `gptforge prepare`")


def load_meta(data_dir: str | os.PathLike) -> dict:
    """Read and check `data_dir/meta.json` written by `prepare` (format 1 or 2).

    Checks that every token file it lists exists with the size its token count implies (cheap); checksums
    are checked by `verify_checksums`.

    Returns:
        The metadata dict (keys include tokenizer, tokenizer_file, vocab_size, eot_id, dtype, documents,
        bytes, tokens {train, val}, val_fraction; format 2 adds `sources`, a list of per-source entries with
        name, weight, shards and counts).

    Raises:
        GptforgeError: the directory or meta.json is missing, meta.json is corrupt or incomplete, or a token
            file is missing or has the wrong size.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise GptforgeError(f"data directory not found: {root} (run `gptforge prepare` to make one)")
    path = root / META_FILE
    if not path.is_file():
        raise GptforgeError(f"{path} not found; {root} is not a prepared data directory (run `gptforge prepare`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptforgeError(f"corrupt {path}: {str(exc).splitlines()[0]}") from None
    missing = [k for k in ("tokenizer", "vocab_size", "eot_id", "dtype", "tokens")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise _corrupt(path, f"missing {', '.join(missing)}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise _corrupt(path, f"dtype {meta['dtype']!r} is not uint16 or uint32")
    if meta.get("format_version", 1) >= 2:
        _check_sources(root, meta)
    else:
        _check_v1(root, meta)
    return meta


def _check_size(root: Path, rel: str, n_tokens, itemsize: int, what: str) -> None:
    file = root / rel
    if not isinstance(n_tokens, int) or n_tokens < 0:
        raise _corrupt(root / META_FILE, f"{what} token count must be an integer")
    if not file.is_file():
        raise GptforgeError(f"{what} {file} listed in meta.json is missing; re-run `gptforge prepare`")
    size = file.stat().st_size
    if size != n_tokens * itemsize:
        raise GptforgeError(f"{what} {file} is {size} bytes but meta.json says {n_tokens} tokens "
                            f"({n_tokens * itemsize} bytes); re-run `gptforge prepare`")


def _check_v1(root: Path, meta: dict) -> None:
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        n_tokens = meta["tokens"].get(split) if isinstance(meta["tokens"], dict) else None
        if not isinstance(n_tokens, int):
            raise _corrupt(root / META_FILE, f"tokens.{split} must be an integer count")
        _check_size(root, f"{split}.bin", n_tokens, itemsize, "token file")


def _check_sources(root: Path, meta: dict) -> None:
    path, itemsize = root / META_FILE, np.dtype(meta["dtype"]).itemsize
    sources = meta.get("sources")
    if not isinstance(sources, list) or not sources:
        raise _corrupt(path, "format 2 needs a non-empty `sources` list")
    for src in sources:
        try:
            name, shards, tokens = src["name"], src["shards"], src["tokens"]
            n_train, n_val, weight = tokens["train"], tokens["val"], float(src["weight"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, "each source needs name, weight, shards and tokens {train, val}") from None
        if not isinstance(shards, list) or weight <= 0:
            raise _corrupt(path, f"source {name!r} needs a shard list and a positive weight")
        for shard in shards:
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
                raise _corrupt(path, f"source {name!r}: every shard needs a file name")
            _check_size(root, shard["file"], shard.get("tokens"), itemsize, "shard")
        if sum(s["tokens"] for s in shards) != n_train + n_val:
            raise _corrupt(path, f"source {name!r}: its shards hold {sum(s['tokens'] for s in shards)} tokens, "
                                 f"not train + val = {n_train + n_val}")


def verify_checksums(data_dir: str | os.PathLike, meta: dict, *, max_bytes: int = VERIFY_MAX_BYTES) -> bool:
    """Check every shard's sha256 against meta.json, when all shards together are at most `max_bytes`.

    Returns:
        True if verified, False if skipped because the data is larger (a note is printed; sizes are still
        checked by `load_meta`).

    Raises:
        GptforgeError: a shard's checksum does not match (the file is corrupt or was modified).
    """
    root = Path(data_dir)
    files = ([(f, meta.get("sha256", {}).get(f)) for f in V1_FILES] if meta.get("format_version", 1) < 2 else
             [(s["file"], s.get("sha256")) for src in meta["sources"] for s in src["shards"]])
    total = sum((root / f).stat().st_size for f, _ in files)
    if total > max_bytes:
        print(f"note: {total / 2**30:.1f} GiB of token files; checksums not verified at start (sizes were)",
              file=sys.stderr)
        return False
    for rel, expected in files:
        if expected and sha256_file(root / rel) != expected:
            raise GptforgeError(f"{root / rel} does not match its sha256 in meta.json (corrupt or modified); "
                                "re-run `gptforge prepare`")
    return True


def open_sources(data_dir: str | os.PathLike, meta: dict) -> list[SourceSplits]:
    """Memory-map every source's shards and split them into train and val streams (format 1: one source)."""
    root = Path(data_dir)
    if meta.get("format_version", 1) < 2:
        train, val = (TokenStream.open([root / f], meta["dtype"]) for f in V1_FILES)
        return [SourceSplits("corpus", 1.0, train, val)]
    out = []
    for src in meta["sources"]:
        stream = TokenStream.open([root / s["file"] for s in src["shards"]], meta["dtype"])
        n_train = src["tokens"]["train"]
        out.append(SourceSplits(src["name"], float(src["weight"]), stream.view(0, n_train),
                                stream.view(n_train, len(stream))))
    return out
