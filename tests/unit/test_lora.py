"""LoRA adapters (model/lora.py): zero-init, merge, freezing, counts, files, checksum, meta-device build."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from gptforge.checkpoint.io import load_weights
from gptforge.config import Config, ModelConfig, OptimConfig, validate
from gptforge.data.batches import Batch
from gptforge.distributed.materialize import materialize
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT, count_parameters
from gptforge.model.linear import linear
from gptforge.model.lora import (
    LoRAEmbedding,
    LoRALinear,
    adapter_state,
    freeze_base,
    load_adapter,
    lora_missing_ok,
    merge_lora,
    plain_config,
    save_adapter,
)
from gptforge.train.optim import build_optimizer
from gptforge.train.step import train_step

ALL = "qkv,attn_proj,mlp_fc,mlp_proj"


def lora_cfg(tiny_cfg, **kw):
    return dataclasses.replace(tiny_cfg, lora_r=4, **kw)


def randomize_b(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("targets", ["qkv", ALL + ",lm_head", "wte,mlp_fc"])
def test_fresh_adapter_leaves_logits_unchanged(tiny_cfg, targets):
    torch.manual_seed(3)
    base = GPT(tiny_cfg)
    torch.manual_seed(3)
    adapted = GPT(lora_cfg(tiny_cfg, lora_targets=targets))
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(base(x), adapted(x))  # B = 0 and the base weights are drawn from the same seed by name
    lora = [n for n, _ in adapted.named_parameters() if "lora" in n]
    whole_model = sum(t in ("lm_head", "wte") for t in targets.split(","))  # one module, not one per block
    assert len(lora) == 2 * (2 * (len(targets.split(",")) - whole_model) + whole_model)
    assert adapted.lm_head.weight is adapted.wte.weight  # the tied head stays tied under an adapter
    layer, width = (adapted.blocks[0].attn.qkv, 96) if "qkv" in targets else (adapted.blocks[0].mlp.fc, 128)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (width, 4)
    # base parameter names are unchanged: a base checkpoint's state dict fits apart from the adapters
    assert set(base.state_dict()) == {k for k in adapted.state_dict() if "lora" not in k}


def test_forward_is_base_plus_scaled_low_rank_update(tiny_cfg):
    layer = LoRALinear(torch.nn.Linear(8, 6), r=2, alpha=6.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 8)
    want = x @ layer.weight.T + layer.bias + 3.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), want)
    with torch.inference_mode():  # linear() must not take the plain-nn.Linear fast path for an adapted layer
        torch.testing.assert_close(linear(x, layer), want)


def test_merge_equals_adapted_model(tiny_cfg):
    model = GPT(lora_cfg(tiny_cfg, lora_targets=ALL, lora_alpha=8.0)).eval()
    randomize_b(model)
    x = torch.randint(0, 256, (3, 16))
    merged = merge_lora(model)
    assert merged.cfg == plain_config(model.cfg) and merged.cfg.lora_r == 0
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapted_logits, merged_logits = model(x), merged(x)
    assert (adapted_logits - merged_logits).abs().max() <= 1e-5
    assert (adapted_logits - GPT(tiny_cfg).eval()(x)).abs().max() > 1e-2  # the adapters do change the output


def test_embedding_adapter_adds_a_low_rank_update_to_each_row(tiny_cfg):
    layer = LoRAEmbedding(torch.nn.Embedding(10, 6), r=2, alpha=6.0)
    assert torch.count_nonzero(layer.lora_A) == 0 and layer.lora_A.shape == (2, 10) and layer.lora_B.shape == (6, 2)
    with torch.no_grad():
        layer.lora_A.normal_()
    ids = torch.tensor([[3, 0, 9], [3, 3, 1]])
    table = layer.weight + 3.0 * (layer.lora_B @ layer.lora_A).T  # (V, D): PEFT's delta weight
    torch.testing.assert_close(layer(ids), table[ids])
    torch.testing.assert_close(layer.delta() + layer.weight, table)
    model = GPT(lora_cfg(tiny_cfg, n_layer=4, d_model=64, vocab_size=512, lora_targets="wte"))
    assert abs(model.wte.lora_B.std().item() - 1.0) < 0.1  # PEFT's N(0, 1)


def test_embedding_adapter_trains_the_rows_of_seen_tokens_only(tiny_cfg):
    model = GPT(lora_cfg(tiny_cfg, lora_targets="wte"))
    trainable, _ = freeze_base(model)
    assert trainable == 4 * (256 + 32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0), "cpu")
    x = torch.randint(0, 100, (4, 16))  # ids 100..255 never appear
    for _ in range(3):
        train_step(model, opt, [Batch(x, torch.roll(x, -1, 1))], grad_clip=1.0)
    A = model.wte.lora_A.detach()
    assert torch.count_nonzero(A[:, 100:]) == 0 and torch.count_nonzero(A[:, x.unique()].abs() > 0) > 0
    assert torch.equal(model.wte.weight, before["wte.weight"]) and model.wte.weight.grad is None
    assert {n for n, p in model.named_parameters() if p in opt.state} == {"wte.lora_A", "wte.lora_B"}


def test_merge_of_an_embedding_adapter_keeps_class_logits_and_refuses_a_language_model(tiny_cfg):
    classifier = GPT(lora_cfg(tiny_cfg, lora_targets="qkv,wte", n_labels=3)).eval()
    randomize_b(classifier)
    with torch.no_grad():
        classifier.wte.lora_A.normal_(0.0, 0.1)
    x, lengths = torch.randint(0, 256, (3, 16)), torch.tensor([16, 5, 9])
    merged = merge_lora(classifier)
    want = classifier(x, head="classify", lengths=lengths)
    assert (merged(x, head="classify", lengths=lengths) - want).abs().max() <= 1e-5
    assert (want - merge_lora(randomize_emb_off(classifier))(x, head="classify", lengths=lengths)).abs().max() > 1e-3
    with pytest.raises(GptforgeError, match="cannot merge a LoRA adapter on wte into a language model"):
        merge_lora(GPT(lora_cfg(tiny_cfg, lora_targets="wte")))


def randomize_emb_off(model):
    """A copy of `model` with its embedding adapter reset to zero (to show that adapter matters)."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.wte.lora_A.zero_()
    return other


