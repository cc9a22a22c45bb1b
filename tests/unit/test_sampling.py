import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.generate.engine import StopTextBuffer
from gptforge.generate.sampling import (
    SamplingParams,
    apply_presence_frequency,
    apply_repetition_penalty,
    draw,
    filter_top_k,
    filter_top_p,
    sample_next,
    sample_rows,
)

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def test_top_k():
    kept = filter_top_k(LOGITS, 2)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    assert torch.equal(filter_top_k(LOGITS, 0), LOGITS) and torch.equal(filter_top_k(LOGITS, 99), LOGITS)


@pytest.mark.parametrize("p,expected", [(0.5, [True, False, False, False]), (0.6, [True, True, False, False]),
                                        (0.75, [True, True, False, False]), (0.76, [True, True, True, False]),
                                        (0.01, [True, False, False, False]), (1.0, [True] * 4)])
def test_top_p(p, expected):
    assert torch.isfinite(filter_top_p(LOGITS, p)).tolist() == [expected]


def test_top_p_keeps_best_token_even_if_unsorted():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert torch.isfinite(filter_top_p(logits, 0.001)).tolist() == [[False, True, False]]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_and_seeded_sampling():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0)), logits.argmax(-1))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    params = SamplingParams(temperature=1.0, top_k=10)
    a = [sample_next(logits, params, generator=g1) for _ in range(5)]
    b = [sample_next(logits, params, generator=g2) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    top10 = logits.topk(10, dim=-1).indices
    assert all((top10 == t[:, None]).any(-1).all() for t in a)


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    g = torch.Generator().manual_seed(0)
    draws = sample_next(torch.log(probs).expand(20000, 3), SamplingParams(temperature=1.0), generator=g)
    freq = torch.bincount(draws, minlength=3).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                dict(max_new_tokens=-1), dict(repetition_penalty=0), dict(stop=("",))])
def test_invalid_params(kw):
    with pytest.raises(GptforgeError):
        SamplingParams(**kw)


def test_stop_buffer_spanning_tokens_and_utf8():
    buf = StopTextBuffer(("END",))
    out = [buf.push(b) for b in [b"ab", b"E", b"N", b"x", b"\xc3", b"\xa9", b"E", b"ND", b"more"]]
    assert "".join(out) == "abENx\u00e9" and buf.done
    assert out[4] == "" and out[5] == "\u00e9"  # never half a character
    assert out[1] == "" and out[2] == ""  # "E", "EN" held back until resolved
    buf = StopTextBuffer(("\n\n",))
    assert buf.push(b"a\n") == "a" and buf.flush() == "\n"


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-300])
def test_temperatures_that_underflow_sample_greedily(temperature):
    """Issue 7 item 4: `--temperature 1e-38` crashed ("probability tensor contains either inf, nan or element < 0");
    dividing logits by a tiny temperature overflowed. Now the row maximum is subtracted first."""
    logits = torch.randn(6, 300) * 5
    params = SamplingParams(temperature=temperature, top_k=50, top_p=0.9)
    got = sample_next(logits, params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(-1))


def test_rows_sample_with_their_own_parameters():
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1),
             SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=1.0)]
    params = kinds * 300  # 1200 rows in one call, each with its own parameters
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(len(params), 3).contiguous()
    toks = sample_rows(logits, params, torch.rand(len(params), generator=torch.Generator().manual_seed(0),
                                                  dtype=torch.float64)).view(300, 4)
    assert [set(toks[:, i].tolist()) for i in range(4)] == [{0}, {0}, {0, 1}, {0, 1, 2}]
    freq = torch.bincount(toks[:, 3], minlength=3).float() / 300
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.1, rtol=0)


def test_draw_follows_the_cdf_and_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]])
    edges = torch.tensor([0.0, 0.2499, 0.2501, 0.999999], dtype=torch.float64)
    assert draw(probs.expand(4, 5), edges).tolist() == [1, 1, 3, 3]


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    got = apply_presence_frequency(logits, counts, 0.5, 0.25)
    assert got.tolist() == [[0.0, -0.75, -1.25, 0.0]]
    with pytest.raises(GptforgeError, match="presence_penalty must be in \\[-2, 2\\]"):
        SamplingParams(presence_penalty=2.5)
