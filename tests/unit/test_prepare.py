"""Unit tests for gptforge.data.sources and gptforge.data.prepare on tiny corpora."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_data_dir, skip_without_shared_data_msg
from gptforge.data import sources
from gptforge.data.prepare import choose_dtype, load_meta, prepare
from gptforge.data.shards import open_sources
from gptforge.data.sources import SHAKESPEARE_SHA256, iter_documents
from gptforge.errors import GptforgeError
from gptforge.tokenizer import EOT_TEXT, load_tokenizer

SHARED_DATA = shared_data_dir()
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. 👋 café\r\n" * 20


def read_tokens(data_dir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """meta.json and the (single) source's train and val tokens, read through the memory-mapped shards."""
    meta = load_meta(data_dir)
    (src,) = open_sources(data_dir, meta)
    return meta, np.asarray(src.train[:]), np.asarray(src.val[:])


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_prepare_text_file_round_trip(tmp_path: Path, kind: str) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8", newline="")
    out = tmp_path / "data"
    meta = prepare(str(corpus), out, tokenizer=kind, vocab_size=300, val_fraction=0.2, progress=False)
    assert meta == json.loads((out / "meta.json").read_text())
    meta, train, val = read_tokens(out)
    assert meta["tokenizer"] == kind and meta["dtype"] == "uint16"
    assert meta["documents"] == 1 and meta["bytes"] == len(TEXT.encode()) and meta["replaced_bytes"] == 0
    assert meta["tokens"] == {"train": len(train), "val": len(val)}
    total = len(train) + len(val)
    assert len(train) == int(total * 0.8)  # val is the last 20% of the stream
    tok = load_tokenizer(out)
    assert tok.kind == kind and tok.vocab_size == meta["vocab_size"] and tok.eot_id == meta["eot_id"]
    stream = np.concatenate([train, val]).tolist()
    assert stream[-1] == tok.eot_id and stream.count(tok.eot_id) == 1
    assert tok.decode(stream) == TEXT + EOT_TEXT
    for shard in meta["sources"][0]["shards"]:
        assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "data"]  # no temp dir left