def test_merge_refuses_an_adapted_head(tiny_cfg):
    model = GPT(lora_cfg(tiny_cfg, lora_targets="qkv,lm_head"))
    with pytest.raises(GptforgeError, match="lm_head.*token embedding"):
        merge_lora(model)


def test_frozen_parameters_get_no_update_and_no_optimizer_state(tiny_cfg):
    model = GPT(lora_cfg(tiny_cfg, lora_targets="qkv,mlp_fc"))
    trainable, total = freeze_base(model)
    assert trainable == 2 * 4 * ((32 + 96) + (32 + 128)) and total == model.num_parameters()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0), "cpu")
    x = torch.randint(0, 256, (4, 16))
    for _ in range(3):
        train_step(model, opt, [Batch(x, torch.roll(x, -1, 1))], grad_clip=1.0)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if "lora" in name:
            assert not p.requires_grad or not torch.equal(p, before[name]) or name.endswith("lora_A")
        else:
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[name]), name
    assert all(not torch.equal(params[n], before[n]) for n in params if n.endswith("lora_B"))
    with_state = {n for n, p in params.items() if p in opt.state}
    assert with_state == {n for n in params if "lora" in n}
    assert sum(len(g["params"]) for g in opt.param_groups) == 8


def test_freeze_base_extra_prefixes_and_nothing_to_train(tiny_cfg):
    model = GPT(lora_cfg(tiny_cfg))
    trainable, _ = freeze_base(model, trainable=("ln_f.",))
    assert trainable == 2 * 4 * (32 + 96) + 2 * 32
    with pytest.raises(GptforgeError, match="no parameter left to train"):
        freeze_base(GPT(tiny_cfg))


def test_counts_r8_on_qkv_is_a_small_fraction():
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=128, context_length=64, vocab_size=512, lora_r=8)
    with torch.device("meta"):
        model = GPT(cfg)
    trainable, total = freeze_base(model)
    assert trainable == 4 * 8 * (128 + 384) == 16384
    assert total == count_parameters(cfg) == 16384 + count_parameters(plain_config(cfg))
    assert trainable / total < 0.10  # 1.9%


@pytest.mark.parametrize("change, message", [
    ({"lora_targets": "qkv,attn_out"}, r"unknown target 'attn_out'; did you mean 'attn_proj'\? \(allowed: qkv, "),
    ({"lora_targets": "embed"}, r"unknown target 'embed'; did you mean 'wte'\?"),
    ({"lora_targets": "c_attn,c_fc"}, r"unknown target 'c_attn'; did you mean 'qkv'\?"),
    ({"lora_targets": " , "}, "matches no layer"),
    ({"lora_targets": "qkv,qkv"}, "names a target twice"),
    ({"lora_r": -1}, "lora_r must be >= 0"),
    ({"lora_alpha": 0.0}, "lora_alpha must be > 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"attention_pattern": "dense,local"}, "needs dense attention.*could not be exported"),
    ({"shared_layer_group": 2}, "needs model.shared_layer_group=1"),
])
def test_config_errors(tiny_cfg, change, message):
    cfg = Config(model=dataclasses.replace(tiny_cfg, **{"lora_r": 8, **change}))
    with pytest.raises(GptforgeError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_lora_fields_are_ignored_without_rank(tiny_cfg):
    validate(Config(model=dataclasses.replace(tiny_cfg, attention_pattern="dense,local", lora_targets="nope")))


def test_lora_targets_without_rank_are_flagged():
    from gptforge.config import advisories, load_config

    notes = advisories(load_config(preset="debug", overrides=[("lora_targets", "qkv,wte"), ("max_steps", "10")]))
    assert len(notes) == 1 and "model.lora_r=0, so no LoRA adapters are added" in notes[0] and "'qkv,wte'" in notes[0]
    assert advisories(load_config(preset="debug", overrides=[("lora_targets", "qkv,wte"), ("lora_r", "4"),
                                                              ("max_steps", "10")])) == []


def test_adapter_files_are_small_and_carry_the_base_checksum(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, n_layer=4, d_model=64, lora_r=2)
    model = GPT(cfg)
    randomize_b(model)
    save_adapter(model, tmp_path)
    info = (tmp_path / "adapter.json").read_text()
    size = (tmp_path / "adapter.safetensors").stat().st_size
    n_adapter = 4 * 2 * (64 + 192)
    assert n_adapter * 4 <= size < n_adapter * 4 + 2048  # float32 adapters plus a small header
    assert size < 0.05 * model.num_parameters() * 4
    assert '"base_sha256": "' in info and '"lora_r": 2' in info
    # round trip onto the same base (a fresh adapter): identical logits
    other = GPT(cfg)
    other.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k}, strict=False)
    x = torch.randint(0, 256, (2, 16))
    assert not torch.equal(other(x), model(x))
    load_adapter(other, tmp_path)
    assert torch.equal(other(x), model(x))


