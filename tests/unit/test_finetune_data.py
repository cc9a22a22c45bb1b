"""Fine-tuning data: prompt masking per SFT format, padding, truncation, the epoch-shuffled source, bad input,
classification pooling on the last real token, macro-F1 and the linear lr schedule."""

import json

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.errors import GptforgeError
from gptforge.finetune.formats import (
    ALPACA_NO_INPUT,
    ALPACA_WITH_INPUT,
    label_ids,
    label_set,
    read_classification,
    read_sft,
    tokenize_sft,
)
from gptforge.finetune.source import (
    ExampleSource,
    Row,
    classification_row,
    collate,
    sft_row,
    validation_batches,
)
from gptforge.model.gpt import GPT
from gptforge.model.loss import IGNORE_INDEX
from gptforge.train.objectives import Classification
from gptforge.train.schedule import lr_at


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def scored_text(tok, segments, mask_prompt=True):
    ids, scored = tokenize_sft(segments, tok, mask_prompt=mask_prompt)
    return [i for i, s in zip(ids, scored) if s], ids


def test_prompt_completion_masks_exactly_the_prompt(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    (ex,), fmt = read_sft(path)
    assert fmt == "prompt_completion"
    scored, ids = scored_text(byte_tokenizer, ex.segments)
    assert scored == list(b" 4") + [byte_tokenizer.eot_id]  # completion + end-of-text, nothing else
    assert ids == list(b"Q: 2+2?\nA: 4") + [256]
    everything, _ = scored_text(byte_tokenizer, ex.segments, mask_prompt=False)
    assert everything == ids[1:]  # --mask_prompt false: every token but the first (nothing predicts it)


def test_alpaca_template_and_masking(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "2 2", "output": "4"},
                                               {"instruction": "Say hi.", "input": "", "output": "hi"}])
    examples, fmt = read_sft(path)
    assert fmt == "alpaca"
    assert examples[0].segments[0][0] == ALPACA_WITH_INPUT.format(instruction="Add.", input="2 2")
    assert examples[1].segments[0][0] == ALPACA_NO_INPUT.format(instruction="Say hi.")
    assert examples[0].segments[0][0].endswith("### Response:\n")
    assert scored_text(byte_tokenizer, examples[0].segments)[0] == list(b"4") + [256]
    assert scored_text(byte_tokenizer, examples[1].segments)[0] == list(b"hi") + [256]


def test_chat_scores_only_assistant_messages(tmp_path, byte_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ciao"}]
    (ex,), fmt = read_sft(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]))
    assert fmt == "chat"
    scored, ids = scored_text(byte_tokenizer, ex.segments)
    assert bytes(ids[:-1]).decode() == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant: Ciao"
    assert scored == list(b"Hello\nCiao") + [256]


def test_field_mapping_for_question_answer_files(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": " 2"}])
    (ex,), _ = read_sft(path, prompt_field="question", completion_field="answer")
    assert scored_text(byte_tokenizer, ex.segments)[0] == list(b" 2") + [256]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], r"d.jsonl:2: missing field 'completion'"),
    ([{"prompt": "a", "completion": "  "}], r"d.jsonl:1: field 'completion' is empty"),
    ([{"instruction": "a", "output": ""}], r"d.jsonl:1: field 'output' is empty"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"d.jsonl:1: the last message must be the assistant's"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], r"d.jsonl:1: messages\[0\]: role 'robot'"),
    ([{"text": "a"}], r"cannot tell the SFT format"),
])
def test_bad_sft_files_name_the_line_and_field(tmp_path, rows, message):
    with pytest.raises(GptforgeError, match=message):
        read_sft(write_jsonl(tmp_path / "d.jsonl", rows))


def test_sft_row_shifts_targets_and_truncates_the_prompt_first(byte_tokenizer):
    ids, scored = tokenize_sft([("PROMPT", False), ("ok", True)], byte_tokenizer)
    row, cut = sft_row(ids, scored, 16)
    assert not cut and row.tokens == ids[:-1]
    assert row.targets == [IGNORE_INDEX] * 5 + list(b"ok") + [256]  # position 5 ('T') predicts 'o'
    row, cut = sft_row(ids, scored, 4)  # 9 ids, T + 1 = 5: drop 4 prompt tokens from the left
    assert cut and row.tokens == list(b"PTok") and row.targets == [IGNORE_INDEX, ord("o"), ord("k"), 256]
    row, cut = sft_row(ids, scored, 2)  # even the completion does not fit: its start is kept
    assert cut and row.tokens == list(b"To") and row.targets == [ord("o"), ord("k")]


def test_collate_right_pads_with_ignored_targets():
    rows = [Row([5, 6, 7], [6, 7, 9], 1), Row([8], [IGNORE_INDEX], 0)]
    b = collate(rows, pad_id=99, labeled=True)
    assert b.tokens.tolist() == [[5, 6, 7], [8, 99, 99]]
    assert b.targets.tolist() == [[6, 7, 9], [IGNORE_INDEX] * 3]
    assert b.lengths.tolist() == [3, 1] and b.labels.tolist() == [1, 0] and b.n_targets == 3
    padded = collate(rows[:1], pad_id=99, n_rows=3, labeled=True)
    assert padded.labels.tolist() == [1, IGNORE_INDEX, IGNORE_INDEX] and padded.n_targets == 3


def test_classification_row_lm_targets_and_truncation():
    row, cut = classification_row([1, 2, 3], 4, 8, lm_targets=True)
    assert (row.tokens, row.targets, row.label, cut) == ([1, 2, 3], [2, 3, IGNORE_INDEX], 4, False)
    row, cut = classification_row([1, 2, 3], 0, 2, lm_targets=False)
    assert (row.tokens, row.targets, cut) == ([1, 2], [IGNORE_INDEX, IGNORE_INDEX], True)


