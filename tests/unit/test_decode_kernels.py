"""The decoding fast path: oneDNN linears under inference mode, and a KV cache sized to the call."""

import dataclasses

import pytest
import torch
from torch import nn

import gptforge.generate.engine as engine
import gptforge.generate.scheduler as scheduler
import gptforge.model.linear as linear_module
from gptforge.generate.sampling import SamplingParams
from gptforge.model.gpt import GPT
from gptforge.model.kv_cache import KVCache
from gptforge.model.linear import linear


@pytest.mark.parametrize("shape", [(1, 384), (8, 384), (2, 5, 384)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_the_layer(shape, bias):
    layer = nn.Linear(384, 400, bias=bias)  # above ONEDNN_MIN_WEIGHTS: the oneDNN route in inference mode
    x = torch.randn(shape)
    expected = layer(x)
    assert torch.equal(linear(x, layer), expected)  # autograd on: the layer itself, bit for bit
    with torch.no_grad():
        assert torch.equal(linear(x, layer), expected)  # evaluation: unchanged numerics
    with torch.inference_mode():
        got = linear(x, layer)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-5)
    # the oneDNN route really ran (it switches itself off if this PyTorch build's op misbehaves)
    assert linear_module._onednn_linear is not None or not torch.backends.mkldnn.is_available()


def test_small_layers_stay_with_the_layer_itself():
    layer, x = nn.Linear(64, 64), torch.randn(4, 64)  # 4k weights: MKL's lower per-call cost wins
    with torch.inference_mode():
        assert torch.equal(linear(x, layer), layer(x))


def test_linear_leaves_wrapped_layers_to_their_forward():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    layer, x = Doubled(8, 4), torch.randn(3, 8)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, layer), 2 * nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("variant", [{}, {"attention_pattern": "local,dense", "local_window": 5},
                                     {"shared_layer_group": 2}])
def test_kv_cache_in_inference_mode_matches_full_forward(tiny_cfg, variant, monkeypatch):
    monkeypatch.setattr(linear_module, "ONEDNN_MIN_WEIGHTS", 0)  # the tiny model's matrices take oneDNN too
    model = GPT(dataclasses.replace(tiny_cfg, **variant)).eval()
    tokens = torch.randint(0, 256, (3, 16))
    full = model(tokens)
    c = model.cfg
    with torch.inference_mode():
        cache = KVCache(n_layer=c.n_layer, batch_size=3, n_head=c.n_head, d_head=c.d_head, capacity=16)
        pieces = [model(tokens[:, :6], kv_cache=cache)]
        pieces += [model(tokens[:, t:t + 1], kv_cache=cache) for t in range(6, 16)]
        cached = torch.cat(pieces, dim=1)
    torch.testing.assert_close(cached, full.detach(), rtol=0, atol=1e-5)


class _Recorder(KVCache):
    made: list["_Recorder"] = []

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.forwards = 0
        _Recorder.made.append(self)

    def advance(self, n_new):
        self.forwards += 1
        super().advance(n_new)


def test_cache_holds_only_the_slots_a_call_uses(tiny_cfg, monkeypatch):
    monkeypatch.setattr(scheduler, "KVCache", _Recorder)
    model = GPT(tiny_cfg).eval()
    _Recorder.made.clear()
    events = list(engine.iter_tokens(model, [[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=4, temperature=0),
                                     eot_id=-1))
    assert len(events) == 4 and all(len(e) == 2 for e in events)
    cache = _Recorder.made[-1]
    # 3 prompt slots + 3 fed-back tokens (the 4th is never fed back): 1 prefill + 3 single-token forwards
    assert cache.capacity == 6 and cache.length == 6 and cache.forwards == 4
    assert cache.row_lengths == [6, 5]  # each row holds its own prompt and fed-back tokens
    assert list(engine.iter_tokens(model, [[1]], SamplingParams(max_new_tokens=0), eot_id=-1)) == []
    # a call that outgrows the window gets the whole window, and slides
    list(engine.iter_tokens(model, [[1, 2]], SamplingParams(max_new_tokens=30, temperature=0), eot_id=-1))
    assert _Recorder.made[-1].capacity == tiny_cfg.context_length
