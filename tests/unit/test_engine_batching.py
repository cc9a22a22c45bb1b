"""The continuous-batching engine: requests that join and leave mid-batch, per-request seeds, cancellation,
per-row sliding windows, chunked prefill, prompt scoring, the caps, and the engine thread."""

import dataclasses
import threading

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.generate.engine import iter_tokens
from gptforge.generate.runner import FINISH_ERROR, EngineThread
from gptforge.generate.sampling import SamplingParams
from gptforge.generate.scheduler import Engine, QueueFullError, Sequence
from gptforge.model.gpt import GPT
from gptforge.model.loss import target_logprobs

NO_EOT = 10_000  # an end-of-text id the model never produces: rows run to max_new_tokens


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from a second thread, and on a loaded machine OpenMP barriers stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model(tiny_cfg):
    """Dense and banded layers (window 6), context 16: windows slide and bands apply within a few tokens."""
    return GPT(dataclasses.replace(tiny_cfg, vocab_size=257, attention_pattern="dense,local", local_window=6)).eval()


def alone(model, prompt, params):
    return [ev[0][1] for ev in iter_tokens(model, [prompt], params, eot_id=NO_EOT)]


def run(engine, until=None, max_steps=10_000):
    """Step until idle (or until `until()` is true); return the number of steps."""
    for steps in range(1, max_steps + 1):
        engine.step()
        if not engine.has_work() or (until is not None and until()):
            return steps
    raise AssertionError("engine did not finish")


def test_requests_joining_and_leaving_mid_batch_match_running_alone(model):
    greedy = SamplingParams(max_new_tokens=30, temperature=0)  # 30 new tokens on a 16-token window: slides
    prompts = [[5, 9, 200, 17, 3], [1, 2], [42] * 11, [7, 7, 8], [250]]
    lengths = [30, 12, 25, 3, 18]
    engine = Engine(model, eot_id=NO_EOT, max_running=3, prefill_chunk=4)
    seqs = [Sequence(p, dataclasses.replace(greedy, max_new_tokens=n)) for p, n in zip(prompts, lengths)]
    engine.submit(seqs[:2])
    run(engine, until=lambda: len(seqs[0].output) >= 4)
    engine.submit(seqs[2:4])  # join while rows 0 and 1 are decoding; only one free row: one waits
    run(engine, until=lambda: seqs[3].finished)
    engine.submit(seqs[4:])
    run(engine)
    for seq, p, n in zip(seqs, prompts, lengths):
        assert seq.output == alone(model, p, dataclasses.replace(greedy, max_new_tokens=n)), p
        assert seq.finish_reason == "length"


def test_a_seeded_request_gives_the_same_tokens_whatever_runs_beside_it(model):
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    expected = alone(model, [3, 1, 4], params)
    engine = Engine(model, eot_id=NO_EOT, max_running=4)
    others = [Sequence([9, 9], SamplingParams(max_new_tokens=40, temperature=0.7, top_k=5, seed=s)) for s in (1, 2)]
    greedy = Sequence([100, 101, 102], SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.3))
    engine.submit([*others, greedy])
    run(engine, until=lambda: len(others[0].output) >= 5)
    seq = Sequence([3, 1, 4], params)
    engine.submit([seq])
    run(engine)
    assert seq.output == expected
    assert alone(model, [3, 1, 4], dataclasses.replace(params, seed=99)) != expected  # the seed matters


def test_cancel_frees_the_row_within_one_step_and_the_queue_moves_on(model):
    engine = Engine(model, eot_id=NO_EOT, max_running=1)
    long = Sequence([1, 2, 3], SamplingParams(max_new_tokens=1000, temperature=0))
    waiting = Sequence([4, 5], SamplingParams(max_new_tokens=3, temperature=0))
    engine.submit([long, waiting])
    run(engine, until=lambda: len(long.output) >= 3)
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.cancel(long)
    outs = engine.step()  # the very next step ends it and hands its row to the waiting request
    assert long.finish_reason == "abort" and any(o.seq is long and o.finish_reason == "abort" for o in outs)
    assert engine.running == [waiting] and waiting.row == 0
    run(engine)
    assert waiting.output == alone(model, [4, 5], SamplingParams(max_new_tokens=3, temperature=0))
    engine.cancel(waiting)  # cancelling a finished request is a no-op
    assert engine.step() == [] and waiting.finish_reason == "length"


