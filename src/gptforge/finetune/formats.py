"""Labeled-data files -> examples: SFT rows as (text, scored) segments, classification rows as (text, label).

SFT formats (JSONL, one object per line, detected from the first line's fields):
    prompt/completion   {"prompt": P, "completion": C}      -> P | C            (field names: finetune.prompt_field,
                                                                                  finetune.completion_field)
    alpaca              {"instruction": I, "input": X, "output": O}  -> the Alpaca template below | O
    chat                {"messages": [{"role": R, "content": M}, ...]}  -> "R: M\n" per message, with only the
                        assistant messages' content (and their newline) in the completion part
Each example is a list of segments (text, scored); `tokenize_sft` encodes every segment on its own (so the
prompt's tokens are exactly what generation sees for that prompt) and appends end-of-text to the last scored
segment, so the model learns to stop. The templates are plain text (no special tokens), which suits base models.

Classification: TSV, CSV (with a header row) or JSONL with a text field and a label field (`sentence\tlabel`,
SST-2's format, works as is). Labels are strings; a training file's sorted label set gives the ids (numerically
sorted when every label is an integer). Knows nothing of models or training.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.utils.io import parse_jsonl

# Stanford Alpaca's prompt template (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}

Segments = list[tuple[str, bool]]  # (text, scored by the loss when prompts are masked)


@dataclass
class SFTExample:
    segments: Segments
    line: int  # 1-based line of the file, for error messages


@dataclass
class ClassExample:
    text: str
    label: str
    line: int


def read_text(path: Path) -> str:
    """The whole of a UTF-8 text file (a leading byte-order mark, as spreadsheet programs write, is dropped).

    Raises:
        GptforgeError: the file is not UTF-8 text (a binary file, another encoding), naming the byte offset.
    """
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GptforgeError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); expected a UTF-8 "
                            "JSONL/TSV/CSV or text file") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    # not splitlines: JSON strings may hold U+2028
    return parse_jsonl(read_text(path).split("\n"), path, "one JSON object per line (an example)")


def _text(obj: dict, name: str, path: Path, line: int, *, allow_empty: bool = False) -> str:
    if name not in obj:
        raise GptforgeError(f"{path}:{line}: missing field '{name}' (has {', '.join(sorted(obj)) or 'no fields'})")
    value = obj[name]
    if not isinstance(value, str):
        raise GptforgeError(f"{path}:{line}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise GptforgeError(f"{path}:{line}: field '{name}' is empty")
    return value


def sft_format(first: dict, prompt_field: str, completion_field: str) -> str:
    """The SFT format of a file from its first object's fields: "prompt_completion", "alpaca" or "chat"."""
    if "messages" in first:
        return "chat"
    if "instruction" in first and "output" in first:
        return "alpaca"
    if prompt_field in first or completion_field in first:
        return "prompt_completion"
    raise GptforgeError(f"cannot tell the SFT format from the fields {sorted(first)}: expected "
                        f"'{prompt_field}'/'{completion_field}' (set --prompt_field/--completion_field), "
                        "'instruction'/'input'/'output' (Alpaca) or 'messages' (chat)")


def _chat_segments(obj: dict, path: Path, line: int) -> Segments:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise GptforgeError(f"{path}:{line}: field 'messages' must be a non-empty list")
    segments: Segments = []
    for j, m in enumerate(messages):
        where = f"{path}:{line}: messages[{j}]"
        if not isinstance(m, dict):
            raise GptforgeError(f"{where} must be an object with 'role' and 'content'")
        for name in ("role", "content"):
            if not isinstance(m.get(name), str):
                raise GptforgeError(f"{where}: missing field '{name}' (a string)")
        if m["role"] not in CHAT_ROLES:
            raise GptforgeError(f"{where}: role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}")
        last = j == len(messages) - 1
        if m["role"] == "assistant":
            if not m["content"].strip():
                raise GptforgeError(f"{where}: empty assistant message")
            segments += [("Assistant: ", False), (m["content"] + ("" if last else "\n"), True)]
        else:
            segments.append((f"{CHAT_ROLES[m['role']]}: {m['content']}\n", False))
    if messages[-1]["role"] != "assistant":
        raise GptforgeError(f"{path}:{line}: the last message must be the assistant's (the completion to learn)")
    return segments


