"""Task readers: the standard public file formats of the few-shot evaluation sets, read from local files.

Each reader returns a list of `Doc`: a stable `id` (the dataset's own id where it has one, else the 0-based
record index in its file), the task's fields normalised to plain Python values, and `text`, the item's
context plus its gold completion in plain words (what a 13-gram contamination check compares against the
training corpus). The readers know nothing about prompts, tokenizers or models, so other tools (the
contamination check) can import them:

    from gptforge.eval.tasks import TASKS, data_dir_from, read_split
    docs = read_split("arc_easy", "eval", data_dir_from(None))   # or TASKS["arc_easy"]

Where the files are: `--data_dir DIR` or the environment variable GPTFORGE_EVAL_DATA; the layout below
(paths relative to it) is that of the project's shared data folder, described in its README. A missing or
malformed file is a one-line `GptforgeError` naming the file (and line) and the expected format.
"""

from __future__ import annotations

import bz2
import csv
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError
from gptforge.utils.io import parse_jsonl

DATA_ENV = "GPTFORGE_EVAL_DATA"


@dataclass(frozen=True)
class Doc:
    """One evaluation item: `id` (str, stable), `fields` (task-specific, see each reader) and `text` (context
    plus gold completion, for contamination checks)."""

    id: str
    fields: dict[str, Any] = field(compare=False)
    text: str = field(compare=False)


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's items and demonstrations come from.

    Attributes:
        name: the task name used on the command line.
        eval_split: (reader, relative path(s)) of the evaluated split.
        train_split: (reader, path(s)) of the split demonstrations are drawn from, or None when the set has no
            training split here: then shots come from the evaluated split itself, the item excluded.
        shots_note: one line for the docs and JSON saying where the shots come from.
    """

    name: str
    reader: Callable[..., list[Doc]]
    eval_paths: tuple[str, ...]
    train_paths: tuple[str, ...] | None
    shots_note: str


def _open_text(path: Path):
    """Open a UTF-8 text file; `X.bz2` is read compressed, or as the plain file `X` when only that exists."""
    if not path.is_file() and path.suffix == ".bz2" and path.with_suffix("").is_file():
        path = path.with_suffix("")
    if not path.is_file():
        raise GptforgeError(f"missing eval file {path}")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _jsonl(path: Path, expected: str) -> list[dict[str, Any]]:
    with _open_text(path) as f:
        try:
            lines = list(f)
        except (UnicodeDecodeError, OSError, EOFError) as exc:
            raise GptforgeError(f"cannot read {path}: {exc}; expected {expected}") from None
    return [rec for _, rec in parse_jsonl(lines, path, expected)]


def _get(rec: dict, key: str, kind: type, path: Path, n: int, expected: str):
    value = rec.get(key)
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise GptforgeError(f"{path}:{n}: field {key!r} missing or not a {'non-empty ' if kind is str else ''}"
                            f"{kind.__name__}; expected {expected}")
    return value


def _labels(path: Path, count: int, allowed: tuple[str, ...]) -> list[str]:
    with _open_text(path) as f:
        labels = [line.strip() for line in f if line.strip()]
    if len(labels) != count:
        raise GptforgeError(f"{path} has {len(labels)} labels but its items file has {count} records; "
                            f"expected one label per line, aligned with the items")
    for n, label in enumerate(labels, 1):
        if label not in allowed:
            raise GptforgeError(f"{path}:{n}: label {label!r} is not one of {', '.join(allowed)}")
    return labels


def read_hellaswag(root: Path, rel: str) -> list[Doc]:
    """llama.cpp's HellaSwag text (bz2 or plain): 6 lines per item: `label: context`, gold index 0-3, four
    endings. Fields: context, endings (4 str), label (int). Id: the 0-based item index."""
    path = root / rel
    expected = "6 lines per item: context, gold index 0-3, four endings (llama.cpp hellaswag format)"
    with _open_text(path) as f:
        try:
            lines = f.read().split("\n")
        except (UnicodeDecodeError, OSError, EOFError) as exc:
            raise GptforgeError(f"cannot read {path}: {exc}; expected {expected}") from None
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) % 6:
        raise GptforgeError(f"{path} has {len(lines)} lines, not a positive multiple of 6; expected {expected}")
    docs = []
    for i in range(0, len(lines), 6):
        context, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        if gold not in ("0", "1", "2", "3") or not context.strip() or not all(e.strip() for e in endings):
            raise GptforgeError(f"{path}:{i + 1}: malformed item (line {i + 2} must be 0-3 and no line empty); "
                                f"expected {expected}")
        label = int(gold)
        docs.append(Doc(str(i // 6), {"context": context, "endings": endings, "label": label},
                        f"{context} {endings[label]}"))
    return docs


def read_arc(root: Path, rel: str) -> list[Doc]:
    """ARC JSONL: {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}. Fields:
    question, choices (texts), labels, label (index of answerKey). Id: the dataset's id."""
    path = root / rel
    expected = 'ARC JSONL {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}'
    docs = []
    for n, rec in enumerate(_jsonl(path, expected), 1):
        q = _get(rec, "question", dict, path, n, expected)
        stem = _get(q, "stem", str, path, n, expected)
        choices = _get(q, "choices", list, path, n, expected)
        if len(choices) < 2 or not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
            raise GptforgeError(f"{path}:{n}: 'choices' must be a list of at least 2 {{text, label}}; "
                                f"expected {expected}")
        labels = [str(c.get("label")) for c in choices]
        key = str(rec.get("answerKey"))
        if key not in labels:
            raise GptforgeError(f"{path}:{n}: answerKey {key!r} is not one of the labels {labels}")
        texts = [c["text"] for c in choices]
        doc_id = str(rec.get("id") or n - 1)
        docs.append(Doc(doc_id, {"question": stem, "choices": texts, "labels": labels,
                                 "label": labels.index(key)}, f"{stem} {texts[labels.index(key)]}"))
    return docs


