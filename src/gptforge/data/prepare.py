"""Turn a text corpus into flat token files: `train.bin`, `val.bin`, the tokenizer, and `meta.json`.

`prepare(corpus, out_dir)` streams the corpus twice (once to train the tokenizer, once to encode)
and writes tokens to disk as it goes, so peak memory does not grow with the corpus. Each document is
followed by `<|endoftext|>` (`eot_id`). The validation split is the *last* `val_fraction` of the
token stream and the training split the rest, as in nanoGPT's data scripts, so numbers compare.

The `.bin` files are raw little-endian arrays of `meta["dtype"]` (uint16 when every id fits, else
uint32): `np.memmap(path, dtype=meta["dtype"], mode="r")`. Everything is built in a temporary
directory beside `out_dir` and moved into place at the end, `meta.json` last, so a crash never
leaves a directory that looks complete. `load_meta` reads and checks it.

Depends on `gptforge.tokenizer` and `gptforge.data.sources`; knows nothing about models or training.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptforge.data.sources import Document, estimate_bytes, iter_documents
from gptforge.errors import GptforgeError
from gptforge.tokenizer import (
    BPE_FILE,
    CHAR_FILE,
    MIN_BPE_VOCAB_SIZE,
    BPETokenizer,
    CharTokenizer,
    load_tokenizer,
    train_bpe,
    train_char,
)
from gptforge.utils.io import atomic_write_json, sha256_file

META_FILE = "meta.json"
SPLIT_FILES = ("train.bin", "val.bin")
OWN_FILES = (*SPLIT_FILES, BPE_FILE, CHAR_FILE, META_FILE)  # the only files prepare replaces
META_VERSION = 1
MAX_VAL_FRACTION = 0.5
_BATCH_CHARS = 2_000_000  # text per encode_batch call: enough to keep all cores busy, small in RAM
_BATCH_DOCS = 4096
_COPY_BYTES = 8 << 20


def choose_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id of a `vocab_size`-token vocabulary.

    Returns:
        "uint16" when vocab_size <= 65536, else "uint32".
    """
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def prepare(
    corpus: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.1,
    text_field: str = "text",
    progress: bool = True,
) -> dict:
    """Tokenize a corpus into `out_dir/{train.bin, val.bin, meta.json}` plus the tokenizer file.

    Args:
        corpus: a corpus source (file, folder, glob, .jsonl/.parquet, `shakespeare`, `python-stdlib`).
        out_dir: the data directory; created if missing. Only gptforge's own files in it are replaced.
        tokenizer: "bpe" (train byte-level BPE), "char" (train character-level), or the path of an
            existing tokenizer (directory or tokenizer.json) to reuse without training.
        vocab_size: BPE vocabulary size in tokens, including the 256 bytes and `<|endoftext|>`
            (>= 257); ignored for "char" and for a reused tokenizer.
        val_fraction: fraction of the token stream, taken from its end, for validation; in [0, 0.5].
        text_field: record field holding the text, for .jsonl/.json/.parquet sources.
        progress: show a progress bar (bytes read, tokens written) on stderr.

    Returns:
        The metadata written to `meta.json` (see `load_meta`).

    Raises:
        GptforgeError: a bad argument, a missing or empty corpus, an unknown character for a reused
            char tokenizer, or a corpus too small to give both splits at least one token.
    """
    corpus = os.fspath(corpus)
    out = Path(out_dir)
    _check_args(out, tokenizer, vocab_size, val_fraction)
    if Path(corpus).is_dir() and out.resolve().is_relative_to(Path(corpus).resolve()):
        raise GptforgeError(f"--out {out} is inside the corpus folder {corpus}; its outputs would become corpus "
                            "documents next time (choose an --out outside it)")
    tok = _get_tokenizer(corpus, tokenizer, vocab_size, text_field, progress)
    dtype = choose_dtype(tok.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    try:
        stats = _write_tokens(corpus, tok, tmp / "tokens.bin", dtype, text_field, progress)
        n_train, n_val = _split(tmp / "tokens.bin", tmp, np.dtype(dtype).itemsize, val_fraction)
        tokenizer_file = tok.save(tmp).name
        meta = {
            "format_version": META_VERSION,
            "source": corpus,
            "text_field": text_field,
            "tokenizer": tok.kind,
            "tokenizer_file": tokenizer_file,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": dtype,
            "documents": stats["documents"],
            "bytes": stats["bytes"],
            "replaced_bytes": stats["replaced_bytes"],
            "tokens": {"train": n_train, "val": n_val},
            "sha256": {name: sha256_file(tmp / name) for name in SPLIT_FILES},
            "val_fraction": val_fraction,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(tmp / META_FILE, meta)
        _install(tmp, out, [*SPLIT_FILES, tokenizer_file])
        if stats["replaced_bytes"] > 0.01 * max(1, stats["bytes"]):
            print(f"warning: {stats['replaced_bytes']:,} of {stats['bytes']:,} input bytes were not valid UTF-8 and "
                  "became U+FFFD; is the corpus binary or in another encoding?", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _check_args(out: Path, tokenizer: str, vocab_size: int, val_fraction: float) -> None:
    if out.exists() and not out.is_dir():
        raise GptforgeError(f"out_dir {out} exists and is not a directory; give a directory path")
    if tokenizer not in ("bpe", "char") and not Path(tokenizer).exists():
        raise GptforgeError(
            f"tokenizer must be 'bpe', 'char', or the path of an existing tokenizer; got {tokenizer!r} (not found)"
        )
    if tokenizer == "bpe" and (
        isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB_SIZE
    ):
        raise GptforgeError(
            f"vocab_size must be an integer >= {MIN_BPE_VOCAB_SIZE} (256 bytes + <|endoftext|>), got {vocab_size!r}"
        )
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise GptforgeError(f"val_fraction must be a number in [0, {MAX_VAL_FRACTION}], got {val_fraction!r}")
    if not 0.0 <= val_fraction <= MAX_VAL_FRACTION:
        raise GptforgeError(f"val_fraction must be in [0, {MAX_VAL_FRACTION}], got {val_fraction}")


def _progress(desc: str, corpus: str, enabled: bool) -> tqdm:
    total = estimate_bytes(corpus) if enabled else None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not enabled)


def _texts(docs: Iterator[Document], bar: tqdm) -> Iterator[str]:
    for doc in docs:
        bar.update(doc.num_bytes)
        yield doc.text


def _get_tokenizer(
    corpus: str, tokenizer: str, vocab_size: int, text_field: str, progress: bool
) -> BPETokenizer | CharTokenizer:
    """Pass 1: load the tokenizer to reuse, or train one streaming over the corpus."""
    if tokenizer not in ("bpe", "char"):
        return load_tokenizer(tokenizer)
    with _progress(f"train {tokenizer} tokenizer", corpus, progress) as bar:
        texts = _texts(iter_documents(corpus, text_field=text_field), bar)
        return train_bpe(texts, vocab_size) if tokenizer == "bpe" else train_char(texts)


def _encode(tok: BPETokenizer | CharTokenizer, docs: list[Document], dtype: np.dtype) -> np.ndarray:
    """Encode a batch of documents, with `eot_id` after each document's last chunk."""
    eot = np.array([tok.eot_id], dtype=dtype)
    if isinstance(tok, CharTokenizer):
        arrays = [tok.encode_array(d.text) for d in docs]
    else:
        arrays = [np.array(ids, dtype=np.int64) for ids in tok.encode_batch([d.text for d in docs])]
    parts: list[np.ndarray] = []
    for doc, ids in zip(docs, arrays):
        parts.append(ids)
        if doc.is_last_chunk:
            parts.append(eot)
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    # Ids must never wrap when narrowed to the on-disk dtype.
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= min(tok.vocab_size, np.iinfo(dtype).max + 1)):
        raise AssertionError(f"token id out of range for vocab_size {tok.vocab_size} and dtype {dtype}")
    return flat.astype(dtype)


def _write_tokens(
    corpus: str, tok: BPETokenizer | CharTokenizer, path: Path, dtype_name: str, text_field: str, progress: bool
) -> dict:
    """Pass 2: encode the corpus in batches and append the tokens to `path` as they come."""
    dtype = np.dtype(dtype_name).newbyteorder("<")
    stats = {"documents": 0, "bytes": 0, "replaced_bytes": 0, "tokens": 0}
    batch: list[Document] = []
    batch_chars = 0
    with _progress("tokenize", corpus, progress) as bar, open(path, "wb") as f:

        def flush() -> None:
            tokens = _encode(tok, batch, dtype)
            f.write(tokens.tobytes())
            stats["tokens"] += len(tokens)
            bar.update(sum(d.num_bytes for d in batch))
            bar.set_postfix_str(f"{tqdm.format_sizeof(stats['tokens'])} tokens", refresh=False)
            batch.clear()

        for doc in iter_documents(corpus, text_field=text_field):
            stats["documents"] += doc.is_last_chunk
            stats["bytes"] += doc.num_bytes
            stats["replaced_bytes"] += doc.replaced_bytes
            batch.append(doc)
            batch_chars += len(doc.text)
            if batch_chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
                flush()
                batch_chars = 0
        if batch:
            flush()
        f.flush()
        os.fsync(f.fileno())
    return stats


def _split(tokens_path: Path, out: Path, itemsize: int, val_fraction: float) -> tuple[int, int]:
    """Move the last `val_fraction` of the tokens into `val.bin` and the rest into `train.bin`.

    The tail is copied in chunks and the file then truncated, so no split is ever loaded whole.

    Returns:
        (train tokens, val tokens).
    """
    n_total = tokens_path.stat().st_size // itemsize
    n_train = int(n_total * (1.0 - val_fraction))
    n_val = n_total - n_train
    if n_train < 1 or (val_fraction > 0 and n_val < 1):
        raise GptforgeError(
            f"corpus is too small: {n_total} tokens cannot give a non-empty train split and, with "
            f"val_fraction={val_fraction}, a non-empty val split; use more text or val_fraction=0"
        )
    with open(tokens_path, "r+b") as src, open(out / "val.bin", "wb") as dst:
        src.seek(n_train * itemsize)
        while block := src.read(_COPY_BYTES):
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
        src.truncate(n_train * itemsize)
        src.flush()
        os.fsync(src.fileno())
    os.replace(tokens_path, out / "train.bin")
    return n_train, n_val


def _install(tmp: Path, out: Path, files: list[str]) -> None:
    """Move the finished files from `tmp` into `out`, removing the old `meta.json` first and
    writing the new one last, so `out` looks complete only once it is."""
    if not out.exists():
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, out)  # one atomic step when out_dir is new
            return
        except OSError:
            pass  # created meanwhile: fall back to moving file by file
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    for name in OWN_FILES:
        if name not in files and name != META_FILE:
            (out / name).unlink(missing_ok=True)  # e.g. a char tokenizer left from an earlier run
    for name in files:
        os.replace(tmp / name, out / name)
    os.replace(tmp / META_FILE, out / META_FILE)