def test_loading_an_adapter_onto_a_different_base_is_refused(tiny_cfg, tmp_path):
    model = GPT(lora_cfg(tiny_cfg))
    save_adapter(model, tmp_path)
    different = GPT(lora_cfg(tiny_cfg))  # another seed: another base
    with pytest.raises(GptforgeError, match="trained on a different base model") as err:
        load_adapter(different, tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(GptforgeError, match="lora_r=4 but the model has 8"):
        load_adapter(GPT(dataclasses.replace(tiny_cfg, lora_r=8)), tmp_path)


def test_base_checkpoint_loads_into_adapted_model_with_lora_missing_ok(tiny_cfg, tmp_path):
    base = GPT(tiny_cfg)
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}, str(path))
    adapted = GPT(lora_cfg(tiny_cfg, lora_targets=ALL))
    with pytest.raises(GptforgeError, match="missing"):
        load_weights(adapted, path)
    assert lora_missing_ok(adapted)[:2] == ("blocks.0.attn.qkv.lora_A", "blocks.0.attn.qkv.lora_B")
    load_weights(adapted, path, missing_ok=lora_missing_ok(adapted))
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(adapted(x), base(x))


def test_meta_build_and_materialize_equals_eager_build(tiny_cfg):
    cfg = lora_cfg(tiny_cfg, lora_targets=ALL + ",lm_head,wte")
    eager = GPT(cfg)
    eager.init_weights(seed=1234)
    with torch.device("meta"):
        lazy = GPT(cfg)
    freeze_base(lazy)  # requires_grad set on the meta device survives materialisation
    materialize(lazy, torch.device("cpu"), seed=1234)
    assert lazy.lm_head.weight is lazy.wte.weight
    a, b = dict(eager.named_parameters()), dict(lazy.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not b["wte.weight"].requires_grad and b["blocks.1.mlp.fc.lora_A"].requires_grad
    assert torch.count_nonzero(b["blocks.0.attn.qkv.lora_B"]) == 0
    assert abs(b["blocks.0.mlp.proj.lora_A"].std().item() - 1 / (3 * 128) ** 0.5) < 0.01
    assert torch.count_nonzero(b["wte.lora_A"]) == 0 and abs(b["wte.lora_B"].std().item() - 1.0) < 0.3
    assert adapter_state(lazy).keys() == {k for k in b if "lora" in k}


def test_training_hooks_write_the_same_adapter_files_under_activation_checkpointing(tiny_cfg, tmp_path):
    from gptforge.distributed.parallelize import apply_activation_checkpointing
    from gptforge.train.adapters import lora_hooks

    cfg = lora_cfg(tiny_cfg, lora_targets="qkv,mlp_proj")
    setup_model, save_extra = lora_hooks()
    with torch.device("meta"):
        model = GPT(cfg)
    setup_model(model)
    apply_activation_checkpointing(model)  # inserts _checkpoint_wrapped_module into parameter names
    materialize(model, torch.device("cpu"), seed=5)
    randomize_b(model)
    (tmp_path / "hook").mkdir()
    save_extra(tmp_path / "hook")
    plain = GPT(cfg)
    plain.load_state_dict(model.state_dict())
    save_adapter(plain, tmp_path / "plain")
    for name in ("adapter.json", "adapter.safetensors"):
        assert (tmp_path / "hook" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


def test_targets_from_yaml_list_and_cli_override(tmp_path):
    from gptforge.config import load_config

    path = tmp_path / "lora.yaml"
    path.write_text("model:\n  lora_r: 8\n  lora_targets: [qkv, mlp_fc]\n")
    cfg = load_config(preset="debug", path=path, overrides=[("lora_alpha", "32"), ("model.lora_dropout", "0.05")])
    assert (cfg.model.lora_r, cfg.model.lora_targets, cfg.model.lora_alpha, cfg.model.lora_dropout) == \
        (8, "qkv,mlp_fc", 32.0, 0.05)
    assert cfg.model.lora_target_names() == ["qkv", "mlp_fc"]
