"""Pieces of the scale work that need no process group: the sharding-invariant initialisation, sharded
checkpoints in one process, schema migration, and the planner's host-memory (CPU rank) mode."""

import json
import math
import subprocess
import sys

import pytest
import torch

from gptforge.checkpoint.io import (
    checkpoint_format,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from gptforge.checkpoint.sharded import load_model, load_optimizer, save_sharded
from gptforge.config import Config, ModelConfig
from gptforge.distributed.env import DistInfo
from gptforge.distributed.materialize import materialize
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT, init_rows
from gptforge.plan import CPU_RUNTIME_BYTES, memory_per_rank
from gptforge.train.optim import build_optimizer
from gptforge.utils.device import meta_device


def test_init_rows_of_any_split_equal_the_whole():
    whole = init_rows(0.02, (3000, 700), seed=5, name="w")  # 700 values per row: 1498 rows per block
    cuts = [0, 1, 1497, 1498, 1499, 2999, 3000]
    parts = torch.cat([init_rows(0.02, (3000, 700), seed=5, name="w", start=a, stop=b)
                       for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(parts, whole)
    assert not torch.equal(whole, init_rows(0.02, (3000, 700), seed=6, name="w"))
    assert not torch.equal(whole, init_rows(0.02, (3000, 700), seed=5, name="v"))
    assert abs(whole.std().item() - 0.02) < 2e-4 and abs(whole.mean().item()) < 2e-4


def test_gpt2_init_numerics_and_seeded_meta_build(tiny_cfg):
    model = GPT(tiny_cfg)
    model.init_weights(seed=11)
    std = 0.02 / math.sqrt(2 * tiny_cfg.n_layer)
    b = model.blocks[0]
    assert torch.equal(b.attn.qkv.bias, torch.zeros_like(b.attn.qkv.bias))
    assert torch.equal(b.ln_1.weight, torch.ones_like(b.ln_1.weight))
    assert torch.equal(b.attn.proj.weight, init_rows(std, (32, 32), seed=11, name="blocks.0.attn.proj.weight"))
    assert torch.equal(model.wte.weight, init_rows(0.02, (256, 32), seed=11, name="wte.weight"))
    assert model.lm_head.weight is model.wte.weight
    with meta_device():
        meta = GPT(tiny_cfg)
    materialize(meta, torch.device("cpu"), seed=11)
    assert meta.lm_head.weight is meta.wte.weight  # tied again after to_empty
    for (name, a), (_, c) in zip(model.named_parameters(), meta.named_parameters()):
        assert torch.equal(a, c), name


def test_meta_device_skips_initialisers_of_meta_tensors_only():
    with meta_device():
        layer = torch.nn.Linear(8, 4)
        cpu = torch.zeros(3, 5, device="cpu")
        torch.nn.init.normal_(cpu, std=1.0)  # a real tensor is still initialised
    assert layer.weight.is_meta and layer.weight.shape == (4, 8)
    assert cpu.abs().sum() > 0


def test_loading_a_model_does_not_import_dynamo(tiny_cfg, tmp_path):
    """Inference start-up: the meta build must not run initialisers whose meta kernels import torch._dynamo."""
    from gptforge.tokenizer import train_char

    ckpt = save_checkpoint(tmp_path, step=1, cfg=Config(model=tiny_cfg), tokenizer=train_char(["ab"]),
                           model=GPT(tiny_cfg))
    code = "import sys, gptforge; gptforge.load(sys.argv[1]); print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _trained(tiny_cfg):
    model = GPT(tiny_cfg)
    optimizer = build_optimizer(model, Config().optim, "cpu")
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    optimizer.step()
    return model, optimizer


def test_sharded_checkpoint_round_trip_in_one_process(tiny_cfg, tmp_path, byte_tokenizer):
    from gptforge.tokenizer import train_char

    model, optimizer = _trained(tiny_cfg)
    cfg = Config(model=tiny_cfg)
    save_sharded(tmp_path, step=3, model=model, optimizer=optimizer, cfg=cfg, tokenizer=train_char(["ab"]),
                 trainer_state={"x": torch.arange(3)}, state={"tokens_seen": 9}, info=DistInfo()).finish(DistInfo())
    ckpt = find_checkpoint(tmp_path)
    state = verify_checkpoint(ckpt)
    assert checkpoint_format(ckpt) == "sharded" and state["world_size"] == 1 and state["tokens_seen"] == 9
    assert "lm_head.weight" not in json.dumps(sorted(state["files"]))
    fresh = GPT(tiny_cfg)
    fresh_opt = build_optimizer(fresh, cfg.optim, "cpu")
    load_model(fresh, ckpt, no_dist=True)
    load_optimizer(fresh, fresh_opt, ckpt)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(optimizer.state[a]["exp_avg_sq"], fresh_opt.state[b]["exp_avg_sq"]), name
    loaded = load_checkpoint(tmp_path)[0]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    wrong = GPT(ModelConfig(n_layer=2, n_head=2, d_model=48, vocab_size=256, context_length=16))
    with pytest.raises(GptforgeError, match=r"wte.weight has shape \(256, 32\), the model \(256, 48\)"):
        load_model(wrong, ckpt, no_dist=True)


def test_schema_1_consolidated_checkpoints_still_load_and_newer_are_refused(tiny_cfg, tmp_path):
    from gptforge.tokenizer import train_char

    model = GPT(tiny_cfg)
    ckpt = save_checkpoint(tmp_path, step=1, cfg=Config(model=tiny_cfg), tokenizer=train_char(["ab"]), model=model)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["schema_version"] == 2 and state["format"] == "consolidated"
    del state["format"]
    (ckpt / "state.json").write_text(json.dumps({**state, "schema_version": 1}))  # as gptforge wrote it before
    assert checkpoint_format(ckpt) == "consolidated"
    assert all(torch.equal(load_checkpoint(ckpt)[0].state_dict()[k], v) for k, v in model.state_dict().items())
    (ckpt / "state.json").write_text(json.dumps({**state, "schema_version": 3}))
    with pytest.raises(GptforgeError, match="checkpoint schema 3; this gptforge reads up to 2"):
        verify_checkpoint(ckpt)


def test_cpu_memory_plan_by_hand(tiny_cfg):
    """n_layer 2, n_head 2, d_model 32, vocab 256, context 16, micro-batch 4 (numbers as in test_plan.py)."""
    n, block, root = 34176, 12704, 8768
    fsdp = memory_per_rank(tiny_cfg, micro_batch_size=4, world_size=2, strategy="fsdp", device="cpu")
    assert (fsdp.weights_bytes, fsdp.grads_bytes, fsdp.optimizer_bytes) == (2 * n, 2 * n, 4 * n)
    assert fsdp.working_bytes == 4 * (2 * root + 5 * block) and fsdp.runtime_bytes == CPU_RUNTIME_BYTES
    # fp32 activations: per layer 2 x (32 s b h + 4 a s b) = 2 x (65536 + 512); output 8 s b h + 8 s b V
    assert fsdp.activations_bytes == 2 * 2 * (65536 + 512) + 8 * 64 * 32 + 8 * 64 * 256
    single = memory_per_rank(tiny_cfg, micro_batch_size=4, world_size=2, strategy="single", device="cpu")
    assert single.weights_bytes + single.grads_bytes + single.optimizer_bytes == 16 * n
    assert single.working_bytes == 4 * 256 * 32  # the tied embedding's second gradient, before accumulation
    with pytest.raises(GptforgeError, match="unknown device/strategy 'tpu'"):
        memory_per_rank(tiny_cfg, micro_batch_size=4, world_size=2, strategy="fsdp", device="tpu")
