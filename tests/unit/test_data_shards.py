"""Token shards: the stream reads like one array across shard files, output does not depend on shard size or
num_proc, format-1 directories still load, and missing or corrupted shards are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gptforge.data.prepare import prepare
from gptforge.data.shards import ShardWriter, TokenStream, load_meta, open_sources, verify_checksums
from gptforge.errors import GptforgeError

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))


def stream_of(data_dir: Path) -> np.ndarray:
    (src,) = open_sources(data_dir, load_meta(data_dir))
    return np.concatenate([src.train[:], src.val[:]])


def test_token_stream_slices_across_shards(tmp_path: Path) -> None:
    data = np.arange(1000, dtype=np.uint16)
    paths = []
    for k, (a, b) in enumerate([(0, 300), (300, 310), (310, 1000)]):
        paths.append(tmp_path / f"{k}.bin")
        data[a:b].tofile(paths[-1])
    stream = TokenStream.open(paths, "uint16")
    assert len(stream) == 1000
    for a, b in [(0, 1000), (299, 302), (305, 700), (0, 0), (999, 1000), (250, 1200)]:
        assert np.array_equal(stream[a:b], data[a:b])
    view = stream.view(295, 900)
    assert len(view) == 605 and np.array_equal(view[10:20], data[305:315]) and np.array_equal(view[600:], data[895:900])
    with pytest.raises(TypeError):
        stream[::2]


def test_shard_writer_cuts_exact_sizes_and_rewinds(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, "shards/x", shard_tokens=100, dtype="uint16")
    assert w.write(np.arange(250)) == 2
    w.sync()
    state = w.state()
    w.write(np.arange(1000, 1200))  # lost: written after the "checkpoint"
    w._f.flush()
    resumed = ShardWriter(tmp_path, "shards/x", shard_tokens=100, dtype="uint16", state=state)
    resumed.write(np.arange(250, 330))
    shards = resumed.finish()
    assert [s["tokens"] for s in shards] == [100, 100, 100, 30]
    got = np.concatenate([np.fromfile(tmp_path / s["file"], dtype="<u2") for s in shards])
    assert np.array_equal(got, np.arange(330))
    assert sorted(p.name for p in (tmp_path / "shards/x").iterdir()) == [f"00000{i}.bin" for i in range(4)]


def test_output_independent_of_shard_size_and_num_proc(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    one = prepare(str(corpus), tmp_path / "one", tokenizer="bpe", vocab_size=300, num_proc=1, progress=False)
    many = prepare(str(corpus), tmp_path / "many", tokenizer="bpe", vocab_size=300, num_proc=2, shard_tokens=1000,
                   progress=False)
    assert len(one["sources"][0]["shards"]) == 1 and len(many["sources"][0]["shards"]) > 3
    assert np.array_equal(stream_of(tmp_path / "one"), stream_of(tmp_path / "many"))
    assert one["tokens"] == many["tokens"]
    again = prepare(str(corpus), tmp_path / "again", tokenizer="bpe", vocab_size=300, num_proc=1, shard_tokens=1000,
                    progress=False)
    assert [s["sha256"] for s in again["sources"][0]["shards"]] == [s["sha256"] for s in many["sources"][0]["shards"]]


def test_format_1_directory_still_loads(tmp_path: Path) -> None:
    d = tmp_path / "v1"
    d.mkdir()
    np.arange(500, dtype="<u2").tofile(d / "train.bin")
    np.arange(500, 560, dtype="<u2").tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": 600, "eot_id": 599,
                                             "dtype": "uint16", "tokens": {"train": 500, "val": 60}}))
    meta = load_meta(d)
    (src,) = open_sources(d, meta)
    assert src.name == "corpus" and len(src.train) == 500 and np.array_equal(src.val[:], np.arange(500, 560))
    assert verify_checksums(d, meta)  # no checksums recorded in this old directory: nothing to compare


def test_missing_and_corrupt_shards(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    meta = prepare(str(corpus), tmp_path / "d", tokenizer="char", num_proc=1, shard_tokens=2000, progress=False)
    shard = tmp_path / "d" / meta["sources"][0]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    load_meta(tmp_path / "d")  # sizes still match
    with pytest.raises(GptforgeError, match=r"000001.bin does not match its sha256 in meta.json"):
        verify_checksums(tmp_path / "d", meta)
    assert not verify_checksums(tmp_path / "d", meta, max_bytes=10)  # too big to hash at start: skipped
    shard.unlink()
    with pytest.raises(GptforgeError, match=r"shard .*000001.bin listed in meta.json is missing"):
        load_meta(tmp_path / "d")


def test_finished_data_is_replaced_only_with_overwrite_and_only_own_files(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "d"
    first = prepare(str(corpus), out, tokenizer="char", num_proc=1, shard_tokens=2000, progress=False)
    (out / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(GptforgeError, match="already holds prepared data.*--overwrite"):
        prepare(str(corpus), out, tokenizer="bpe", vocab_size=300, num_proc=1, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # a run's data is never lost
    corpus.write_text(TEXT[: len(TEXT) // 3])
    second = prepare(str(corpus), out, tokenizer="char", num_proc=1, shard_tokens=2000, progress=False,
                     overwrite=True)
    assert len(second["sources"][0]["shards"]) < len(first["sources"][0]["shards"])
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(["notes.txt", "meta.json", "char_tokenizer.json",
                            *(s["file"] for s in second["sources"][0]["shards"])])
