"""Unit tests for gptforge.checkpoint.convert: names, layouts, config mapping, refusals (no transformers needed)."""

import dataclasses
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint.convert import (
    from_gpt2_state,
    gpt2_config,
    gpt2_name,
    model_config_from_gpt2,
    model_shapes,
    to_gpt2_state,
    unsupported_features,
)
from gptforge.checkpoint.io import TIED_KEYS
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT

GPT2_DEFAULTS = {"model_type": "gpt2"}  # a config.json that leaves everything to GPT2Config's defaults


def _state(cfg):
    return {k: v for k, v in GPT(cfg).state_dict().items() if k not in TIED_KEYS}


def test_model_shapes_match_the_model(tiny_cfg):
    for cfg in (tiny_cfg, dataclasses.replace(tiny_cfg, n_layer=3, d_model=48, n_head=3, vocab_size=300)):
        assert model_shapes(cfg) == {k: tuple(v.shape) for k, v in _state(cfg).items()}


def test_gpt2_names_and_conv1d_layout(tiny_cfg):
    assert gpt2_name("blocks.1.attn.qkv.weight") == ("transformer.h.1.attn.c_attn.weight", True)
    assert gpt2_name("blocks.0.mlp.proj.bias") == ("transformer.h.0.mlp.c_proj.bias", False)
    assert gpt2_name("wte.weight") == ("transformer.wte.weight", False)
    with pytest.raises(GptforgeError, match="no GPT-2 counterpart"):
        gpt2_name("blocks.0.attn.rotary")
    state = _state(tiny_cfg)
    gpt2 = to_gpt2_state(state)
    D = tiny_cfg.d_model
    assert gpt2["transformer.h.0.attn.c_attn.weight"].shape == (D, 3 * D)
    assert gpt2["transformer.h.1.mlp.c_fc.weight"].shape == (D, 4 * D)
    assert gpt2["transformer.h.1.mlp.c_proj.weight"].shape == (4 * D, D)
    assert torch.equal(gpt2["transformer.h.0.attn.c_attn.weight"], state["blocks.0.attn.qkv.weight"].t())
    assert "lm_head.weight" not in gpt2 and all(t.is_contiguous() for t in gpt2.values())


def test_state_round_trip_is_exact_and_drops_mask_buffers(tiny_cfg):
    state = _state(tiny_cfg)
    tensors = {k.removeprefix("transformer."): v for k, v in to_gpt2_state(state).items()}
    origin = dict.fromkeys(tensors, Path("/x/model.safetensors"))
    tensors["lm_head.weight"] = state["wte.weight"].clone()  # a stored tied head is accepted
    origin["lm_head.weight"] = origin["wte.weight"]
    back = from_gpt2_state(dict(tensors), origin, tiny_cfg, tied=True)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_state_errors_name_the_tensor(tiny_cfg):
    good = {k.removeprefix("transformer."): v for k, v in to_gpt2_state(_state(tiny_cfg)).items()}
    origin = dict.fromkeys([*good, "lm_head.weight", "h.0.attn.rotary"], Path("/x/model.safetensors"))
    cases = [
        ({k: v for k, v in good.items() if k != "h.1.ln_2.bias"}, "lack 'h.1.ln_2.bias'"),
        ({**good, "h.0.attn.c_attn.weight": good["h.0.attn.c_attn.weight"].t()}, r"has shape \(96, 32\) but config.json implies \(32, 96\)"),
        ({**good, "lm_head.weight": torch.zeros_like(good["wte.weight"])}, "lm_head.weight differs"),
        ({**good, "h.0.attn.rotary": torch.zeros(2)}, "unexpected tensors"),
    ]
    for tensors, message in cases:
        with pytest.raises(GptforgeError, match=message):
            from_gpt2_state(tensors, origin, tiny_cfg, tied=True)
    with pytest.raises(GptforgeError, match="tie_word_embeddings is false"):
        from_gpt2_state(dict(good), origin, tiny_cfg, tied=False)


