import pytest

from gptforge.config import PRESETS, load_config, parse_overrides
from gptforge.errors import GptforgeError
from gptforge.model.gpt import count_parameters

# Table 2.1 of Brown et al. (2020): total parameters.
TABLE_2_1 = {"gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9,
             "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9}


@pytest.mark.parametrize("name", sorted(TABLE_2_1))
def test_gpt3_presets_match_table_2_1(name):
    cfg = load_config(preset=name)
    assert cfg.model.vocab_size == 50257 and cfg.model.context_length == 2048
    assert abs(count_parameters(cfg.model) / TABLE_2_1[name] - 1) < 0.02
    assert cfg.model.d_model == cfg.model.n_head * cfg.model.d_head


def test_gpt3_small_recipe():
    cfg = load_config(preset="gpt3-small")
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.model.d_head) == (12, 768, 12, 64)
    assert cfg.train.global_batch_tokens == 2**19 and cfg.optim.lr == 6e-4
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps, cfg.optim.weight_decay) == (0.9, 0.95, 1e-8, 0.1)
    assert cfg.optim.warmup_steps == round(375e6 / 2**19)  # 375M warmup tokens
    assert cfg.grad_accum_steps() == 256  # 2**19 / (1 * 2048)
    assert cfg.grad_accum_steps(world_size=8) == 32


def test_table_inconsistencies_are_resolved_with_d_head_128():
    xl, b13 = load_config(preset="gpt3-xl").model, load_config(preset="gpt3-13b").model
    assert (xl.d_model, xl.n_head, xl.d_head) == (2048, 16, 128)
    assert (b13.d_model, b13.n_head, b13.d_head) == (5120, 40, 128)


def test_unknown_field_suggests_closest():
    with pytest.raises(GptforgeError, match="unknown field 'n_haed'; did you mean 'n_head'"):
        load_config(preset="debug", overrides=[("n_haed", "4")])


def test_other_tools_names_are_aliases_and_derived_names_explain():
    cfg = load_config(preset="debug", overrides=[("learning_rate", "3e-4"), ("block_size", "32"), ("n_embd", "64"),
                                                 ("max_iters", "7"), ("optim.adam_beta2", "0.99")])
    assert (cfg.optim.lr, cfg.model.context_length, cfg.model.d_model, cfg.train.max_steps, cfg.optim.beta2) == \
        (3e-4, 32, 64, 7, 0.99)
    with pytest.raises(GptforgeError, match="gradient_accumulation_steps.*derived.*global_batch_tokens"):
        load_config(preset="debug", overrides=[("gradient_accumulation_steps", "4")])
    with pytest.raises(GptforgeError, match="eval_tokens"):
        load_config(preset="debug", overrides=[("eval_steps", "4")])


def test_old_checkpoint_config_is_migrated():
    from gptforge.config import config_from_dict

    tree = load_config(preset="debug").to_dict()
    del tree["train"]["eval_tokens"]
    tree["train"]["eval_steps"] = 3  # written by gptforge before eval_tokens existed
    assert config_from_dict(tree).train.eval_tokens == 3 * 4 * 16  # micro-batches x micro_batch_size x context


def test_advisories_flag_warmup_past_the_end():
    from gptforge.config import advisories

    notes = advisories(load_config(preset="debug", overrides=[("warmup_steps", "50"), ("max_steps", "10")]))
    assert any("warmup_steps=50 exceeds train.max_steps=10" in n for n in notes)
    assert advisories(load_config(preset="debug")) == []
    with pytest.raises(GptforgeError, match="did you mean 'gpt3-small'"):
        load_config(preset="gpt3-smal")


@pytest.mark.parametrize("key,value,field", [
    ("n_head", "3", "model.n_head"), ("lr", "0", "optim.lr"), ("lr", "-1e-3", "optim.lr"),
    ("dropout", "1.5", "model.dropout"), ("max_steps", "abc", "train.max_steps"),
    ("attention_pattern", "dense,sparse", "model.attention_pattern"), ("bias", "maybe", "model.bias"),
    ("shared_layer_group", "3", "model.shared_layer_group"), ("global_batch_tokens", "100", "train.global_batch_tokens"),
])
def test_invalid_values_name_the_field(key, value, field):
    with pytest.raises(GptforgeError, match=field.replace(".", r"\.")):
        load_config(preset="debug", overrides=[(key, value)])


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 3\noptim:\n  lr: 2.0e-3\ntrain:\n  max_steps: 7\n")
    cfg = load_config(preset="debug", path=path, overrides=parse_overrides(["--lr", "1e-3", "--train.max_steps=9"]))
    assert (cfg.model.n_layer, cfg.optim.lr, cfg.train.max_steps) == (3, 1e-3, 9)
    (tmp_path / "bad.yaml").write_text("modle:\n  n_layer: 3\n")
    with pytest.raises(GptforgeError, match="unknown section 'modle'; did you mean 'model'"):
        load_config(path=tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    with pytest.raises(GptforgeError, match="not valid YAML"):
        load_config(path=tmp_path / "broken.yaml")
    with pytest.raises(GptforgeError, match="config file not found"):
        load_config(path=tmp_path / "missing.yaml")


def test_parse_overrides_errors():
    with pytest.raises(GptforgeError, match="needs a value"):
        parse_overrides(["--lr"])
    with pytest.raises(GptforgeError, match="unexpected argument"):
        parse_overrides(["lr=3"])


def test_every_preset_is_valid():
    for name in PRESETS:
        load_config(preset=name)
