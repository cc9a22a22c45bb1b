"""Deduplication: planted near duplicates are removed, distinct documents kept, and the index resumes exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from gptforge.data.dedup import DedupConfig, Deduplicator, exact_hashes, jaccard, signatures
from gptforge.data.prepare import load_meta, prepare

WORDS = ("river stone market window garden lantern copper orchard meadow harbor violin thunder ember canyon "
         "glacier pepper saddle timber velvet walnut falcon marble quartz willow anchor bramble cobalt dune").split()


def doc(rng: random.Random, n_words: int = 300) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(n_words)) + "."


def mutate(text: str, rng: random.Random, n_changes: int) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), n_changes):
        words[i] = "CHANGED" + str(i)
    return " ".join(words)


def planted_corpus(rng: random.Random) -> tuple[list[str], set[int]]:
    """40 distinct documents, plus near copies (2 of 300 words changed) and exact copies (other case and
    spacing); returns the documents and the indices that must be removed."""
    originals = [doc(rng) for _ in range(40)]
    docs, dupes = list(originals), set()
    for k in range(10):
        docs.append(mutate(originals[k], rng, 2))
        dupes.add(len(docs) - 1)
    for k in range(10, 15):
        docs.append("  " + originals[k].upper().replace(" ", "   "))
        dupes.add(len(docs) - 1)
    return docs, dupes


def test_planted_near_duplicates_removed_distinct_kept(tmp_path: Path) -> None:
    docs, dupes = planted_corpus(random.Random(0))
    cfg = DedupConfig()
    dedup = Deduplicator(cfg, tmp_path / "rows")
    sigs, exact = signatures(docs, cfg), exact_hashes(docs)
    verdicts = [dedup.check(i, int(exact[i]), sigs[i])[0] for i in range(len(docs))]
    removed = {i for i, v in enumerate(verdicts) if v}
    assert removed == dupes
    assert {verdicts[i] for i in range(40, 50)} == {"near_duplicate"}
    assert {verdicts[i] for i in range(50, 55)} == {"exact_duplicate"}
    assert jaccard(docs[0], docs[40], cfg.shingle) > 0.8 > jaccard(docs[0], docs[1], cfg.shingle)


def test_index_resumes_from_its_rows(tmp_path: Path) -> None:
    docs, _ = planted_corpus(random.Random(1))
    cfg = DedupConfig()
    sigs, exact = signatures(docs, cfg), exact_hashes(docs)
    full = Deduplicator(cfg, tmp_path / "a")
    expected = [full.check(i, int(exact[i]), sigs[i]) for i in range(len(docs))]
    first = Deduplicator(cfg, tmp_path / "b")
    got = [first.check(i, int(exact[i]), sigs[i]) for i in range(45)]
    rows = first.rows
    for i in range(45, 50):  # written after the "checkpoint": dropped on resume
        first.check(i, int(exact[i]), sigs[i])
    first.close()
    resumed = Deduplicator(cfg, tmp_path / "b", resume_rows=rows)
    got += [resumed.check(i, int(exact[i]), sigs[i]) for i in range(45, len(docs))]
    assert got == expected


def test_signatures_are_stable_and_shingle_sensitive() -> None:
    cfg = DedupConfig(num_perm=64)
    a = signatures(["the quick brown fox jumps over the lazy dog again"], cfg)
    b = signatures(["The quick brown fox, jumps over the lazy dog again!"], cfg)
    assert a.dtype == np.uint32 and a.shape == (1, 64)
    assert np.array_equal(a, b)  # case and punctuation are normalised away
    with pytest.raises(Exception, match="threshold"):
        DedupConfig(threshold=1.5).check()


def test_prepare_dedup_counts_and_report(tmp_path: Path) -> None:
    docs, dupes = planted_corpus(random.Random(2))
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    report = tmp_path / "report.jsonl"
    meta = prepare(str(corpus), tmp_path / "out", tokenizer="char", val_fraction=0.1, num_proc=1,
                   dedup=DedupConfig(), dedup_report=report, progress=False)
    src = meta["sources"][0]
    assert src["documents"] == len(docs) and src["kept"] == len(docs) - len(dupes)
    assert src["removed"] == {"quality": 0, "exact_duplicate": 5, "near_duplicate": 10}
    assert load_meta(tmp_path / "out")["sources"][0]["removed"] == src["removed"]
    pairs = [json.loads(line) for line in report.read_text().splitlines()]
    near = [p for p in pairs if p["kind"] == "near_duplicate"]
    assert len(near) == 10 and all(p["jaccard"] > 0.8 and p["kept"]["index"] < p["removed"]["index"] for p in near)
    assert near[0]["kept"]["text"] == docs[near[0]["kept"]["index"]][:300]
