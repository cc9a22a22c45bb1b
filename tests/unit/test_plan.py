"""The sizing planner against GPT-3's Table D.1, a hand-checked memory case, and the `gptforge plan` CLI."""

import math

import pytest

from gptforge.cli.main import main
from gptforge.config import ModelConfig, load_config
from gptforge.errors import GptforgeError
from gptforge.model.gpt import count_parameters, flops_per_token
from gptforge.plan import (
    GIB,
    activation_bytes_per_layer,
    make_plan,
    memory_per_gpu,
    pf_days,
    table_d1_flops,
    training_flops,
)

# Brown et al. 2020, Table D.1: total training compute (FLOPs, PF-days) for 300B tokens.
TABLE_D1 = {
    "gpt3-small": (2.25e20, 2.60), "gpt3-medium": (6.41e20, 7.42), "gpt3-large": (1.37e21, 15.8),
    "gpt3-xl": (2.38e21, 27.5), "gpt3-2.7b": (4.77e21, 55.2), "gpt3-6.7b": (1.20e22, 139),
    "gpt3-13b": (2.31e22, 268), "gpt3-175b": (3.14e23, 3.64e3),
}


@pytest.mark.parametrize("preset", list(TABLE_D1))
def test_table_d1_convention_reproduces_the_paper(preset):
    """6 N tokens with N = count_parameters matches every row to 1% (the table's own rounding is ~0.5%)."""
    flops, days = TABLE_D1[preset]
    cfg = load_config(preset=preset).model
    ours = table_d1_flops(count_parameters(cfg), 300e9)
    assert ours == pytest.approx(flops, rel=0.01)
    assert pf_days(ours) == pytest.approx(days, rel=0.01)


def test_attention_term_is_small_at_175b_and_large_at_125m():
    """Our training FLOPs add attention (flops_per_token): +1.6% at 175B, about +16% for GPT-3 Small at
    context 2048 (12 d s is big next to 12 d^2 when d = 768), which is why Table D.1 is matched by 6N only."""
    big, small = load_config(preset="gpt3-175b").model, load_config(preset="gpt3-small").model
    assert training_flops(big, 300e9) == flops_per_token(big) * 300e9
    assert training_flops(big, 300e9) / 3.14e23 == pytest.approx(1.016, abs=0.005)
    assert training_flops(small, 300e9) / 2.25e20 == pytest.approx(1.16, abs=0.01)


def test_175b_example_plan():
    cfg = load_config(preset="gpt3-175b").model
    plan = make_plan(cfg, tokens=300e9, gpus=1024, peak_flops=312e12, mfu=0.4, micro_batch_size=1,
                     gpu_memory_gib=80)
    assert plan.wall_clock_s / 86400 == pytest.approx(plan.training_flops / (1024 * 312e12 * 0.4) / 86400)
    assert plan.wall_clock_s / 86400 == pytest.approx(28.9, abs=0.1)
    fits = {m.strategy: m.fits(80) for m in plan.memory}
    assert fits == {"ddp": False, "fsdp": False, "fsdp+ac": True}
    ddp = plan.memory[0]
    assert ddp.weights_bytes + ddp.grads_bytes + ddp.optimizer_bytes == 16 * plan.n_params


def test_korthikanti_formula_and_gptforge_adjustments():
    s, b, h, a = 2048, 1, 12288, 96
    paper = activation_bytes_per_layer(seq_len=s, micro_batch_size=b, d_model=h, n_head=a, flash=False,
                                       dropout=True, fp32_residual=False)
    assert paper == 34 * s * b * h + 5 * a * s * s * b
    ours = activation_bytes_per_layer(seq_len=s, micro_batch_size=b, d_model=h, n_head=a, fp32_residual=True)
    assert ours == 36 * s * b * h + 4 * a * s * b


def test_memory_hand_checked_tiny_model():
    """n_layer 2, n_head 2, d_model 32, vocab 256, context 16, micro-batch 4; every number by hand."""
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=256, context_length=16)
    # N = V D + T D + 2 x (12 D^2 + 2 D + 11 D) + 2 D = 8192 + 512 + 2 x 12704 + 64
    n, block, root = 34176, 12704, 8768
    assert count_parameters(cfg) == n
    ddp = memory_per_gpu(cfg, micro_batch_size=4, world_size=2, strategy="ddp")
    assert (ddp.weights_bytes, ddp.grads_bytes, ddp.optimizer_bytes, ddp.working_bytes) == (4 * n, 4 * n, 8 * n, 2 * n)
    # per layer 36 s b h + 4 a s b = 73728 + 512; output (4 + 2) s b h + 10 s b V = 12288 + 163840
    assert ddp.activations_bytes == 2 * (73728 + 512) + 12288 + 163840
    fsdp = memory_per_gpu(cfg, micro_batch_size=4, world_size=2, strategy="fsdp")
    assert (fsdp.weights_bytes, fsdp.grads_bytes, fsdp.optimizer_bytes) == (2 * n, 2 * n, 4 * n)
    assert fsdp.working_bytes == 2 * (root + 2 * block) + 2 * (root + block) + 4 * block
    # bf16 residual: per layer 32 s b h + 4 a s b = 65536 + 512; output 4 s b h + 10 s b V = 8192 + 163840
    assert fsdp.activations_bytes == 2 * (65536 + 512) + 8192 + 163840
    ac = memory_per_gpu(cfg, micro_batch_size=4, world_size=2, strategy="fsdp+ac")
    assert ac.activations_bytes == 2 * (2 * 16 * 4 * 32) + (65536 + 512) + 8192 + 163840
    assert ac.total_bytes < fsdp.total_bytes < ddp.total_bytes
    assert ac.fits(ac.total_bytes / GIB / 0.9 + 1e-9) and not ac.fits(ac.total_bytes / GIB / 0.9 * 0.99)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus=0), "--gpus"), (dict(mfu=1.5), "--mfu"), (dict(mfu=0.0), "--mfu"),
    (dict(tokens=math.nan), "--tokens"), (dict(peak_flops=-1.0), "--peak-tflops"),
    (dict(gpu_memory_gib=math.inf), "--gpu-memory-gb"),
])
def test_make_plan_rejects_bad_numbers(tiny_cfg, kwargs, message):
    args = dict(tokens=1e9, gpus=8, peak_flops=1e14, mfu=0.4, micro_batch_size=1, gpu_memory_gib=80) | kwargs
    with pytest.raises(GptforgeError, match=message):
        make_plan(tiny_cfg, **args)
    with pytest.raises(GptforgeError, match="strategy"):
        memory_per_gpu(tiny_cfg, micro_batch_size=1, world_size=1, strategy="zero3")


