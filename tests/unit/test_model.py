import dataclasses

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT, count_parameters, flops_per_token
from gptforge.model.kv_cache import KVCache


def _cache(model, batch_size):
    c = model.cfg
    return KVCache(n_layer=c.n_layer, batch_size=batch_size, n_head=c.n_head, d_head=c.d_head,
                   capacity=c.context_length)


@pytest.mark.parametrize("variant", [{}, {"attention_pattern": "dense,local", "local_window": 4},
                                     {"shared_layer_group": 2}, {"bias": False}])
def test_shapes_and_parameter_count(tiny_cfg, variant):
    cfg = dataclasses.replace(tiny_cfg, **variant)
    model = GPT(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 16))
    logits = model(tokens)
    assert logits.shape == (3, 16, cfg.vocab_size) and logits.dtype == torch.float32
    logits2, loss = model(tokens, tokens)
    assert torch.equal(logits, logits2) and loss.shape == () and 5.0 < loss.item() < 6.1  # ~ln(256)=5.55
    assert model.num_parameters() == count_parameters(cfg)


def test_shared_layers_share_weights(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, n_layer=4, shared_layer_group=2)
    model = GPT(cfg)
    assert len(model.blocks) == 2
    assert count_parameters(cfg) == count_parameters(dataclasses.replace(tiny_cfg, n_layer=2))


def test_init_std(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, d_model=256, n_layer=8, n_head=4)
    model = GPT(cfg)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2*8)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.blocks[0].ln_1.weight.eq(1).all() and model.blocks[0].attn.qkv.bias.eq(0).all()
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize("pattern", ["dense", "dense,local"])
def test_future_tokens_cannot_change_earlier_logits(tiny_cfg, pattern):
    model = GPT(dataclasses.replace(tiny_cfg, attention_pattern=pattern, local_window=5)).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = torch.randint(0, 256, (2, 6))
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_local_band_limits_the_receptive_field(tiny_cfg):
    # one banded layer: position 15 sees only tokens 12..15 when the band is 4
    model = GPT(dataclasses.replace(tiny_cfg, n_layer=1, attention_pattern="local", local_window=4)).eval()
    tokens = torch.randint(0, 256, (1, 16))
    changed = tokens.clone()
    changed[:, :12] = (changed[:, :12] + 1) % 256
    torch.testing.assert_close(model(tokens)[:, 15], model(changed)[:, 15], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", [{}, {"attention_pattern": "local,dense", "local_window": 5},
                                     {"shared_layer_group": 2}])
def test_kv_cache_matches_full_forward(tiny_cfg, variant):
    model = GPT(dataclasses.replace(tiny_cfg, **variant)).eval()
    tokens = torch.randint(0, 256, (2, 16))
    full = model(tokens)
    cache = _cache(model, 2)
    pieces = [model(tokens[:, :7], kv_cache=cache)]
    pieces += [model(tokens[:, t:t + 1], kv_cache=cache) for t in range(7, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    with pytest.raises(GptforgeError, match="free slots"):
        model(tokens[:, :1], kv_cache=cache)


def test_kv_cache_rows_of_different_lengths_match_unpadded_rows(tiny_cfg):
    model = GPT(dataclasses.replace(tiny_cfg, attention_pattern="dense,local", local_window=3)).eval()
    short, long = torch.randint(0, 256, (1, 4)), torch.randint(0, 256, (1, 9))
    batch = torch.cat([torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1), long])  # right padding
    cache = _cache(model, 2)
    cache.select(takes=[4, 9])  # each row has its own length: 4 and 9 real tokens
    logits = model(batch, kv_cache=cache)
    assert cache.row_lengths == [4, 9]
    torch.testing.assert_close(logits[0, :4], model(short)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1], model(long)[0], rtol=0, atol=1e-5)
    nxt = torch.tensor([[7], [8]])
    step = model(nxt, kv_cache=cache)[:, -1]
    torch.testing.assert_close(step[0], model(torch.cat([short, nxt[:1]], 1))[0, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(step[1], model(torch.cat([long, nxt[1:]], 1))[0, -1], rtol=0, atol=1e-5)


def test_too_long_input_is_a_clear_error(tiny_cfg):
    with pytest.raises(GptforgeError, match="17 tokens; the model's context_length is 16"):
        GPT(tiny_cfg)(torch.zeros(1, 17, dtype=torch.long))


def test_flops_per_token_gpt3_175b():
    # Table D.1 of Brown et al.: 175B trained on 300B tokens costs 3.14e23 FLOPs -> ~1.05e12 FLOPs/token
    from gptforge.config import load_config

    fpt = flops_per_token(load_config(preset="gpt3-175b").model)
    assert fpt * 300e9 == pytest.approx(3.14e23, rel=0.05)


def test_training_forward_compiles_as_one_graph(tiny_cfg):
    """--compile must trace the whole model: no graph breaks (the oneDNN decode path is skipped under tracing)."""
    model = GPT(dataclasses.replace(tiny_cfg, attention_pattern="dense,local", local_window=4)).train()
    x = torch.randint(0, tiny_cfg.vocab_size, (2, tiny_cfg.context_length))
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons[:1]
    assert explained.graph_count == 1