def load_meta(data_dir: str | os.PathLike) -> dict:
    """Read and check `data_dir/meta.json` written by `prepare`.

    Args:
        data_dir: a directory made by `prepare`.

    Returns:
        The metadata dict (keys: source, tokenizer, tokenizer_file, vocab_size, eot_id, dtype,
        documents, bytes, replaced_bytes, tokens {train, val}, sha256, val_fraction, created).

    Raises:
        GptforgeError: the directory or meta.json is missing, meta.json is corrupt or incomplete,
            or a .bin file's size in bytes is not its token count times the dtype's item size.
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
    required = ("tokenizer", "vocab_size", "eot_id", "dtype", "tokens")
    missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise GptforgeError(f"corrupt {path}: missing {', '.join(missing)}; re-run `gptforge prepare`")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise GptforgeError(f"corrupt {path}: dtype {meta['dtype']!r} is not uint16 or uint32")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        bin_path = root / f"{split}.bin"
        n_tokens = meta["tokens"].get(split) if isinstance(meta["tokens"], dict) else None
        if not isinstance(n_tokens, int):
            raise GptforgeError(f"corrupt {path}: tokens.{split} must be an integer count")
        if not bin_path.is_file():
            raise GptforgeError(f"{bin_path} not found; re-run `gptforge prepare`")
        size = bin_path.stat().st_size
        if size != n_tokens * itemsize:
            raise GptforgeError(
                f"{bin_path} is {size} bytes but meta.json says {n_tokens} {meta['dtype']} tokens "
                f"({n_tokens * itemsize} bytes); re-run `gptforge prepare`"
            )
    return meta
