import math

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.model.gpt import GPT
from gptforge.train.optim import param_groups
from gptforge.train.schedule import accum_steps_at, lr_at

KW = dict(lr=1e-3, warmup_steps=100, decay_steps=2000, min_lr_ratio=0.1)


def test_lr_schedule_values():
    assert lr_at(0, **KW) == pytest.approx(1e-5)
    assert lr_at(49, **KW) == pytest.approx(5e-4)
    assert lr_at(99, **KW) == pytest.approx(1e-3)
    assert lr_at(100, **KW) == pytest.approx(1e-3)
    assert lr_at(1050, **KW) == pytest.approx(1e-4 + 0.5 * 9e-4)  # cosine midpoint
    assert lr_at(2000, **KW) == pytest.approx(1e-4)
    assert lr_at(10**6, **KW) == pytest.approx(1e-4)  # constant at 10% afterwards
    progress = (1500 - 100) / 1900
    assert lr_at(1500, **KW) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * progress)) * 9e-4)


def test_batch_ramp():
    kw = dict(full_accum_steps=256, micro_step_tokens=2048, ramp_start_tokens=32768, ramp_tokens=4_000_000_000)
    assert accum_steps_at(0, **kw) == 16  # 32k tokens = 16 sequences of 2048
    assert accum_steps_at(2_000_000_000, **kw) == (32768 + (2**19 - 32768) // 2) // 2048
    assert accum_steps_at(4_000_000_000, **kw) == 256
    assert accum_steps_at(0, **{**kw, "ramp_tokens": 0}) == 256


def test_weight_decay_groups():
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=64, context_length=16))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "wte.weight" in decayed and "wpe.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
    assert all(n.endswith("bias") or ".ln_" in n or n.startswith("ln_f") for n in (names[id(p)] for p in no_decay["params"]))
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert sum(p.numel() for p in no_decay["params"]) == 2 * (4 * 32 + 3 * 32 + 32 + 4 * 32 + 32) + 2 * 32
    assert not any(p is model.lm_head.weight for p in no_decay["params"])
    assert torch.equal(model.lm_head.weight, model.wte.weight)
