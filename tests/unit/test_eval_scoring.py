"""Packed continuation scoring equals one plain forward per (context + continuation), whatever the batch size
and padding; sliding-window perplexity scores every token once and equals the full-window reference."""

import math
import random

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.eval.perplexity import perplexity, rolling_nll, windows
from gptforge.eval.scoring import Group, batches, packed_hidden, score_groups
from gptforge.model.gpt import GPT
from gptforge.model.loss import IGNORE_INDEX, continuation_scores, target_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=60, context_length=24, **kw)).eval()
    with torch.no_grad():  # larger weights than the init, so log-likelihoods differ clearly between tokens
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    return model


def _groups(seed=0, n=9):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx = tuple(rng.randrange(60) for _ in range(rng.randint(1, 12)))
        conts = tuple(tuple(rng.randrange(60) for _ in range(rng.randint(1, 24 + 1 - len(ctx))))
                      for _ in range(rng.randint(1, 5)))
        out.append(Group(ctx, conts))
    return out


def _reference(model, group):
    out = []
    for cont in group.continuations:
        seq = torch.tensor([group.context + cont])
        with torch.no_grad():
            logits = model(seq[:, :-1])
        targets = seq[:, 1:].clone()
        targets[:, :len(group.context) - 1] = IGNORE_INDEX
        logprobs, greedy = target_logprobs(logits, targets)
        out.append((logprobs.sum().item(), bool(greedy.all())))
    return out


@pytest.mark.parametrize("kw", [{}, {"attention_pattern": "dense,local", "local_window": 5},
                                {"shared_layer_group": 2}])
def test_packed_scores_equal_one_forward_per_continuation(kw):
    model, groups = _model(**kw), _groups()
    got = score_groups(model, groups, batch_size=64)
    for g, scores in zip(groups, got):
        for (ll, greedy), (ref_ll, ref_greedy) in zip(scores, _reference(model, g)):
            assert abs(ll - ref_ll) < 1e-4 and greedy == ref_greedy


def test_scores_do_not_depend_on_batch_size_or_padding():
    model, groups = _model(), _groups(seed=1, n=12)
    runs = [score_groups(model, groups, batch_size=b) for b in (1, 2, 5, 17, 1000)]
    worst = max(abs(a[0] - b[0]) for run in runs[1:] for ga, gb in zip(runs[0], run) for a, b in zip(ga, gb))
    assert worst <= 1e-5
    assert all([s[1] for g in run for s in g] == [s[1] for g in runs[0] for s in g] for run in runs)


def test_packed_hidden_equals_gpt_hidden_for_an_unpacked_row():
    model = _model(attention_pattern="local,dense", local_window=4)
    tokens = torch.randint(0, 60, (2, 20))
    allowed = torch.ones(20, 20, dtype=torch.bool).tril()[None].expand(2, 20, 20)
    with torch.no_grad():
        diff = (packed_hidden(model, tokens, torch.arange(20).expand(2, 20), allowed) - model.hidden(tokens)).abs()
    assert diff.max().item() < 1e-5


def test_batches_keep_groups_whole_and_longest_first():
    groups = _groups(n=10)
    cut = batches(groups, 4)
    assert sorted(i for b in cut for i in b) == list(range(10))
    lengths = [groups[i].packed_length for b in cut for i in b]
    assert lengths == sorted(lengths, reverse=True)
    assert all(sum(len(groups[i].continuations) for i in b) <= 4 or len(b) == 1 for b in cut)


def test_continuation_scores_sums_per_segment():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    total, greedy = continuation_scores(logits, torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 3)
    lp = torch.log_softmax(logits, -1)
    assert total[0].item() == pytest.approx((lp[0, 0] + lp[1, 0]).item()) and not greedy[0]
    assert total[1].item() == pytest.approx(math.log(0.5)) and greedy[1]  # a tie counts as greedy
    assert total[2].item() == 0.0 and greedy[2]


def test_every_token_is_scored_once_by_the_windows():
    for n, w, s in [(1, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 3), (50, 8, 1), (7, 8, 4)]:
        spans = windows(n, w, s)
        scored = [t for begin, end, first in spans for t in range(first, end)]
        assert scored == list(range(n)), (n, w, s)
        assert all(end - begin <= w for begin, end, _ in spans)


def test_perplexity_with_stride_equal_to_window_is_the_full_window_reference(byte_tokenizer):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=257, context_length=16)).eval()
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."
    result = perplexity(model, byte_tokenizer, text, stride=16, batch_size=3)
    seq = torch.tensor([256] + list(text.encode()))
    total = 0.0
    for begin in range(0, len(seq) - 1, 16):  # disjoint windows, each scored whole
        chunk = seq[begin:begin + 17]
        with torch.no_grad():
            logits = model(chunk[None, :-1])
        total -= torch.log_softmax(logits[0], -1).gather(-1, chunk[1:, None]).sum().item()
    assert result["tokens"] == len(text.encode()) and result["bytes"] == len(text.encode())
    assert result["nll_sum"] == pytest.approx(total, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(total / len(text.encode())), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / len(text.encode()), rel=1e-6)
    # a smaller stride gives every token more context: a different total, the same count
    half = rolling_nll(model, seq.tolist(), stride=4, batch_size=2)
    assert half != pytest.approx(total, rel=1e-9) and math.isfinite(half)
