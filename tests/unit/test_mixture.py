"""Mixture files (errors and normalisation) and the weighted window source (proportions, determinism, resume,
world-size invariance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge.data.dataset import MixtureSource
from gptforge.data.mixture import load_mixture
from gptforge.errors import GptforgeError


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "a.txt").write_text("alpha text\n")
    (tmp_path / "b.txt").write_text("bravo text\n")
    path = tmp_path / "mix.yaml"
    path.write_text(text)
    return path


def test_mixture_file_resolves_paths_and_normalises(tmp_path: Path) -> None:
    path = write(tmp_path, "sources:\n  a: {corpus: a.txt, weight: 3, documents: lines}\n"
                           "  b: {corpus: b.txt, weight: 1, quality_filter: true}\n  c: {corpus: shakespeare, weight: 1}\n")
    specs, note = load_mixture(path)
    assert [s.name for s in specs] == ["a", "b", "c"]
    assert specs[0].corpus == str(tmp_path / "a.txt") and specs[2].corpus == "shakespeare"
    assert [s.weight for s in specs] == [0.6, 0.2, 0.2] and specs[0].documents == "lines" and specs[1].quality_filter
    assert "sum to 5, not 1; normalised to a 0.6, b 0.2, c 0.2" in note
    ok = write(tmp_path, "sources:\n  a: {corpus: a.txt, weight: 0.5}\n  b: {corpus: b.txt, weight: 0.5}\n")
    assert load_mixture(ok)[1] is None


@pytest.mark.parametrize("body, message", [
    ("sources:\n  a: {corpus: a.txt, weight: 0}\n", "source 'a': weight must be a positive number, got 0"),
    ("sources:\n  a: {corpus: a.txt, weight: -1}\n", "weight must be a positive number, got -1"),
    ("sources:\n  a: {corpus: a.txt}\n", "weight must be a positive number, got None"),
    ("sources:\n  a: {corpus: nope.txt, weight: 1}\n", "source 'a': corpus not found: "),
    ("sources:\n  a: {corpus: a.txt, wieght: 1}\n", "unknown key 'wieght' (did you mean 'weight'?)"),
    ("sources:\n  a: {corpus: a.txt, weight: 1, documents: pages}\n", "documents must be one of file, lines"),
    ("sources:\n  'a/b': {corpus: a.txt, weight: 1}\n", "source name 'a/b' must be"),
    ("sources: {}\n", "expected one top-level key `sources:`"),
    ("srcs:\n  a: {corpus: a.txt, weight: 1}\n", "expected one top-level key `sources:`"),
    ("sources: [oops\n", "not readable YAML"),
])
def test_mixture_file_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(GptforgeError) as err:
        load_mixture(write(tmp_path, body))
    assert message in str(err.value) and "\n" not in str(err.value)


def make_source(world_size: int = 1, rank: int = 0, seed: int = 0) -> MixtureSource:
    streams = [np.arange(k * 10000, k * 10000 + n, dtype=np.uint16) for k, n in enumerate((500, 80, 3000))]
    return MixtureSource(streams, [0.5, 0.3, 0.2], ["x", "y", "z"], context_length=8, micro_batch_size=4,
                         seed=seed, rank=rank, world_size=world_size)


def test_proportions_follow_weights_to_within_one_row() -> None:
    src = make_source()
    for step in range(1, 201):
        batch = src.next_batch()
        total = 4 * step
        assert all(abs(rows - w * total) <= 1 for rows, w in zip(src.rows, src.weights))
        # every row is a window of the source it is labelled with, targets shifted by one
        for row, tgt, s in zip(batch.tokens, batch.targets, batch.source_ids.tolist()):
            assert int(row[0]) // 10000 == s and torch.equal(row[1:], tgt[:-1])
    stats = src.log_stats()
    assert stats["tokens_seen/x"] == 400 * 8 and stats["tokens_seen/y"] == 240 * 8
    assert stats["epochs/y"] == pytest.approx(240 * 8 / 80)


def test_resume_is_exact_and_world_size_invariant() -> None:
    a = make_source()
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(5)]
    b = make_source(seed=123)
    b.load_state_dict(state)
    got = [b.next_batch() for _ in range(5)]
    assert all(torch.equal(x.tokens, y.tokens) and torch.equal(x.source_ids, y.source_ids) for x, y in zip(expected, got))
    # Two ranks with micro-batches of 4 see the rows of one rank with micro-batches of 8.
    whole = MixtureSource(make_source().streams, [0.5, 0.3, 0.2], ["x", "y", "z"], context_length=8,
                          micro_batch_size=8, seed=0)
    ranks = [make_source(world_size=2, rank=r) for r in (0, 1)]
    for _ in range(3):
        joined = torch.cat([r.next_batch().tokens for r in ranks])
        assert torch.equal(joined, whole.next_batch().tokens)
    with pytest.raises(GptforgeError, match="3 sources"):
        MixtureSource(a.streams[:2], [0.5, 0.5], ["x", "y"], context_length=8, micro_batch_size=4,
                      seed=0).load_state_dict(state)
