"""13-gram contamination: planted overlaps are found (through GPT-3's normalisation), near misses are not, and
the training text decoded from shards is scanned whole, across chunk boundaries."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gptforge.data import contamination
from gptforge.data.contamination import find_contaminated, normalize, run_contamination, training_texts
from gptforge.data.prepare import prepare

VOCAB = [f"w{i}" for i in range(5000)]


def words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def planted(rng: random.Random):
    """Training documents and benchmark items: some items share exactly 13 words in a row with the training text
    (with other case and punctuation), some share 12, some are too short to check."""
    train = [" ".join(words(rng, 200)) for _ in range(50)]
    items, dirty = [], set()
    for i in range(30):
        item = words(rng, 40)
        kind = i % 3
        if kind == 0:  # a 13-gram from a training document, dressed differently
            src = train[rng.randrange(50)].split()
            at = rng.randrange(len(src) - 13)
            piece = [w.upper() + ("," if j % 4 == 0 else "") for j, w in enumerate(src[at:at + 13])]
            item[10:23] = piece
            dirty.add(f"id{i}")
        elif kind == 1:  # only 12 words in a row
            src = train[rng.randrange(50)].split()
            at = rng.randrange(len(src) - 12)
            item[10:22] = src[at:at + 12]
        items.append(("taskA" if i < 15 else "taskB", f"id{i}", " ".join(item)))
    items.append(("taskB", "short", " ".join(train[0].split()[:12])))  # 12 training words: too short
    return train, items, dirty


def test_planted_overlaps_found() -> None:
    train, items, dirty = planted(random.Random(0))
    result = find_contaminated(items, (("src", t) for t in train))
    found = {i for t in result["tasks"].values() for i in t["dirty_ids"]}
    assert found == dirty
    a, b = result["tasks"]["taskA"], result["tasks"]["taskB"]
    assert a["items"] == 15 and b["items"] == 16 and b["too_short"] == 1 and "short" in b["clean_ids"]
    assert a["dirty"] + b["dirty"] == 10 and a["by_source"] == {"src": a["dirty"]}
    assert a["dirty_fraction"] == pytest.approx(a["dirty"] / 15, abs=1e-6)
    assert result["training_words"] == 50 * 200


def test_normalisation() -> None:
    assert normalize("Don't STOP -- the @-@ end_game!\n  Now") == ["don", "t", "stop", "the", "end", "game", "now"]
    assert normalize("a high-quality 1,000") == normalize("A high @-@ quality 1 @,@ 000")


def test_training_text_from_shards_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(1)
    docs = [" ".join(words(rng, rng.randint(20, 300))) for _ in range(40)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(str(corpus), tmp_path / "data", tokenizer="bpe", vocab_size=400, val_fraction=0.0, num_proc=1,
            shard_tokens=3000, progress=False)
    monkeypatch.setattr(contamination, "_CHUNK_TOKENS", 1000)  # documents and words cut by chunk boundaries
    monkeypatch.setattr(contamination, "_CARRY_TOKENS", 200)
    assert [t for _, t in training_texts(tmp_path / "data")] == docs
    # An item made of the last 7 words of one document and the first 6 of the next is not in any document.
    straddle = " ".join(docs[3].split()[-7:] + docs[4].split()[:6])
    inside = " ".join(docs[7].split()[5:18])
    items = [("t", "straddle", straddle), ("t", "inside", inside), ("t", "clean", " ".join(words(rng, 30)))]
    out = tmp_path / "clean.json"
    report = run_contamination(tmp_path / "data", items, out=out, progress=False, report_path=tmp_path / "r.json")
    assert report["tasks"]["t"]["dirty_ids"] == ["inside"]
    assert json.loads(out.read_text()) == {"t": ["straddle", "clean"]}
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["t"]["dirty"] == 1