def read_sft(path: str | Path, *, prompt_field: str = "prompt", completion_field: str = "completion"
             ) -> tuple[list[SFTExample], str]:
    """Read an SFT JSONL file. Returns (examples, format name).

    Raises:
        GptforgeError: a missing file, invalid JSON, an unknown format, a missing or non-string field or an empty
            completion (each naming the line and the field).
    """
    path = Path(path)
    if not path.is_file():
        raise GptforgeError(f"data file not found: {path}")
    rows = _read_jsonl(path)
    fmt = sft_format(rows[0][1], prompt_field, completion_field)
    examples = []
    for line, obj in rows:
        if fmt == "chat":
            if "messages" not in obj:
                raise GptforgeError(f"{path}:{line}: missing field 'messages'")
            segments = _chat_segments(obj, path, line)
        elif fmt == "alpaca":
            instruction = _text(obj, "instruction", path, line)
            extra = _text(obj, "input", path, line, allow_empty=True) if "input" in obj else ""
            prompt = (ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT).format(instruction=instruction,
                                                                                      input=extra)
            segments = [(prompt, False), (_text(obj, "output", path, line), True)]
        else:
            segments = [(_text(obj, prompt_field, path, line, allow_empty=True), False),
                        (_text(obj, completion_field, path, line), True)]
        examples.append(SFTExample(segments, line))
    return examples, fmt


def tokenize_sft(segments: Segments, tokenizer, *, mask_prompt: bool = True) -> tuple[list[int], list[bool]]:
    """Token ids of one SFT example and, per id, whether it is a scored *target* (predicted by the loss).

    Each segment is encoded on its own; end-of-text is appended after the last scored segment (and scored).
    With `mask_prompt` False every token after the first is scored.

    Returns:
        (ids, scored): `scored[i]` says whether `ids[i]` is predicted (so the next-token target at position i-1).
    """
    ids: list[int] = []
    scored: list[bool] = []
    for text, is_completion in segments:
        piece = tokenizer.encode(text) if text else []
        ids += piece
        scored += [is_completion or not mask_prompt] * len(piece)
    ids.append(tokenizer.eot_id)
    scored.append(True)
    scored[0] = False  # nothing predicts the first token
    return ids, scored


def _sniff_delimiter(path: Path, header: str) -> str:
    if path.suffix.lower() == ".tsv" or "\t" in header:
        return "\t"
    return ","


def read_classification(path: str | Path, *, text_field: str = "", label_field: str = "label"
                        ) -> tuple[list[ClassExample], str]:
    """Read a classification file (TSV/CSV with a header row, or JSONL). Returns (examples, text field used).

    `text_field` "" picks "sentence" or "text", whichever the file has.

    Raises:
        GptforgeError: a missing file, a missing field (naming the line), or an empty text or label.
    """
    path = Path(path)
    if not path.is_file():
        raise GptforgeError(f"data file not found: {path}")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    else:
        f = io.StringIO(read_text(path), newline="")
        header = f.readline()
        f.seek(0)
        reader = csv.DictReader(f, delimiter=_sniff_delimiter(path, header), quoting=csv.QUOTE_NONE
                                if "\t" in header else csv.QUOTE_MINIMAL)
        rows = [(i + 2, {k: v for k, v in row.items() if k is not None}) for i, row in enumerate(reader)]
        if not rows:
            raise GptforgeError(f"{path} holds no examples (expected a header row, then one example per row)")
    first = rows[0][1]
    if not text_field:
        text_field = next((name for name in ("sentence", "text") if name in first), "sentence")
    examples = []
    for line, obj in rows:
        for name in (text_field, label_field):
            if obj.get(name) is None:  # absent from a JSON object, or a table row shorter than its header
                why = "the row has fewer columns than the header" if name in obj else f"has {', '.join(sorted(obj))}"
                raise GptforgeError(f"{path}:{line}: missing field '{name}' ({why})")
        label = obj[label_field]
        label = str(label).strip() if isinstance(label, (str, int)) and not isinstance(label, bool) else None
        if not label:
            raise GptforgeError(f"{path}:{line}: field '{label_field}' must be a non-empty string or integer")
        text = _text(obj, text_field, path, line)
        examples.append(ClassExample(text.strip(), label, line))
    return examples, text_field


def label_set(examples: list[ClassExample]) -> list[str]:
    """The sorted distinct labels (numerically when all are integers): index = class id."""
    labels = set(e.label for e in examples)
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def label_ids(examples: list[ClassExample], labels: list[str], path: str | Path) -> list[int]:
    """Class ids of `examples` under `labels`.

    Raises:
        GptforgeError: a label that is not in `labels` (the training file's label set), naming the line.
    """
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for e in examples:
        if e.label not in index:
            raise GptforgeError(f"{path}:{e.line}: label {e.label!r} is not in the training file's label set "
                                f"({', '.join(labels)})")
        out.append(index[e.label])
    return out