def read_piqa(root: Path, rels: tuple[str, str]) -> list[Doc]:
    """PIQA JSONL {"goal", "sol1", "sol2"} plus a line-aligned label file (0 or 1). Fields: goal, sol1, sol2,
    label (int). Id: the 0-based line index."""
    path = root / rels[0]
    expected = 'PIQA JSONL {"goal", "sol1", "sol2"} with a line-aligned labels file of 0/1'
    recs = _jsonl(path, expected)
    items = [(_get(rec, "goal", str, path, n, expected), [_get(rec, k, str, path, n, expected)
                                                          for k in ("sol1", "sol2")]) for n, rec in enumerate(recs, 1)]
    labels = _labels(root / rels[1], len(recs), ("0", "1"))
    docs = []
    for n, ((goal, sols), label) in enumerate(zip(items, labels), 1):
        docs.append(Doc(str(n - 1), {"goal": goal, "sol1": sols[0], "sol2": sols[1], "label": int(label)},
                        f"{goal} {sols[int(label)]}"))
    return docs


def read_winogrande(root: Path, rels: tuple[str, str]) -> list[Doc]:
    """WinoGrande JSONL {"qID", "sentence" with one "_", "option1", "option2"} plus a label file (1 or 2).
    Fields: sentence, option1, option2, label (0 or 1). Id: qID."""
    path = root / rels[0]
    expected = 'WinoGrande JSONL {"qID", "sentence" (one "_"), "option1", "option2"} with a labels file of 1/2'
    recs = _jsonl(path, expected)
    for n, rec in enumerate(recs, 1):
        if _get(rec, "sentence", str, path, n, expected).count("_") != 1:
            raise GptforgeError(f"{path}:{n}: the sentence must hold exactly one '_' blank; expected {expected}")
    labels = _labels(root / rels[1], len(recs), ("1", "2"))
    docs = []
    for n, (rec, label) in enumerate(zip(recs, labels), 1):
        sentence = rec["sentence"]
        opts = [_get(rec, k, str, path, n, expected) for k in ("option1", "option2")]
        gold = int(label) - 1
        docs.append(Doc(str(rec.get("qID") or n - 1), {"sentence": sentence, "option1": opts[0],
                                                       "option2": opts[1], "label": gold},
                        sentence.replace("_", opts[gold])))
    return docs


def read_boolq(root: Path, rel: str) -> list[Doc]:
    """BoolQ SuperGLUE JSONL {"question", "passage", "idx", "label": true/false}. Fields: passage, question,
    label (1 for true). Id: idx."""
    path = root / rel
    expected = 'BoolQ JSONL {"question", "passage", "idx", "label": "true"|"false"}'
    docs = []
    for n, rec in enumerate(_jsonl(path, expected), 1):
        passage, question = _get(rec, "passage", str, path, n, expected), _get(rec, "question", str, path, n,
                                                                                expected)
        label = str(rec.get("label")).lower()
        if label not in ("true", "false"):
            raise GptforgeError(f"{path}:{n}: label {rec.get('label')!r} is not true/false; expected {expected}")
        docs.append(Doc(str(rec.get("idx", n - 1)), {"passage": passage, "question": question,
                                                      "label": int(label == "true")},
                        f"{passage} {question}? {label}"))
    return docs