def test_only_the_row_that_fills_its_window_is_re_prefilled(model):
    C = model.cfg.context_length
    engine = Engine(model, eot_id=NO_EOT, max_running=2)
    long = Sequence([1] * 10, SamplingParams(max_new_tokens=12, temperature=0))  # fills 16 slots at token 7
    short = Sequence([2] * 3, SamplingParams(max_new_tokens=12, temperature=0))
    engine.submit([long, short])
    lengths = []
    while engine.has_work():
        engine.step()
        if engine.cache is not None and len(engine.running) == 2:
            lengths.append([engine.cache.row_lengths[s.row] for s in (long, short)])
    slide = next(i for i in range(1, len(lengths)) if lengths[i][0] < lengths[i - 1][0])
    assert lengths[slide][0] == C - C // 4  # the long row restarted from its last 12 tokens
    assert lengths[slide][1] == lengths[slide - 1][1] + 1  # the other row just kept decoding
    assert long.output == alone(model, [1] * 10, long.params)
    assert short.output == alone(model, [2] * 3, short.params)


def test_chunked_prefill_keeps_running_streams_flowing(model):
    engine = Engine(model, eot_id=NO_EOT, max_running=2, prefill_chunk=4)
    running = Sequence([8, 9], SamplingParams(max_new_tokens=20, temperature=0))
    engine.submit([running])
    run(engine, until=lambda: len(running.output) >= 2)
    newcomer = Sequence(list(range(30, 43)), SamplingParams(max_new_tokens=3, temperature=0))  # 13 tokens
    engine.submit([newcomer])
    produced = []
    while not newcomer.output:
        before = len(running.output)
        engine.step()
        produced.append(len(running.output) - before)
    assert len(produced) == 4 and produced == [1, 1, 1, 1]  # 4 + 4 + 4 + 1 prompt tokens, one token each step
    run(engine)
    assert newcomer.output == alone(model, list(range(30, 43)), newcomer.params)
    assert running.output == alone(model, [8, 9], running.params)


def test_prompt_scores_equal_the_models_log_probabilities(model):
    prompt = [4, 8, 15, 16, 23, 42, 7, 1, 200]
    seq = Sequence(prompt, SamplingParams(max_new_tokens=0), prompt_logprobs=2)
    engine = Engine(model, eot_id=NO_EOT, prefill_chunk=4)  # scored across three chunks
    engine.submit([seq])
    run(engine)
    assert seq.finish_reason == "length" and seq.output == []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))
    expected, _ = target_logprobs(logits[:, :-1], torch.tensor([prompt[1:]]))
    got = torch.tensor([lp for lp, _ in seq.prompt_scores])
    torch.testing.assert_close(got, expected[0], rtol=0, atol=1e-5)
    best = torch.log_softmax(logits[0, :-1], -1).max(-1)
    assert [top[0][0] for _, top in seq.prompt_scores] == best.indices.tolist()
    assert all(len(top) == 2 for _, top in seq.prompt_scores)


def test_logprobs_of_generated_tokens(model):
    seq = Sequence([1, 2, 3], SamplingParams(max_new_tokens=1, temperature=0), logprobs=3)
    engine = Engine(model, eot_id=NO_EOT)
    engine.submit([seq])
    (out,) = [o for o in engine.step() if o.token is not None]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([[1, 2, 3]]))[0, -1], -1)
    assert out.token == int(lp.argmax()) and out.finish_reason == "length"
    assert out.logprob == pytest.approx(float(lp.max()), abs=1e-5)
    assert [t for t, _ in out.top_logprobs] == lp.topk(3).indices.tolist()


