"""Quality filter: junk is filtered at a much higher rate than real text; the keep rule is GPT-3's Pareto rule."""

from __future__ import annotations

import gzip
import json
import random
import string
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_data_dir, skip_without_shared_data
from gptforge.data.prepare import prepare
from gptforge.data.quality import (
    QualityConfig,
    QualityFilter,
    keep_mask,
    pareto_draws,
    sample_texts,
    train_filter,
)
from gptforge.errors import GptforgeError


def junk(rng: random.Random, i: int) -> str:
    """Generated junk of three kinds: random characters, repeated boilerplate lines, markup."""
    kind = i % 3
    if kind == 0:
        return "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation + " ") for _ in range(400))
    if kind == 1:
        line = rng.choice(["click here to subscribe", "buy now best price", "home | about | contact", "log in"])
        return "\n".join([line] * rng.randint(5, 30))
    return "".join(f'<div class="{rng.choice(["nav", "hdr", "ftr"])}"><a href="/p/{rng.randint(0, 9999)}">'
                   f'{rng.choice(["home", "next", "prev", "login"])}</a></div>' for _ in range(10))


@pytest.fixture(scope="module")
def real_and_junk() -> dict[str, list[str]]:
    root = shared_data_dir()
    if not (root / "wikitext-2" / "wiki.valid.tokens").is_file():
        skip_without_shared_data(root)
    rng = random.Random(0)
    paragraphs = lambda p: [x for x in p.read_text(encoding="utf-8").split("\n \n") if x.strip()]  # noqa: E731
    ptb_lines = gzip.decompress((root / "ptb" / "ptb.train.txt.gz").read_bytes()).decode().splitlines()
    shakespeare = [x for x in (root / "tinyshakespeare" / "input.txt").read_text().split("\n\n") if x.strip()]
    return {
        "reference": paragraphs(root / "wikitext-2" / "wiki.valid.tokens"),
        "ptb": rng.sample([" ".join(ptb_lines[i:i + 8]) for i in range(0, len(ptb_lines), 8)], 300),
        "shakespeare": rng.sample(shakespeare, 300),
        "wikitext_test": rng.sample(paragraphs(root / "wikitext-2" / "wiki.test.tokens"), 300),
        "junk": [junk(rng, i) for i in range(2700)],
    }


def test_junk_filtered_much_more_than_real_text(real_and_junk, tmp_path: Path) -> None:
    """A crawl-like raw corpus (real text and three times as much junk) filtered against WikiText-2."""
    rng = random.Random(1)
    labelled = [(k, t) for k in ("ptb", "shakespeare", "wikitext_test", "junk") for t in real_and_junk[k]]
    rng.shuffle(labelled)
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t, "kind": k}) + "\n" for k, t in labelled))
    reference = tmp_path / "reference.jsonl"
    reference.write_text("".join(json.dumps({"text": t}) + "\n" for t in real_and_junk["reference"]))
    meta = prepare(str(raw), tmp_path / "out", tokenizer="char", num_proc=1, val_fraction=0.1, progress=False,
                   quality=QualityConfig(reference=str(reference)))
    # Which documents were kept: rescore with the saved filter and redraw with the same per-document rule.
    qfilter = QualityFilter.load(tmp_path / "out" / "quality_filter.npz")
    keep = keep_mask(qfilter.score([t for _, t in labelled]), pareto_draws(0, 0, np.arange(len(labelled)), 9.0))
    rates = {k: float(np.mean([kept for (kind, _), kept in zip(labelled, keep) if kind == k]))
             for k in ("ptb", "shakespeare", "wikitext_test", "junk")}
    assert meta["sources"][0]["kept"] == int(keep.sum())
    real = float(np.mean([kept for (kind, _), kept in zip(labelled, keep) if kind in ("ptb", "wikitext_test")]))
    print(f"keep rates: {rates}; real (PTB + WikiText test) {real:.4f}")
    assert rates["junk"] < 0.01
    assert real > 10 * rates["junk"] and rates["wikitext_test"] > 0.1
    assert meta["quality"]["positives"] == len(real_and_junk["reference"])