def read_lambada(root: Path, rel: str) -> list[Doc]:
    """LAMBADA (OpenAI version) JSONL {"text"}; the task is the last space-separated word. Fields: text,
    context (all but the last word), word. Id: the 0-based line index."""
    path = root / rel
    expected = 'LAMBADA JSONL {"text"} whose last space-separated word is the target'
    docs = []
    for n, rec in enumerate(_jsonl(path, expected), 1):
        text = _get(rec, "text", str, path, n, expected).rstrip()
        context, _, word = text.rpartition(" ")
        if not context.strip() or not word:
            raise GptforgeError(f"{path}:{n}: the text needs at least two space-separated words; expected {expected}")
        docs.append(Doc(str(n - 1), {"text": text, "context": context, "word": word}, text))
    return docs


def read_sst2(root: Path, rel: str) -> list[Doc]:
    """GLUE SST-2 TSV with header `sentence<TAB>label` (0 negative, 1 positive). Fields: sentence, label.
    Id: the 0-based row index (header excluded)."""
    path = root / rel
    expected = "SST-2 TSV with header 'sentence<TAB>label' and labels 0/1"
    with _open_text(path) as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or [c.strip() for c in rows[0][:2]] != ["sentence", "label"]:
        raise GptforgeError(f"{path}: first line is not the header; expected {expected}")
    docs = []
    for n, row in enumerate(rows[1:], 2):
        if len(row) != 2 or row[1].strip() not in ("0", "1") or not row[0].strip():
            raise GptforgeError(f"{path}:{n}: malformed row; expected {expected}")
        docs.append(Doc(str(n - 2), {"sentence": row[0].strip(), "label": int(row[1])}, row[0].strip()))
    if not docs:
        raise GptforgeError(f"{path} holds no rows; expected {expected}")
    return docs


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("lambada", read_lambada, ("lambada/lambada_test.jsonl",), None,
             "no training split here: shots are other items of the test split"),
    TaskSpec("hellaswag", read_hellaswag, ("hellaswag/hellaswag_val_full.txt.bz2",), None,
             "no training split here: shots are other items of the validation split"),
    TaskSpec("piqa", read_piqa, ("piqa/valid.jsonl", "piqa/valid-labels.lst"), None,
             "no training split here: shots are other items of the validation split"),
    TaskSpec("arc_easy", read_arc, ("arc/ARC-Easy/ARC-Easy-Test.jsonl",), ("arc/ARC-Easy/ARC-Easy-Train.jsonl",),
             "shots from ARC-Easy train"),
    TaskSpec("arc_challenge", read_arc, ("arc/ARC-Challenge/ARC-Challenge-Test.jsonl",),
             ("arc/ARC-Challenge/ARC-Challenge-Dev.jsonl",),
             "no ARC-Challenge train split here: shots from ARC-Challenge dev"),
    TaskSpec("winogrande", read_winogrande, ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
             ("winogrande/train_m.jsonl", "winogrande/train_m-labels.lst"), "shots from WinoGrande train_m"),
    TaskSpec("boolq", read_boolq, ("boolq/val.jsonl",), None,
             "no training split here: shots are other items of the validation split"),
    TaskSpec("sst2", read_sst2, ("sst2/dev.tsv",), ("sst2/train.tsv",), "shots from SST-2 train"),
]}


def task_spec(name: str) -> TaskSpec:
    """The spec of task `name`; raises GptforgeError naming the closest known task for an unknown one."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, list(TASKS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise GptforgeError(f"unknown task {name!r}{hint}; known tasks: {', '.join(TASKS)}")


def data_dir_from(data_dir: str | os.PathLike | None) -> Path:
    """The eval data folder: `data_dir`, else $GPTFORGE_EVAL_DATA; raises GptforgeError if neither is set or
    the folder does not exist."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not chosen:
        raise GptforgeError(f"no eval data folder: pass --data_dir DIR (or set {DATA_ENV}) pointing at a folder "
                            f"with hellaswag/, arc/, piqa/, ... as described in docs/evaluation.md")
    path = Path(chosen)
    if not path.is_dir():
        raise GptforgeError(f"eval data folder not found: {path}")
    return path


def read_split(name: str, split: str, root: Path) -> list[Doc]:
    """Read task `name`'s `split` ("eval" or "train") from the folder `root`.

    Returns the split's docs, or for "train" of a task without a training split, the eval docs (the caller
    excludes the evaluated item from its own shots).

    Raises:
        GptforgeError: unknown task or split, a missing or malformed file.
    """
    spec = task_spec(name)
    if split not in ("eval", "train"):
        raise GptforgeError(f"unknown split {split!r}; allowed: eval, train")
    paths = spec.eval_paths if split == "eval" or spec.train_paths is None else spec.train_paths
    return spec.reader(root, paths if len(paths) > 1 else paths[0])