def test_source_epochs_resume_and_rank_split():
    rows = [Row([i], [IGNORE_INDEX], i) for i in range(10)]
    one = ExampleSource(rows, micro_batch_size=4, seed=3, pad_id=0)
    seen = [b.labels.tolist() for b in (one.next_batch() for _ in range(5))]  # 20 rows: two epochs
    assert sorted(sum(seen, [])[:10]) == list(range(10)) and sorted(sum(seen, [])[10:20]) == list(range(10))
    assert sum(seen, [])[:10] != sum(seen, [])[10:20]  # a fresh order each epoch
    fresh = ExampleSource(rows, micro_batch_size=4, seed=3, pad_id=0)
    fresh.next_batch()
    fresh.next_batch()
    resumed = ExampleSource(rows, micro_batch_size=4, seed=3, pad_id=0)
    resumed.load_state_dict(fresh.state_dict())
    assert [resumed.next_batch().labels.tolist() for _ in range(3)] == seen[2:]
    ranks = [ExampleSource(rows, micro_batch_size=2, seed=3, pad_id=0, rank=r, world_size=2) for r in range(2)]
    assert [x for r in ranks for x in r.next_batch().labels.tolist()] == seen[0]


def test_validation_batches_are_even_over_ranks():
    rows = [Row([i], [IGNORE_INDEX], i) for i in range(5)]
    per_rank = [list(validation_batches(rows, micro_batch_size=2, pad_id=0, rank=r, world_size=2)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    labels = sorted(x for bs in per_rank for b in bs for x in b.labels.tolist() if x != IGNORE_INDEX)
    assert labels == list(range(5))


def test_classification_files_and_labels(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text('sentence\tlabel\nit \'s "fine" \t1\nbad\t0\nmeh\t1\n', encoding="utf-8")
    examples, field = read_classification(tsv)
    assert field == "sentence" and [e.text for e in examples] == ['it \'s "fine"', "bad", "meh"]
    labels = label_set(examples)
    assert labels == ["0", "1"] and label_ids(examples, labels, tsv) == [1, 0, 1]
    csv = tmp_path / "d.csv"
    csv.write_text('text,label\n"a, b",pos\nc,neg\n', encoding="utf-8")
    examples, _ = read_classification(csv)
    assert [(e.text, e.label) for e in examples] == [("a, b", "pos"), ("c", "neg")]
    assert label_set(examples) == ["neg", "pos"]
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": 2}, {"text": "y", "label": 10}])
    assert label_set(read_classification(jsonl)[0]) == ["2", "10"]  # integers sort numerically


def test_bad_classification_files(tmp_path):
    tsv = tmp_path / "t.tsv"
    tsv.write_text("sentence\tlabel\nok\t1\nno label\n", encoding="utf-8")
    with pytest.raises(GptforgeError, match=r"t.tsv:3: missing field 'label' \(the row has fewer columns than the "
                                            r"header\)"):
        read_classification(tsv)
    tsv.write_text("sentence\tlabel\nok\t1\n\t0\n", encoding="utf-8")
    with pytest.raises(GptforgeError, match=r"t.tsv:3: field 'sentence' is empty"):
        read_classification(tsv)
    train, _ = read_classification(write_jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": "x"}]))
    dev, _ = read_classification(write_jsonl(tmp_path / "b.jsonl", [{"text": "b", "label": "y"}]))
    with pytest.raises(GptforgeError, match=r"b.jsonl:1: label 'y' is not in the training file's label set \(x\)"):
        label_ids(dev, label_set(train), tmp_path / "b.jsonl")


def test_pooling_uses_the_last_real_token_under_right_padding():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=64, context_length=16, n_labels=3)).eval()
    rows = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12]]
    batch = collate([Row(r, [IGNORE_INDEX] * len(r)) for r in rows], pad_id=63)
    together = model(batch.tokens, head="classify", lengths=batch.lengths)
    alone = torch.cat([model(torch.tensor([r]), head="classify") for r in rows])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    # the padded positions' hidden states differ, so pooling the wrong position would show
    assert not torch.allclose(model(batch.tokens, head="classify")[1], alone[1], atol=1e-3)
    lm, classes = model(batch.tokens, head="both", lengths=batch.lengths)
    torch.testing.assert_close(lm, model(batch.tokens))
    torch.testing.assert_close(classes, together)
    with pytest.raises(GptforgeError, match="no classification head"):
        GPT(ModelConfig(n_layer=1, n_head=1, d_model=8, vocab_size=8, context_length=4))(
            torch.zeros(1, 2, dtype=torch.long), head="classify")


def test_macro_f1_from_summed_counts():
    obj = Classification(n_labels=3)
    # predictions vs labels: class 0: tp 2 fp 1 fn 0; class 1: tp 1 fp 0 fn 1; class 2: never seen
    n = 4
    metrics = {"val_loss": 0.5, "val_accuracy": 0.75, "val_tp_0": 2 / n, "val_fp_0": 1 / n, "val_fn_0": 0.0,
               "val_tp_1": 1 / n, "val_fp_1": 0.0, "val_fn_1": 1 / n, "val_tp_2": 0.0, "val_fp_2": 0.0,
               "val_fn_2": 0.0}
    out = obj.finalize(metrics)
    assert set(out) == {"val_loss", "val_accuracy", "val_macro_f1"}
    assert out["val_macro_f1"] == pytest.approx((2 * 2 / (4 + 1) + 2 * 1 / (2 + 1)) / 2)


def test_linear_schedule_decays_to_zero():
    kw = dict(lr=1.0, warmup_steps=2, decay_steps=10, min_lr_ratio=0.0, schedule="linear")
    assert [lr_at(s, **kw) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