def test_tiny_temperature_is_greedy(model):
    for t in (1e-38, 1e-300):
        assert alone(model, [5, 6], SamplingParams(max_new_tokens=8, temperature=t, seed=0)) == \
            alone(model, [5, 6], SamplingParams(max_new_tokens=8, temperature=0))


def test_stop_check_end_of_text_and_limits(model):
    # a prompt whose greedy continuation has a new token at some position k >= 1: make it end-of-text
    prompt, k, stop_at = next((p, k, toks[k]) for p in ([i, i + 1] for i in range(1, 200))
                              for toks in [alone(model, p, SamplingParams(max_new_tokens=5, temperature=0))]
                              for k in range(1, 5) if toks[k] not in toks[:k])
    engine = Engine(model, eot_id=stop_at, max_running=3, max_queue=3)
    a = Sequence(prompt, SamplingParams(max_new_tokens=5, temperature=0))
    b = Sequence(prompt, SamplingParams(max_new_tokens=5, temperature=0), stop_check=lambda tok: len(b.output) == 1)
    c = Sequence(prompt, SamplingParams(max_new_tokens=5, temperature=0), ignore_eot=True)
    engine.submit([a, b, c])
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit([Sequence([3], SamplingParams())])
    run(engine)
    assert a.finish_reason == "stop" and a.output[-1] == stop_at and len(a.output) == k + 1  # end-of-text ends it
    assert b.finish_reason == "stop" and len(b.output) == 1
    assert c.finish_reason == "length" and len(c.output) == 5 and c.output[k] == stop_at  # went on past it
    assert engine.cache is None  # idle: the cache memory is given back
    with pytest.raises(GptforgeError, match="prompt has 17 tokens; the model's context_length is 16"):
        engine.submit([Sequence([1] * 17, SamplingParams())])
    with pytest.raises(GptforgeError, match="token id 300 is out of range"):
        engine.submit([Sequence([300], SamplingParams())])


def test_row_and_memory_caps_hold_at_every_step(model):
    engine = Engine(model, eot_id=NO_EOT, max_running=3, max_cached_tokens=40)
    seqs = [Sequence([i + 1] * (1 + i % 4), SamplingParams(max_new_tokens=4 + 3 * i, temperature=0))
            for i in range(7)]
    engine.submit(seqs)
    peak = 0
    while engine.has_work():
        engine.step()
        assert engine.num_running <= 3
        if engine.cache is not None:
            assert engine.cache.batch_size * engine.cache.capacity <= 40
        peak = max(peak, engine.num_running)
    assert peak >= 2 and all(s.finish_reason == "length" for s in seqs)
    for s in seqs:
        assert s.output == alone(model, s.prompt, s.params)


def test_engine_thread_serves_other_threads_and_reports_a_failure(model):
    runner = EngineThread(Engine(model, eot_id=NO_EOT))
    runner.start()
    assert runner.ready.wait(60)
    done = threading.Event()
    seq = Sequence([1, 2], SamplingParams(max_new_tokens=6, temperature=0),
                   on_output=lambda out: done.set() if out.finish_reason else None)
    runner.submit([seq])
    assert done.wait(60) and seq.output == alone(model, [1, 2], seq.params)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated out of memory")

    model.hidden = broken  # the engine thread dies on its next step; every request is ended with "error"
    failed = threading.Event()
    seq = Sequence([3], SamplingParams(max_new_tokens=6), on_output=lambda out: failed.set())
    runner.submit([seq])
    assert failed.wait(60) and seq.finish_reason == FINISH_ERROR
    runner._thread.join(60)
    assert not runner.alive and "simulated out of memory" in str(runner.error)
    with pytest.raises(GptforgeError, match="engine has failed"):
        runner.submit([Sequence([1], SamplingParams())])