def test_pareto_rule_matches_numpy_pareto() -> None:
    draws = pareto_draws(0, 0, np.arange(200_000), 9.0)
    reference = np.random.default_rng(0).pareto(9.0, 200_000)
    assert np.array_equal(draws, pareto_draws(0, 0, np.arange(200_000), 9.0))  # reproducible
    assert not np.array_equal(draws[:100], pareto_draws(1, 0, np.arange(100), 9.0))  # seeded
    for q in (0.1, 0.5, 0.9, 0.99):
        assert abs(np.quantile(draws, q) - np.quantile(reference, q)) < 0.01
    # P(pareto(9) > 1 - score) = (2 - score) ** -9: a score of 0 keeps 0.2%, a score of 1 keeps all.
    scores = np.full(len(draws), 0.5)
    assert abs(keep_mask(scores, draws).mean() - 1.5 ** -9) < 0.003
    assert keep_mask(np.ones(10), draws[:10]).all()


def test_filter_save_load_and_errors(tmp_path: Path) -> None:
    f = train_filter(["the cat sat on the mat"] * 5 + ["a fine day"], ["zzkq xxvw"] * 6)
    path = f.save(tmp_path / "q.npz")
    g = QualityFilter.load(path)
    texts = ["the cat", "zzkq xxvw", "unrelated words"]
    assert np.array_equal(f.score(texts), g.score(texts)) and g.info == f.info
    assert f.score(["the cat sat"])[0] > 0.5 > f.score(["zzkq xxvw"])[0]
    (tmp_path / "bad.npz").write_bytes(b"not a filter")
    with pytest.raises(GptforgeError, match="not a gptforge quality filter"):
        QualityFilter.load(tmp_path / "bad.npz")
    with pytest.raises(GptforgeError, match="reference corpus has no documents"):
        train_filter([], ["x"])
    assert len(sample_texts((str(i) for i in range(1000)), 10, 0)) == 10


def test_empty_reference_is_a_one_line_error(tmp_path: Path) -> None:
    corpus, empty = tmp_path / "c.txt", tmp_path / "empty.txt"
    corpus.write_text("some text here\n" * 50)
    empty.write_text("")
    with pytest.raises(GptforgeError, match=r"^quality reference: corpus is empty: .*empty.txt"):
        prepare(str(corpus), tmp_path / "out", tokenizer="char", num_proc=1, progress=False,
                quality=QualityConfig(reference=str(empty)))
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.prepare").exists()


def test_saved_filter_is_reused(tmp_path: Path) -> None:
    rng = random.Random(3)
    good = [" ".join(rng.choice(["the", "river", "city", "history", "war", "king"]) for _ in range(30))
            for _ in range(60)]
    raw = [json.dumps({"text": t}) for t in good[:30] + [junk(rng, i) for i in range(90)]]
    (tmp_path / "raw.jsonl").write_text("\n".join(raw) + "\n")
    (tmp_path / "ref.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in good[30:]) + "\n")
    first = prepare(str(tmp_path / "raw.jsonl"), tmp_path / "a", tokenizer="char", num_proc=1, progress=False,
                    quality=QualityConfig(reference=str(tmp_path / "ref.jsonl")))
    again = prepare(str(tmp_path / "raw.jsonl"), tmp_path / "b", tokenizer="char", num_proc=1, progress=False,
                    quality=QualityConfig(filter_path=str(tmp_path / "a" / "quality_filter.npz")))
    assert first["sources"][0]["kept"] == again["sources"][0]["kept"] < 120
    assert first["sources"][0]["removed"]["quality"] > 80
    assert (tmp_path / "a" / "quality_filter.npz").read_bytes() == (tmp_path / "b" / "quality_filter.npz").read_bytes()
