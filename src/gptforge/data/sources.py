"""Corpus sources: stream documents from files, folders, globs, JSONL/Parquet, or a named corpus.

`iter_documents(source)` yields `Document`s one at a time, so memory stays flat however large the
corpus is. A source is, in the order tried:

- a named corpus: `shakespeare` (Tiny Shakespeare, found locally or downloaded once, sha256 checked)
  or `python-stdlib` (the running interpreter's standard-library `.py` files, no download);
  write `./shakespeare` to mean a path of that name instead;
- an existing file: `.jsonl`/`.json`/`.parquet` is read with `datasets` (streaming), one document per
  record from `text_field`; any other file is one text document;
- an existing folder: every regular, non-hidden file below it, recursively, in sorted order, each
  handled as a file above;
- a glob pattern (`*`, `?`, `[`; `**` recurses): the sorted matching files;
- `hf:NAME[:CONFIG][:SPLIT]`: a Hugging Face hub dataset, streamed (split `train` unless given), one
  document per record from `text_field`; a clear one-line error when the hub cannot be reached.

`data.units.iter_units` cuts these documents into smaller units (lines, paragraphs) when asked.

Text files are read as bytes and decoded as UTF-8; undecodable bytes become U+FFFD and are counted
(`Document.replaced_bytes`). A text file is yielded in chunks of about 1 MB cut at line boundaries;
every chunk but the last has `is_last_chunk=False`, so no end-of-text token goes between them.

Depends on `gptforge.errors` only (plus `datasets`, imported lazily, for JSONL/Parquet).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import sysconfig
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.utils.io import cache_dir, sha256_file

NAMED_CORPORA = ("shakespeare", "python-stdlib")
HF_PREFIX = "hf:"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_RELPATH = Path("tinyshakespeare") / "input.txt"
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
CHUNK_BYTES = 1 << 20  # read size for text files; a chunk is cut at the last line boundary in it
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Document:
    """One document, or one chunk of a document read from a large text file.

    Attributes:
        name: where it came from (a file path, or `path#record-index` for a JSONL/Parquet record).
        text: the text of this document or chunk.
        is_last_chunk: False for every chunk of a file but its last; an end-of-text token belongs
            only after a chunk with True.
        num_bytes: input bytes this chunk consumed (file bytes, or UTF-8 bytes of a record's text).
        replaced_bytes: undecodable input bytes in this chunk, each run replaced by U+FFFD.
    """

    name: str
    text: str
    is_last_chunk: bool = True
    num_bytes: int = 0
    replaced_bytes: int = 0


# Counting decode errors: the codec calls this handler once per invalid byte run.
_counter = threading.local()


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    _counter.replaced = getattr(_counter, "replaced", 0) + (exc.end - exc.start)
    return "\ufffd", exc.end


codecs.register_error("gptforge.count_replace", _count_and_replace)


def _not_found(source: str) -> GptforgeError:
    return GptforgeError(
        f"corpus not found: {source} (expected a file, folder, glob, .jsonl/.parquet file, hf:NAME, "
        f"or one of: {', '.join(NAMED_CORPORA)})"
    )


def check_source(source: str) -> None:
    """Raise the one-line `corpus not found` error now if a local source does not exist (hf: is checked when read)."""
    if source.startswith(HF_PREFIX):
        from gptforge.data.hub import parse_hf

        parse_hf(source)
    elif source != "shakespeare":
        list_files(source)


def iter_documents(source: str | os.PathLike, *, text_field: str = "text") -> Iterator[Document]:
    """Stream the documents of a corpus source (see the module docstring for what a source can be).

    Args:
        source: a named corpus, a file, a folder, or a glob pattern (a str or path-like).
        text_field: the record field holding the text, for `.jsonl`/`.json`/`.parquet` files.

    Yields:
        `Document`s in a deterministic order; empty documents are skipped.

    Raises:
        GptforgeError: the source does not exist, has no documents or no text, a record lacks
            `text_field`, or a named corpus cannot be found or downloaded.
    """
    source = os.fspath(source)
    num_docs = 0
    num_chars = 0
    for doc in _iter_source(source, text_field):
        if doc.text:
            num_chars += len(doc.text)
            num_docs += doc.is_last_chunk
            yield doc
    if num_docs == 0 or num_chars == 0:
        raise GptforgeError(f"corpus is empty: {source} has no text (need at least one non-empty document)")


def list_files(source: str) -> list[Path] | None:
    """The files a path-like source reads, in order, or None for a record file or named shakespeare.

    Raises:
        GptforgeError: the source does not exist.
    """
    if source == "python-stdlib":
        return _stdlib_files()
    if source == "shakespeare" or source.startswith(HF_PREFIX):
        return None
    path = Path(source)
    if path.is_file():
        return None if path.suffix.lower() in RECORD_SUFFIXES else [path]
    if path.is_dir():
        return _folder_files(path)
    if any(c in source for c in _GLOB_CHARS):
        files = sorted(Path(m) for m in glob.glob(source, recursive=True) if Path(m).is_file())
        if files:
            return files
    raise _not_found(source)


def estimate_bytes(source: str) -> int | None:
    """Total input size in bytes when cheap to know (text files on disk), else None (for a progress bar)."""
    if source == "shakespeare":
        return 1_115_394
    try:
        files = list_files(source)
    except GptforgeError:
        return None
    if files is None or any(f.suffix.lower() in RECORD_SUFFIXES for f in files):
        return None  # record files: their size on disk is not their text size
    return sum(f.stat().st_size for f in files)


def _iter_source(source: str, text_field: str) -> Iterator[Document]:
    if source == "shakespeare":
        yield from _iter_text_file(find_shakespeare())
        return
    if not isinstance(source, str) or not source:
        raise _not_found(str(source))
    if source.startswith(HF_PREFIX):
        from gptforge.data.hub import iter_hf

        yield from iter_hf(source, text_field)
        return
    path = Path(source)
    if path.is_file() and path.suffix.lower() in RECORD_SUFFIXES:
        yield from _iter_records(path, text_field)
        return
    for file in list_files(source) or []:
        if file.suffix.lower() in RECORD_SUFFIXES and source != "python-stdlib":
            yield from _iter_records(file, text_field)
        else:
            yield from _iter_text_file(file)


def _folder_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow directory symlinks: no loops
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            f = Path(dirpath) / name
            if not name.startswith(".") and f.is_file():
                files.append(f)
    return sorted(files)


def _stdlib_files() -> list[Path]:
    files = []
    skip = {"site-packages", "dist-packages", "__pycache__"}
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        files.extend(Path(dirpath) / n for n in filenames if n.endswith(".py") and not n.startswith("."))
    return sorted(files)


def _line_cut(text: str) -> int:
    """Where to end a chunk: before the last newline that follows a non-space character.

    That position is both a line boundary and a byte-level BPE pre-token boundary, so chunking a
    file never changes its token ids. Falls back to just after the last newline, else 0 (none).
    """
    j = len(text)
    while True:
        j = text.rfind("\n", 0, j)
        if j <= 0:
            return text.rfind("\n") + 1
        if not text[j - 1].isspace():
            return j


COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd",
                    b"PK\x03\x04": "zip"}


def _iter_text_file(path: Path) -> Iterator[Document]:
    """Yield a text file as chunks of about CHUNK_BYTES cut at line boundaries, decoded with counting."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="gptforge.count_replace")
    name = str(path)
    pending = ""  # decoded text not yet cut into a chunk
    pending_bytes = pending_replaced = 0
    ready: Document | None = None  # held back one step, so the last chunk can be flagged as last
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise GptforgeError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        head = f.read(4)
        for magic, kind in COMPRESSED_MAGIC.items():
            if head.startswith(magic):
                raise GptforgeError(f"{path} is {kind}-compressed; decompress it first (gptforge reads plain text)")
        f.seek(0)
        while data := f.read(CHUNK_BYTES):
            _counter.replaced = 0
            pending += decoder.decode(data)
            pending_bytes += len(data)
            pending_replaced += _counter.replaced
            cut = _line_cut(pending)
            if cut == 0:
                if len(pending) < 4 * CHUNK_BYTES:
                    continue  # no line break yet: read more before cutting
                cut = len(pending)
            if ready is not None:
                yield ready
            # Bytes are attributed to the chunk being cut when they were read.
            ready = Document(name, pending[:cut], False, pending_bytes, pending_replaced)
            pending = pending[cut:]
            pending_bytes = pending_replaced = 0
        _counter.replaced = 0
        pending += decoder.decode(b"", final=True)
        pending_replaced += _counter.replaced
    if ready is None:
        yield Document(name, pending, True, pending_bytes, pending_replaced)
    elif not pending:
        yield Document(name, ready.text, True, ready.num_bytes + pending_bytes, ready.replaced_bytes + pending_replaced)
    else:
        yield ready
        yield Document(name, pending, True, pending_bytes, pending_replaced)


def _iter_records(path: Path, text_field: str) -> Iterator[Document]:
    """Yield one document per record of a JSONL/JSON/Parquet file, via `datasets` in streaming mode."""
    import datasets  # lazy: heavy import, only needed for record files

    builder = "parquet" if path.suffix.lower() == ".parquet" else "json"
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        for i, record in enumerate(dataset):
            if text_field not in record:
                fields = ", ".join(sorted(record)) or "(none)"
                raise GptforgeError(f"{path} has no field {text_field!r}; available fields: {fields}")
            text = record[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise GptforgeError(
                    f"{path} record {i}: field {text_field!r} is {type(text).__name__}, expected a string"
                )
            yield Document(f"{path}#{i}", text, True, len(text.encode("utf-8", errors="surrogatepass")), 0)
    except GptforgeError:
        raise
    except Exception as exc:  # datasets/pyarrow raise many types for a malformed file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GptforgeError(f"cannot read {path} as {builder}: {first}") from None


def find_shakespeare() -> Path:
    """Locate Tiny Shakespeare, downloading it into the cache once if needed.

    Looks at `$GPTFORGE_DATA_DIR/tinyshakespeare/input.txt`, then the cache
    (`$GPTFORGE_CACHE_DIR` or `~/.cache/gptforge`, same relative path), then downloads.

    Returns:
        The path of `input.txt` (its sha256 verified).

    Raises:
        GptforgeError: a found file has the wrong sha256, or the download fails.
    """
    candidates = []
    if os.environ.get("GPTFORGE_DATA_DIR"):
        candidates.append(Path(os.environ["GPTFORGE_DATA_DIR"]) / SHAKESPEARE_RELPATH)
    cached = cache_dir() / SHAKESPEARE_RELPATH
    candidates.append(cached)
    for path in candidates:
        if path.is_file():
            if sha256_file(path) != SHAKESPEARE_SHA256:
                raise GptforgeError(f"{path} is not Tiny Shakespeare (sha256 mismatch; expected {SHAKESPEARE_SHA256})")
            return path
    _download(SHAKESPEARE_URL, cached, SHAKESPEARE_SHA256)
    return cached


def _download(url: str, dest: Path, sha256: str) -> None:
    """Download `url` to `dest` atomically, checking the sha256 before the final rename."""
    hint = f"place the file at $GPTFORGE_DATA_DIR/{SHAKESPEARE_RELPATH} and retry"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise GptforgeError(f"cannot write the download cache {dest.parent}: {exc.strerror}; {hint}") from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
            for block in iter(lambda: response.read(1 << 16), b""):
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise GptforgeError(f"download of {url} has the wrong sha256 ({digest.hexdigest()}); {hint}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise GptforgeError(f"could not download {url} ({reason}); {hint}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
