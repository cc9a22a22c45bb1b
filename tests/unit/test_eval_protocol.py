"""The few-shot protocol rules (GPT-3 section 2.4) and the token boundary, each on its own."""

from pathlib import Path

import pytest

from gptforge.errors import GptforgeError
from gptforge.eval.prompts import SHOT_SEPARATOR
from gptforge.eval.protocol import check_shots, draw_shots, plan_item, split_pair
from gptforge.eval.tasks import read_split
from gptforge.tokenizer import CharTokenizer, train_bpe

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "eval"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bpe():
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(ASSETS.rglob("*.jsonl")))
    return train_bpe([text], vocab_size=400)


def test_shots_never_hold_the_item_and_are_reproducible():
    pool = read_split("piqa", "eval", ASSETS)
    for doc in pool:
        shots = draw_shots("piqa", doc, pool, 11, seed=3, same_split=True)
        assert len(shots) == 11 and doc.id not in {s.id for s in shots}  # all 11 others, never itself
        assert len({s.id for s in shots}) == 11
    a = [s.id for s in draw_shots("piqa", pool[4], pool, 5, seed=3, same_split=True)]
    assert a == [s.id for s in draw_shots("piqa", pool[4], pool, 5, seed=3, same_split=True)]
    assert a != [s.id for s in draw_shots("piqa", pool[4], pool, 5, seed=4, same_split=True)]
    # from a training split the draw does not look at ids (the splits' ids may coincide, e.g. SST-2 rows)
    train = read_split("sst2", "train", ASSETS)
    dev = read_split("sst2", "eval", ASSETS)
    assert len(draw_shots("sst2", dev[0], train, 30, seed=0, same_split=False)) == 30


def test_k_larger_than_the_training_split_is_an_error():
    check_shots("piqa", 11, 12, same_split=True, note="n")
    with pytest.raises(GptforgeError, match=r"piqa: K=12 exceeds the 11 demonstrations available \(other items\)"):
        check_shots("piqa", 12, 12, same_split=True, note="other items")
    with pytest.raises(GptforgeError, match="K=31 exceeds the 30"):
        check_shots("sst2", 31, 30, same_split=False, note="train")


def test_boundary_space_moves_to_the_continuation_and_matches_the_whole_string(bpe):
    ctx, cont = split_pair(bpe, "Question: which one?\nAnswer: ", "the red one", "gpt3")
    assert ctx == tuple(bpe.encode("Question: which one?\nAnswer:"))
    assert ctx + cont == tuple(bpe.encode("Question: which one?\nAnswer: the red one"))
    assert bpe.decode(cont) == " the red one"
    # a boundary inside a word: gpt3 keeps the whole string's tokens, the continuation is never empty
    ctx, cont = split_pair(bpe, "The tro", "phy", "gpt3")
    assert ctx + cont == tuple(bpe.encode("The trophy")) and len(cont) >= 1
    for protocol in ("gpt3", "lm-eval"):
        assert split_pair(bpe, "", " x", protocol) == ((bpe.eot_id,), tuple(bpe.encode(" x")))
        assert len(split_pair(bpe, "ab", "c", protocol)[1]) >= 1


def test_k_is_reduced_to_fit_and_the_item_is_never_cut_while_shots_remain(bpe):
    docs = read_split("arc_easy", "eval", ASSETS)
    pool = read_split("arc_easy", "train", ASSETS)
    doc = docs[0]
    shots = draw_shots("arc_easy", doc, pool, 8, seed=0, same_split=False)
    full = plan_item("arc_easy", doc, shots, bpe, protocol="gpt3", window=100_000)
    assert full.k == 8 and full.prefix.count(SHOT_SEPARATOR) == 8 and not full.truncated
    zero = plan_item("arc_easy", doc, [], bpe, protocol="gpt3", window=100_000)
    need0 = max(len(c) + len(x) - 1 for c, x in zero.pairs)
    need8 = max(len(c) + len(x) - 1 for c, x in full.pairs)
    for window in (need0, need0 + (need8 - need0) // 2, need8 - 1):
        plan = plan_item("arc_easy", doc, shots, bpe, protocol="gpt3", window=window)
        assert 0 <= plan.k < 8 and not plan.truncated
        assert all(len(c) + len(x) - 1 <= window for c, x in plan.pairs)
        if plan.k < 7:  # one more demonstration would not have fitted
            bigger = plan_item("arc_easy", doc, shots[:plan.k + 1], bpe, protocol="gpt3", window=100_000)
            assert max(len(c) + len(x) - 1 for c, x in bigger.pairs) > window
        for (c, x), (c0, x0) in zip(plan.pairs, zero.pairs):
            assert c[-len(c0):] == c0 and x == x0  # the item itself is whole, at the end


def test_when_even_zero_shot_overflows_only_context_is_cut_per_continuation(bpe):
    doc = read_split("boolq", "eval", ASSETS)[0]
    zero = plan_item("boolq", doc, [], bpe, protocol="gpt3", window=100_000)
    plan = plan_item("boolq", doc, [], bpe, protocol="gpt3", window=20)
    assert plan.truncated and plan.k == 0
    for (c, x), (c0, x0) in zip(plan.pairs, zero.pairs):
        assert x == x0 and c == c0[-(21 - len(x)):] and len(c) + len(x) - 1 == 20
    tiny = plan_item("boolq", doc, [], bpe, protocol="gpt3", window=1)
    assert tiny.skipped and "longer than the 1-token window" in tiny.skipped


def test_char_level_vocabulary_skips_what_it_cannot_encode():
    doc = read_split("arc_easy", "eval", ASSETS)[0]
    chars = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
    plan = plan_item("arc_easy", doc, [], chars, protocol="gpt3", window=512)
    assert plan.skipped and plan.skipped.startswith("not encodable")
    full = CharTokenizer(set(doc.fields["question"] + "".join(doc.fields["choices"]) + "Question:\nAnswer "))
    plan = plan_item("arc_easy", doc, [], full, protocol="gpt3", window=512)
    assert plan.skipped is None and [len(x) for _, x in plan.pairs] == \
        [len(" " + c) for c in doc.fields["choices"]]


def test_unconditional_pairs_fit_the_window_too(bpe):
    doc = read_split("arc_easy", "eval", ASSETS)[0]
    zero = plan_item("arc_easy", doc, [], bpe, protocol="gpt3", window=100_000)
    longest = max(len(x) for _, x in zero.unconditional)
    plan = plan_item("arc_easy", doc, [], bpe, protocol="gpt3", window=longest)
    assert plan.skipped is None
    assert all(len(c) >= 1 and len(c) + len(x) - 1 <= longest for c, x in plan.unconditional + plan.pairs)
    assert "longer than" in plan_item("arc_easy", doc, [], bpe, protocol="gpt3", window=longest - 1).skipped
