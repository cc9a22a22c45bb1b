"""Pretraining on a weighted mixture: per-source tokens seen follow the weights, per-source validation loss is
reported, and a run resumed from a checkpoint is bitwise the run left alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import shared_data_dir, skip_without_shared_data
from gptforge.config import load_config
from gptforge.data.prepare import prepare
from gptforge.train.pretrain import pretrain

WEIGHTS = {"ptb": 0.5, "wiki": 0.3, "shakespeare": 0.2}
T = 16


@pytest.fixture(scope="module")
def mixture_data(tmp_path_factory) -> Path:
    root = shared_data_dir()
    if not (root / "ptb" / "ptb.valid.txt").is_file():
        skip_without_shared_data(root)
    tmp = tmp_path_factory.mktemp("mix")
    mix = tmp / "mix.yaml"
    mix.write_text(f"sources:\n"
                   f"  ptb: {{corpus: {root}/ptb/ptb.valid.txt, weight: 5, documents: lines}}\n"
                   f"  wiki: {{corpus: {root}/wikitext-2/wiki.valid.tokens, weight: 3, documents: paragraphs}}\n"
                   f"  shakespeare: {{corpus: {root}/tinyshakespeare/input.txt, weight: 2}}\n")
    prepare(None, tmp / "data", mixture=mix, tokenizer="char", num_proc=1, progress=False)
    return tmp / "data"


def run(data: Path, out: Path, resume: str | None = None):
    cfg = load_config(preset="debug", overrides=[("max_steps", 20), ("checkpoint_interval", 10), ("log_interval", 5),
                                                 ("eval_interval", 10), ("eval_tokens", 2048), ("dropout", 0.1)])
    return pretrain(cfg, data, out, progress=False, resume=resume)


def test_mixture_proportions_val_sets_and_exact_resume(mixture_data: Path, tmp_path: Path) -> None:
    meta = json.loads((mixture_data / "meta.json").read_text())
    assert [s["name"] for s in meta["sources"]] == list(WEIGHTS)
    assert [s["weight"] for s in meta["sources"]] == list(WEIGHTS.values())
    result = run(mixture_data, tmp_path / "a")
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == 20 and result.tokens_seen == last["tokens_seen"]
    seen = {name: last[f"tokens_seen/{name}"] for name in WEIGHTS}
    assert sum(seen.values()) == result.tokens_seen
    for name, weight in WEIGHTS.items():
        assert abs(seen[name] - weight * result.tokens_seen) <= T  # within one window
        train_tokens = next(s["tokens"]["train"] for s in meta["sources"] if s["name"] == name)
        assert last[f"epochs/{name}"] == pytest.approx(seen[name] / train_tokens, abs=1e-6)
        assert 1.0 < result.val_metrics[f"val_loss/{name}"] < 5.0
    assert set(result.val_metrics) == {"val_loss", *(f"val_loss/{n}" for n in WEIGHTS)}

    # Resume from the step-10 checkpoint in a fresh directory: the same weights and logged numbers at step 20.
    resumed = tmp_path / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000010", resumed / "checkpoints" / "step_00000010")
    shutil.copy(tmp_path / "a" / "metrics.jsonl", resumed / "metrics.jsonl")
    run(mixture_data, resumed, resume="latest")
    final = "checkpoints/step_00000020/model.safetensors"
    wa, wb = load_file(str(tmp_path / "a" / final)), load_file(str(resumed / final))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "elapsed_s")}  # noqa: E731
    after = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [strip(r) for r in after] == [strip(r) for r in rows]
