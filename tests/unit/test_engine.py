import dataclasses

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.generate.engine import generate_text, iter_text, iter_tokens
from gptforge.generate.sampling import SamplingParams
from gptforge.model.gpt import GPT


@pytest.fixture
def byte_model(tiny_cfg):
    return GPT(dataclasses.replace(tiny_cfg, vocab_size=257, attention_pattern="dense,local", local_window=6)).eval()


def _reference_greedy(model, prompt, n, keep):
    """No cache: recompute the window the engine holds (slides to the last `keep` tokens when full)."""
    C, seq, window = model.cfg.context_length, list(prompt), len(prompt)
    out = []
    for _ in range(n):
        if window > C:
            window = keep + 1
        logits = model(torch.tensor([seq[-window:]]))[0, -1]
        tok = int(logits.argmax())
        seq.append(tok)
        out.append(tok)
        window += 1
    return out


def test_cached_greedy_matches_recompute_also_after_the_window_slides(byte_model):
    prompt = [5, 9, 200, 17, 3]
    params = SamplingParams(max_new_tokens=40, temperature=0)  # 5 + 40 > context 16: slides several times
    got = [ev[0][1] for ev in iter_tokens(byte_model, [prompt], params, eot_id=10_000)]
    assert got == _reference_greedy(byte_model, prompt, 40, keep=16 - 16 // 4)


def test_batched_prompts_of_different_lengths_match_single_runs(byte_model):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [42]]
    params = SamplingParams(max_new_tokens=30, temperature=0)
    batched = [[] for _ in prompts]
    for events in iter_tokens(byte_model, prompts, params, eot_id=10_000):
        for row, tok in events:
            batched[row].append(tok)
    for row, p in enumerate(prompts):
        single = [ev[0][1] for ev in iter_tokens(byte_model, [p], params, eot_id=10_000)]
        assert batched[row] == single


def test_seeded_sampling_is_reproducible(byte_model, byte_tokenizer):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    a = generate_text(byte_model, byte_tokenizer, ["hi"], params)
    b = generate_text(byte_model, byte_tokenizer, ["hi"], params)
    c = generate_text(byte_model, byte_tokenizer, ["hi"], dataclasses.replace(params, seed=8))
    assert a == b and a != c


def test_stream_pieces_are_whole_characters_and_join_to_the_result(byte_model, byte_tokenizer):
    params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=1)
    pieces = [p for _, p in iter_text(byte_model, byte_tokenizer, ["\u00e9t\u00e9"], params)]
    assert "".join(pieces) == generate_text(byte_model, byte_tokenizer, ["\u00e9t\u00e9"], params)[0]
    for p in pieces:
        p.encode("utf-8")  # a split multi-byte character would have become U+FFFD only at the end


def test_stop_string_ends_the_row_and_is_not_emitted(byte_model, byte_tokenizer):
    params = SamplingParams(max_new_tokens=50, temperature=0)
    full = generate_text(byte_model, byte_tokenizer, ["ab"], params)[0]
    stop = full[3:5]
    assert len(stop) == 2
    cut = generate_text(byte_model, byte_tokenizer, ["ab"], dataclasses.replace(params, stop=(stop,)))[0]
    assert cut == full[:full.index(stop)]


class CountdownModel(torch.nn.Module):
    """Mock: uniform logits except that end-of-text wins once 3 tokens follow the prompt."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.dummy = cfg, torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens, kv_cache=None):
        logits = torch.zeros(*tokens.shape, self.cfg.vocab_size)
        logits[..., 120] = 1.0
        if kv_cache is not None and kv_cache.length >= 4:
            logits[..., 256] = 5.0
        if kv_cache is not None:
            kv_cache.advance(tokens.shape[1])
        return logits


def test_eot_ends_generation(tiny_cfg, byte_tokenizer):
    model = CountdownModel(dataclasses.replace(tiny_cfg, vocab_size=257))
    events = list(iter_tokens(model, [[1, 2]], SamplingParams(max_new_tokens=10, temperature=0), eot_id=256))
    assert events == [[(0, 120)], [(0, 120)], [(0, 120)], [(0, 256)]]
    assert generate_text(model, byte_tokenizer, ["ab"], SamplingParams(max_new_tokens=10, temperature=0)) == ["xxx"]


def test_over_long_prompt_is_a_clear_error(byte_model):
    with pytest.raises(GptforgeError, match="prompt 0 has 17 tokens; the model's context_length is 16"):
        next(iter_tokens(byte_model, [[1] * 17], SamplingParams(), eot_id=256))


def test_empty_prompt_starts_from_end_of_text(byte_model):
    """An empty prompt is fed as one end-of-text token; its KV slot is reserved too (it used to be missing, so a
    long empty-prompt generation ran out of cache: `gptforge demo` on a custom corpus crashed this way)."""
    params = SamplingParams(max_new_tokens=16, temperature=0)  # 1 + 16 - 1: every slot of the 16-token context
    # an end-of-text id the model does not generate after itself, so the rows run all 16 tokens
    eot, reference = next((e, ref) for e in range(256) if e not in (ref := _reference_greedy(byte_model, [e], 16,
                                                                                               keep=12)))
    for prompt in ([], [eot]):  # one at a time: the cache is sized to the row's own reservation
        got = [tok for events in iter_tokens(byte_model, [prompt], params, eot_id=eot) for _, tok in events]
        assert got == reference