def test_folder_documents_and_separators(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bravo text\n")
    (folder / "a.txt").write_text("alpha text\n")
    (folder / "sub" / "c.md").write_text("charlie")
    (folder / ".hidden").write_text("secret")
    (folder / "empty.txt").write_text("")
    meta = prepare(str(folder), tmp_path / "out", tokenizer="char", val_fraction=0.0, progress=False)
    meta, train, val = read_tokens(tmp_path / "out")
    assert meta["documents"] == 3 and len(val) == 0
    tok = load_tokenizer(tmp_path / "out")
    assert tok.decode(train.tolist()) == f"alpha text\n{EOT_TEXT}bravo text\n{EOT_TEXT}charlie{EOT_TEXT}"


def test_glob_source(tmp_path: Path) -> None:
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    docs = list(iter_documents(str(tmp_path / "x*.txt")))
    assert [d.text for d in docs] == ["x1.txt", "x2.txt"]


def test_jsonl_text_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    records = [{"content": "one 🙂", "id": 1}, {"content": "two", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    meta = prepare(str(path), tmp_path / "out", tokenizer="char", text_field="content", val_fraction=0, progress=False)
    _, train, _ = read_tokens(tmp_path / "out")
    assert meta["documents"] == 2 and meta["bytes"] == len("one 🙂two".encode())
    assert load_tokenizer(tmp_path / "out").decode(train.tolist()) == f"one 🙂{EOT_TEXT}two{EOT_TEXT}"
    with pytest.raises(GptforgeError, match=r"no field 'text'; available fields: content, id"):
        list(iter_documents(str(path)))


def test_empty_and_missing_corpus(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(GptforgeError, match="corpus is empty"):
        prepare(str(empty), tmp_path / "out", tokenizer="char", progress=False)
    with pytest.raises(GptforgeError, match="corpus is empty"):
        prepare(str(empty), tmp_path / "out", tokenizer="bpe", vocab_size=300, progress=False)
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(GptforgeError, match=r"corpus not found: .*nope.txt \(expected a file, folder, glob"):
        prepare(missing, tmp_path / "out", tokenizer="char", progress=False)
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_counted(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok \xff\xfe then \xc3 end\n")
    meta = prepare(str(path), tmp_path / "out", tokenizer="char", val_fraction=0, progress=False)
    assert meta["replaced_bytes"] == 3 and meta["bytes"] == path.stat().st_size
    _, train, _ = read_tokens(tmp_path / "out")
    text = load_tokenizer(tmp_path / "out").decode(train.tolist())
    assert text == "ok \ufffd\ufffd then \ufffd end\n" + EOT_TEXT


def test_large_file_chunks_have_no_separators(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)
    text = "".join(f"line {i} é\n" for i in range(100))
    path = tmp_path / "big.txt"
    path.write_text(text)
    docs = list(iter_documents(str(path)))
    assert len(docs) > 5 and [d.is_last_chunk for d in docs].count(True) == 1 and docs[-1].is_last_chunk
    assert "".join(d.text for d in docs) == text and sum(d.num_bytes for d in docs) == len(text.encode())
    meta = prepare(str(path), tmp_path / "out", tokenizer="bpe", vocab_size=300, val_fraction=0.1, progress=False)
    _, train, val = read_tokens(tmp_path / "out")
    assert meta["documents"] == 1
    assert load_tokenizer(tmp_path / "out").decode(np.concatenate([train, val]).tolist()) == text + EOT_TEXT


def test_bad_arguments(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc")
    with pytest.raises(GptforgeError, match=r"val_fraction must be in \[0, 0.5\]"):
        prepare(str(corpus), tmp_path / "o", val_fraction=0.6, progress=False)
    with pytest.raises(GptforgeError, match="vocab_size must be"):
        prepare(str(corpus), tmp_path / "o", tokenizer="bpe", vocab_size=100, progress=False)
    with pytest.raises(GptforgeError, match="tokenizer must be 'bpe', 'char'"):
        prepare(str(corpus), tmp_path / "o", tokenizer="wordpiece", progress=False)
    # floor(n * (1 - val_fraction)) leaves val at least one token unless val_fraction is ~0 in float.
    with pytest.raises(GptforgeError, match="too small"):
        prepare(str(corpus), tmp_path / "o", tokenizer="char", val_fraction=1e-18, progress=False)
    assert not (tmp_path / "o").exists()


def test_reuse_tokenizer_and_overwrite(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    first = tmp_path / "first"
    prepare(str(corpus), first, tokenizer="char", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "tokenizer.json").write_text("stale")
    meta = prepare(str(corpus), out, tokenizer=str(first), progress=False)
    shas = [s["sha256"] for s in meta["sources"][0]["shards"]]
    assert meta["tokenizer"] == "char" and shas == [s["sha256"] for s in load_meta(first)["sources"][0]["shards"]]
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "tokenizer.json").exists()  # stale tokenizer of the other kind removed
    corpus.write_text("unknown chars: ZQX§")
    with pytest.raises(GptforgeError, match="not in the vocabulary"):
        prepare(str(corpus), tmp_path / "o2", tokenizer=str(first), progress=False)


def test_load_meta_errors(tmp_path: Path) -> None:
    with pytest.raises(GptforgeError, match="data directory not found"):
        load_meta(tmp_path / "missing")
    with pytest.raises(GptforgeError, match="meta.json not found"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{oops")
    with pytest.raises(GptforgeError, match="corrupt .*meta.json"):
        load_meta(tmp_path)
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    meta = prepare(str(corpus), tmp_path / "d", tokenizer="char", progress=False)
    with open(tmp_path / "d" / meta["sources"][0]["shards"][0]["file"], "ab") as f:
        f.write(b"\x00")
    with pytest.raises(GptforgeError, match="000000.bin is .* bytes but meta.json says"):
        load_meta(tmp_path / "d")


def test_choose_dtype() -> None:
    assert choose_dtype(257) == "uint16"
    assert choose_dtype(65536) == "uint16"
    assert choose_dtype(65537) == "uint32"
    assert choose_dtype(100_000) == "uint32"


def test_shakespeare_from_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (SHARED_DATA / "tinyshakespeare" / "input.txt").is_file():
        skip_without_shared_data_msg(f"shared data not found at {SHARED_DATA}")
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(SHARED_DATA))
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "_download", lambda *a: pytest.fail("must not download"))
    path = sources.find_shakespeare()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    meta = prepare("shakespeare", tmp_path / "out", tokenizer="char", progress=False)
    assert meta["vocab_size"] == 66 and meta["bytes"] == 1_115_394
    assert meta["tokens"]["train"] == int((1_115_394 + 1) * 0.9)


def test_shakespeare_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "tinyshakespeare" / "input.txt"
    fake.parent.mkdir()
    fake.write_text("not shakespeare")
    monkeypatch.setenv("GPTFORGE_DATA_DIR", str(tmp_path))
    with pytest.raises(GptforgeError, match="sha256 mismatch"):
        sources.find_shakespeare()


def test_shakespeare_download_failure_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPTFORGE_DATA_DIR", raising=False)
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # closed port
    with pytest.raises(GptforgeError, match=r"could not download .*GPTFORGE_DATA_DIR/tinyshakespeare/input.txt"):
        sources.find_shakespeare()
    assert list((tmp_path / "cache" / "tinyshakespeare").iterdir()) == []  # no partial file left


def test_python_stdlib_source() -> None:
    files = sources.list_files("python-stdlib")
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "dist-packages" in f.parts for f in files)
    first = next(iter_documents("python-stdlib"))
    assert first.name == str(files[0]) or first.name.endswith(".py")


def test_document_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gptforge.data.units import iter_units

    monkeypatch.setattr(sources, "CHUNK_BYTES", 16)  # paragraphs and lines cut across read chunks
    text = " = Title = \n \n first paragraph line one\nline two\n\n\n second paragraph\n \nlast"
    path = tmp_path / "w.txt"
    path.write_text(text)
    paras = list(iter_units(str(path), documents="paragraphs"))
    assert [u.text for u in paras if u.text] == [" = Title = ", " first paragraph line one\nline two",
                                                 " second paragraph", "last"]
    assert sum(u.num_bytes for u in paras) == len(text.encode())
    lines = [u.text for u in iter_units(str(path), documents="lines") if u.text]
    assert lines == [" = Title = ", " first paragraph line one", "line two", " second paragraph", "last"]
    assert [u.name for u in paras][:2] == [f"{path}#0", f"{path}#1"]
    meta = prepare(str(path), tmp_path / "out", tokenizer="char", documents="lines", val_fraction=0, num_proc=1,
                   progress=False)
    _, train, _ = read_tokens(tmp_path / "out")
    assert meta["documents"] == 5
    assert load_tokenizer(tmp_path / "out").decode(train.tolist()) == "".join(x + EOT_TEXT for x in lines)
    with pytest.raises(GptforgeError, match="documents must be one of file, lines, paragraphs"):
        list(iter_units(str(path), documents="pages"))