def test_cli_plan_output(capsys):
    rc = main(["plan", "--preset", "gpt3-175b", "--gpus", "1024", "--peak-tflops", "312", "--mfu", "0.4",
               "--tokens", "300e9"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "174.60B" in out and "3,638 PF-days" in out and "3.14e+23" in out and "28.9 days" in out
    assert "FSDP + act. ckpt" in out and out.count(" no\n") == 2


def test_cli_plan_gpu_table_overrides_and_default_tokens(capsys):
    rc = main(["plan", "--preset", "gpt3-6.7b", "--gpu", "h200", "--peak_tflops", "989", "--micro_batch_size", "2",
               "--context_length=1024"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "micro-batch 2 x 1024 tokens" in out and "of 141 GiB" in out and "context 1024" in out
    assert "training tokens   300.00B" in out  # max_steps x global batch of the preset
    assert main(["plan", "--preset", "gpt3-small", "--gpu", "H100"]) == 0
    assert "H100 SXM datasheet" in capsys.readouterr().out


def test_cli_plan_without_a_gpu_prints_compute_and_memory(capsys):
    """Compute and memory do not depend on the GPU: no peak means no days, not an error."""
    assert main(["plan", "--preset", "gpt3-175b", "--tokens", "300e9", "--gpus", "1024"]) == 0
    out = capsys.readouterr().out
    assert "174.60B" in out and "3,638 PF-days" in out and "FSDP + act. ckpt" in out
    assert "wall clock        unknown: give --gpu NAME or --peak-tflops X" in out and "hours)" not in out


@pytest.mark.parametrize("argv", [
    ["--preset", "gpt3-huge", "--gpu", "h100"], ["--preset", "gpt3-small", "--gpus", "many", "--gpu", "h100"],
    ["--preset", "gpt3-small", "--gpus", "2.5", "--gpu", "h100"], ["--preset", "gpt3-small", "--mfu", "0"],
    ["--preset", "gpt3-small", "--gpu", "tpu-v4"], ["--preset", "gpt3-small", "--peak-tflops", "-3"],
    ["--preset", "gpt3-small", "--gpu", "h100", "--tokens", "-5"], ["--gpu", "h100"],
    ["--preset", "gpt3-small", "--gpu", "h100", "--n_layr", "3"],
])
def test_cli_plan_errors_are_one_line(capsys, argv):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def _saved_bytes(model, tokens, *, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters themselves excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(tokens, tokens)
    return sum(n for ptr, n in saved.items() if ptr not in params)


@pytest.mark.parametrize("autocast", [True, False])
def test_per_layer_activations_match_what_autograd_saves(autocast):
    """One more layer adds what `activation_bytes_per_layer` predicts, within 2%: 36 s b h + 4 a s b under
    bf16 autocast (plus that layer's bf16 weight copies, 2 x 12 h^2), 32 s b h + 4 a s b for a bf16 model
    (FSDP's MixedPrecisionPolicy). Needs SDPA's fused CPU kernel (it saves a log-sum-exp, no s x s tensor)."""
    import torch

    from gptforge.model.gpt import GPT

    s, b, h, a = 256, 2, 128, 4
    tokens = torch.randint(0, 512, (b, s))
    sizes = []
    for n_layer in (1, 2):
        model = GPT(ModelConfig(n_layer=n_layer, n_head=a, d_model=h, vocab_size=512, context_length=s))
        sizes.append(_saved_bytes(model if autocast else model.to(torch.bfloat16), tokens, autocast=autocast))
    measured = sizes[1] - sizes[0] - (2 * 12 * h * h if autocast else 0)
    predicted = activation_bytes_per_layer(seq_len=s, micro_batch_size=b, d_model=h, n_head=a,
                                           fp32_residual=autocast)
    assert measured == pytest.approx(predicted, rel=0.02)