def test_gpt2_config_defaults_are_openai_gpt2(tmp_path):
    cfg, notes = model_config_from_gpt2(GPT2_DEFAULTS, source=tmp_path / "config.json")
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.context_length) == (50257, 12, 12, 768, 1024)
    assert cfg.dropout == 0.1 and cfg.bias and cfg.attention_pattern == "dense" and notes == []


def test_gpt2_config_aliases_and_dropout_note(tmp_path):
    hf = {"model_type": "gpt2", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "n_ctx": 96,
          "vocab_size": 500, "resid_pdrop": 0.2, "embd_pdrop": 0.0, "attn_pdrop": 0.2}
    cfg, notes = model_config_from_gpt2(hf, source=tmp_path / "config.json")
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.context_length, cfg.vocab_size) == (64, 3, 4, 96, 500)
    assert cfg.dropout == 0.2 and "dropouts differ" in notes[0]
    nano = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "block_size": 8, "vocab_size": 300}
    assert model_config_from_gpt2(nano, source=tmp_path)[0].context_length == 8


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"activation_function": "gelu"}, "activation_function 'gelu'"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06"),
    ({"n_inner": 1000}, "n_inner 1000"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"n_head": 5}, "n_head=5 must divide"),
    ({"n_layer": "twelve"}, "n_layer must be an integer, got 'twelve'"),
    ({"resid_pdrop": None, "layer_norm_epsilon": "small"}, "layer_norm_epsilon must be a number"),
])
def test_gpt2_config_refusals_name_the_setting(tmp_path, change, message):
    with pytest.raises(GptforgeError, match=message) as info:
        model_config_from_gpt2({**GPT2_DEFAULTS, **change}, source=tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(info.value)
    assert model_config_from_gpt2({**GPT2_DEFAULTS, "activation_function": "gelu_pytorch_tanh"}, source=tmp_path)


def test_unsupported_features(tiny_cfg):
    assert unsupported_features(tiny_cfg) == []
    banded = dataclasses.replace(tiny_cfg, attention_pattern="dense,local", local_window=4)
    assert "banded attention" in unsupported_features(banded)[0]
    # a band as wide as the context is dense attention: exportable
    assert unsupported_features(dataclasses.replace(banded, local_window=16)) == []
    assert "shared layers" in unsupported_features(dataclasses.replace(tiny_cfg, shared_layer_group=2))[0]
    assert "bias=false" in unsupported_features(dataclasses.replace(tiny_cfg, bias=False))[0]


def test_gpt2_config_round_trips(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, dropout=0.1)
    hf = gpt2_config(cfg, eot_id=7)
    assert hf["n_inner"] is None and hf["activation_function"] == "gelu_new" and hf["eos_token_id"] == 7
    back, notes = model_config_from_gpt2(hf, source=tmp_path)
    assert back == cfg and notes == []


def test_tokenizer_import_refuses_settings_that_break_exact_round_trips(tmp_path):
    import json

    from gptforge.checkpoint.hf_tokenizer import export_tokenizer, import_tokenizer
    from gptforge.tokenizer import train_bpe

    good = tmp_path / "good"
    export_tokenizer(train_bpe(["hello world, hello tokenizer"] * 20, vocab_size=280), good, context_length=16)
    tokenizer, source = import_tokenizer(good)
    assert source == good / "tokenizer.json" and tokenizer.decode(tokenizer.encode(" hi there")) == " hi there"
    data = json.loads((good / "tokenizer.json").read_text())
    for name, change, message in [
        ("prefix", {"pre_tokenizer": {**data["pre_tokenizer"], "add_prefix_space": True}}, "add_prefix_space true"),
        ("normalizer", {"normalizer": {"type": "NFKC"}}, r"a normalizer \(NFKC\)"),
        ("split", {"pre_tokenizer": {"type": "Whitespace"}}, "pre-tokenizer 'Whitespace'"),
    ]:
        bad = tmp_path / name
        bad.mkdir()
        (bad / "tokenizer.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(GptforgeError, match=message):
            import_tokenizer(bad)
    (good / "tokenizer_config.json").write_text(json.dumps({"add_prefix_space": True}))
    with pytest.raises(GptforgeError, match="tokenizer_config.json: add_prefix_space true"):
        import_tokenizer(good)
