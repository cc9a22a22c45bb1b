"""`gptforge eval` end to end on the fixture data: table, JSON, per-item JSONL, --clean_only, perplexity,
the Python API, and every bad input as a one-line error."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import gptforge
from gptforge.checkpoint.io import save_checkpoint
from gptforge.cli.main import main
from gptforge.config import Config, ModelConfig
from gptforge.eval.tasks import TASKS
from gptforge.model.gpt import GPT
from gptforge.tokenizer import CharTokenizer, train_bpe

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "eval"


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(root: Path, tokenizer, context_length: int) -> Path:
    cfg = Config(model=ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, d_model=32,
                                   context_length=context_length))
    torch.manual_seed(0)
    save_checkpoint(root, step=1, cfg=cfg, tokenizer=tokenizer, model=GPT(cfg.model))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(ASSETS.rglob("*.jsonl")))
    return _run(tmp_path_factory.mktemp("evalcli") / "run", train_bpe([text], vocab_size=400), 256)


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_prints_table_and_writes_json_and_samples(run_dir, tmp_path, capsys):
    code, out, err = cli(capsys, "eval", run_dir, "--tasks", ",".join(TASKS), "--shots", "0,2", "--limit", "4",
                         "--data_dir", ASSETS, "--out", tmp_path / "r.json", "--samples", tmp_path / "s.jsonl",
                         "--batch_size", "7", "--perplexity", ASSETS / "wikitext-2" / "wiki.test.tokens", "--quiet")
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header[:6] == ["task", "K", "K_eff", "n", "metric", "value"] and "GPT-3" in header
    assert "arc_easy" in out and "acc_uncond*" in out and "perplexity" in out and "bits/byte" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["protocol"] == "gpt3" and report["seed"] == 1234 and len(report["model"]["sha256"]) == 64
    assert report["model"]["config"]["model"]["context_length"] == 256 and report["clean_only"] is None
    assert len(report["results"]) == 2 * len(TASKS) and "samples" not in report["results"][0]
    for r in report["results"]:
        assert r["n"] + r["n_skipped"] == 4 and r["metrics"][r["primary"]]["stderr"] is not None
        assert r["k"] in (0, 2) and 0 <= r["k_effective_mean"] <= r["k"]
        value = r["metrics"][r["primary"]]["value"]
        assert 0.0 <= value <= 1.0
    assert report["perplexity"][str(ASSETS / "wikitext-2" / "wiki.test.tokens")]["tokens"] > 100
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(samples) == sum(r["n"] for r in report["results"])
    arc = next(s for s in samples if s["task"] == "arc_easy" and s["k"] == 2)
    assert arc["prompt"].endswith("\nAnswer:") and arc["prompt"].count("\n\n") == 2
    assert len(arc["loglikelihoods"]) == len(arc["choices"]) == len(arc["unconditional_loglikelihoods"])
    assert set(arc["predictions"]) == {"acc", "acc_token_norm", "acc_norm", "acc_uncond"}


def test_clean_only_restricts_each_task_and_is_reported(run_dir, tmp_path, capsys):
    ids = {"piqa": ["0", "3", "7"], "hellaswag": []}
    (tmp_path / "clean.json").write_text(json.dumps(ids))
    code, out, err = cli(capsys, "eval", run_dir, "--tasks", "piqa,hellaswag,winogrande", "--data_dir", ASSETS,
                         "--clean_only", tmp_path / "clean.json", "--samples", tmp_path / "s.jsonl", "--quiet")
    assert code == 0, err
    assert "clean_only" in out
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert sorted(s["id"] for s in samples) == ["0", "3", "7"]  # tasks missing from the file: no items


def test_python_api_and_determinism_across_batch_sizes(run_dir):
    a = gptforge.evaluate(run_dir, "hellaswag,winogrande", shots=1, data_dir=ASSETS, batch_size=1)
    b = gptforge.evaluate(gptforge.load(run_dir), ["hellaswag", "winogrande"], shots=[1], data_dir=ASSETS,
                          batch_size=64)
    for ra, rb in zip(a["results"], b["results"]):
        assert ra["metrics"] == rb["metrics"]  # identical predictions
        for sa, sb in zip(ra["samples"], rb["samples"]):
            assert sa["id"] == sb["id"] and sa["prompt"] == sb["prompt"]
            assert max(abs(x - y) for x, y in zip(sa["loglikelihoods"], sb["loglikelihoods"])) <= 1e-5


def test_char_level_model_works_and_skips_items_it_cannot_encode(tmp_path, capsys):
    text = "".join(p.read_text(encoding="utf-8") for p in sorted((ASSETS / "piqa").glob("*.jsonl")))
    run = _run(tmp_path / "char", CharTokenizer(set(text + "0123456789")), 512)
    code, out, err = cli(capsys, "eval", run, "--tasks", "piqa,arc_easy", "--data_dir", ASSETS, "--quiet")
    assert code == 0, err
    piqa = next(line for line in out.splitlines() if line.startswith("piqa "))
    assert " 12 " in piqa  # every PIQA item is encodable with this vocabulary
    assert "arc_easy K=0:" in out and "not encodable" in out  # ARC text has characters outside it


@pytest.mark.parametrize("args,message", [
    (["--tasks", "hellaswg"], "unknown task 'hellaswg' (did you mean 'hellaswag'?)"),
    (["--tasks", "piqa", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["--tasks", "piqa", "--shots", "12"], "piqa: K=12 exceeds the 11 demonstrations available"),
    (["--tasks", "piqa", "--shots", "x"], "--shots must be integers"),
    (["--tasks", "piqa", "--protocol", "gpt-3"], "unknown --protocol 'gpt-3'; allowed: gpt3, lm-eval"),
    (["--tasks", "piqa", "--batch_size", "0"], "--batch_size must be >= 1"),
    ([], "nothing to do: give --tasks"),
    (["--perplexity", "/nonexistent.txt"], "perplexity file not found: /nonexistent.txt"),
])
def test_bad_input_is_a_one_line_error(run_dir, capsys, args, message):
    code, out, err = cli(capsys, "eval", run_dir, "--data_dir", ASSETS, "--quiet", *args)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_bad_paths_are_one_line_errors(run_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(ASSETS, data)
    (data / "boolq" / "val.jsonl").write_text('{"question": "q", "passage": "p", "idx": 0, "label": "true"}\n{oops\n')
    (tmp_path / "taken.json").write_text("{}")
    (tmp_path / "empty_run").mkdir()
    for args, message in [
        (["eval", run_dir, "--tasks", "boolq", "--data_dir", data], "val.jsonl:2: not a JSON line"),
        (["eval", tmp_path / "empty_run", "--tasks", "boolq", "--data_dir", data], "no checkpoint in"),
        (["eval", run_dir, "--tasks", "boolq", "--data_dir", tmp_path / "nope"], "eval data folder not found"),
        (["eval", run_dir, "--tasks", "piqa", "--data_dir", data, "--out", tmp_path / "taken.json"],
         "already exists; choose a new path"),
        (["eval", run_dir, "--tasks", "piqa", "--data_dir", data, "--clean_only", tmp_path / "none.json"],
         "--clean_only file not found"),
        (["eval", run_dir, "--perplexity", ASSETS / "wikitext-2" / "wiki.test.tokens", "--stride", "0"],
         "--stride must be in 1..256"),
    ]:
        code, out, err = cli(capsys, *args, "--quiet")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "taken.json").read_text() == "{}"  # never overwritten
