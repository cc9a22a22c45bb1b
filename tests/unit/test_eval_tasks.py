"""Task readers on the fixture folder (the shared data layout) and their one-line errors; prompt formats."""

import bz2
import shutil
from pathlib import Path

import pytest

from gptforge.errors import GptforgeError
from gptforge.eval.prompts import format_item
from gptforge.eval.tasks import DATA_ENV, TASKS, data_dir_from, read_split, task_spec

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "eval"


@pytest.mark.parametrize("task", list(TASKS))
def test_every_reader_gives_ids_gold_and_contamination_text(task):
    docs = read_split(task, "eval", ASSETS)
    assert len(docs) == 12 and len({d.id for d in docs}) == 12
    for d in docs:
        assert d.text.strip()
        if "label" in d.fields and task not in ("sst2", "boolq"):
            prompt = format_item(task, d, "gpt3")
            # the contamination text holds the gold completion's words
            assert prompt.continuations[prompt.gold].strip().split()[-1].strip(".") in d.text
    train = read_split(task, "train", ASSETS)
    assert len(train) == (30 if TASKS[task].train_paths else 12)


def test_readers_keep_dataset_ids_and_values():
    arc = read_split("arc_easy", "eval", ASSETS)
    assert arc[0].id.startswith("Mercury_") or arc[0].id  # the dataset's own id
    wino = read_split("winogrande", "eval", ASSETS)
    assert wino[0].fields["sentence"].count("_") == 1 and wino[0].fields["label"] in (0, 1)
    hs = read_split("hellaswag", "eval", ASSETS)
    assert [d.id for d in hs[:3]] == ["0", "1", "2"] and len(hs[0].fields["endings"]) == 4
    lam = read_split("lambada", "eval", ASSETS)
    assert lam[0].fields["context"] + " " + lam[0].fields["word"] == lam[0].fields["text"]
    sst = read_split("sst2", "train", ASSETS)
    assert sst[0].fields["label"] in (0, 1) and sst[0].id == "0"


def test_hellaswag_plain_text_is_read_when_no_bz2(tmp_path):
    (tmp_path / "hellaswag").mkdir()
    plain = bz2.decompress((ASSETS / "hellaswag" / "hellaswag_val_full.txt.bz2").read_bytes())
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_bytes(plain)
    assert [d.fields for d in read_split("hellaswag", "eval", tmp_path)] == \
        [d.fields for d in read_split("hellaswag", "eval", ASSETS)]


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(ASSETS, root)
    return root


@pytest.mark.parametrize("task,rel,content,message", [
    ("arc_easy", "arc/ARC-Easy/ARC-Easy-Test.jsonl", '{"id": "x"}\n', "ARC-Easy-Test.jsonl:1: field"),
    ("arc_easy", "arc/ARC-Easy/ARC-Easy-Test.jsonl", '\n{broken\n', "ARC-Easy-Test.jsonl:2: not a JSON line"),
    ("piqa", "piqa/valid-labels.lst", "0\n1\n", "has 2 labels but its items file has 12 records"),
    ("winogrande", "winogrande/dev.jsonl", '{"qID": "a", "sentence": "no blank", "option1": "x", "option2": "y"}\n',
     "dev.jsonl:1: the sentence must hold exactly one '_'"),
    ("boolq", "boolq/val.jsonl", '{"question": "q", "passage": "p", "idx": 0, "label": "maybe"}\n', "not true/false"),
    ("lambada", "lambada/lambada_test.jsonl", "", "holds no records"),
    ("sst2", "sst2/dev.tsv", "text\tlabel\nfoo\t1\n", "first line is not the header"),
    ("hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", None, "not a positive multiple of 6"),
])
def test_malformed_files_are_one_line_errors_naming_the_file(tmp_path, task, rel, content, message):
    root = _copy(tmp_path)
    if content is None:
        (root / rel).write_bytes(bz2.compress(b"a: b\n0\nx\ny\n"))
    else:
        (root / rel).write_text(content, encoding="utf-8")
    with pytest.raises(GptforgeError) as info:
        read_split(task, "eval", root)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_file_unknown_task_and_data_dir(tmp_path, monkeypatch):
    with pytest.raises(GptforgeError, match="missing eval file .*piqa/valid.jsonl"):
        read_split("piqa", "eval", tmp_path)
    with pytest.raises(GptforgeError, match=r"unknown task 'hellaswg' \(did you mean 'hellaswag'\?\)"):
        task_spec("hellaswg")
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(GptforgeError, match="no eval data folder: pass --data_dir"):
        data_dir_from(None)
    monkeypatch.setenv(DATA_ENV, str(ASSETS))
    assert data_dir_from(None) == ASSETS
    with pytest.raises(GptforgeError, match="eval data folder not found"):
        data_dir_from(tmp_path / "nope")


def test_prompt_formats_follow_the_paper_and_lm_eval():
    arc = read_split("arc_easy", "eval", ASSETS)[0]
    p = format_item("arc_easy", arc, "gpt3")
    assert p.contexts[0] == f"Question: {arc.fields['question']}\nAnswer:"
    assert p.unconditional == tuple(("Answer:", c) for c in p.continuations)
    assert format_item("arc_easy", arc, "lm-eval").unconditional == ()
    wino = read_split("winogrande", "eval", ASSETS)[0]
    p = format_item("winogrande", wino, "gpt3")
    blank = wino.fields["sentence"].index("_")
    assert p.contexts == (wino.fields["sentence"][:blank] + wino.fields["option1"],
                          wino.fields["sentence"][:blank] + wino.fields["option2"])
    assert p.continuations[0] == p.continuations[1] == " " + wino.fields["sentence"][blank + 1:].strip()
    boolq = read_split("boolq", "eval", ASSETS)[0]
    assert format_item("boolq", boolq, "gpt3").continuations == (" False", " True")
    assert format_item("boolq", boolq, "lm-eval").continuations == (" no", " yes")
    sst = read_split("sst2", "eval", ASSETS)[0]
    assert format_item("sst2", sst, "gpt3").continuations == (" negative", " positive")
    lam = read_split("lambada", "eval", ASSETS)[0]
    assert format_item("lambada", lam, "gpt3").contexts == (lam.fields["context"],)
    assert format_item("lambada", lam, "gpt3", few_shot=True).contexts == (lam.fields["context"] + " ____. ->",)
    assert format_item("lambada", lam, "gpt3", few_shot=True).demo.endswith("____. -> " + lam.fields["word"])
    piqa = read_split("piqa", "eval", ASSETS)[0]
    assert format_item("piqa", piqa, "lm-eval").contexts[0] == f"Question: {piqa.fields['goal']}\nAnswer:"
    with pytest.raises(GptforgeError, match="unknown protocol 'gpt-3'; allowed: gpt3, lm-eval"):
        format_item("piqa", piqa, "gpt-3")
