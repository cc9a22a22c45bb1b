import copy
import dataclasses

import torch

from gptforge.config import OptimConfig
from gptforge.data.batches import Batch
from gptforge.model.gpt import GPT, IGNORE_INDEX
from gptforge.model.loss import loss_sum
from gptforge.train.optim import build_optimizer
from gptforge.train.step import train_step


def _grads_after(model, batches):
    model.zero_grad()
    n = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
    for x, y in batches:
        (loss_sum(model(x), y) / n).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_grad_accumulation_equals_one_large_batch(tiny_cfg):
    model = GPT(tiny_cfg)
    x = torch.randint(0, 256, (8, 16))
    y = torch.randint(0, 256, (8, 16))
    y[1, :5] = IGNORE_INDEX  # uneven target counts per micro-batch: per-token normalisation must still agree
    y[6, :] = IGNORE_INDEX
    big = _grads_after(model, [(x, y)])
    accum = _grads_after(model, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)])
    for k in big:
        torch.testing.assert_close(accum[k], big[k], rtol=1e-5, atol=1e-7)
    # and the big-batch gradient is the gradient of the model's own mean loss
    model.zero_grad()
    model(x, y)[1].backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, big[k], rtol=1e-5, atol=1e-7)


def test_train_step_accumulated_equals_single_step(tiny_cfg):
    a = GPT(tiny_cfg)
    b = copy.deepcopy(a)
    x, y = torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16))
    cfg = OptimConfig(lr=1e-3)
    sa = train_step(a, build_optimizer(a, cfg, "cpu"), [Batch(x, y)], grad_clip=1.0)
    sb = train_step(b, build_optimizer(b, cfg, "cpu"), [Batch(x[:2], y[:2]), Batch(x[2:], y[2:])], grad_clip=1.0)
    assert abs(sa.loss - sb.loss) < 1e-5 and abs(sa.grad_norm - sb.grad_norm) < 1e-5
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_overfits_one_batch(tiny_cfg):
    model = GPT(dataclasses.replace(tiny_cfg, n_layer=2))
    opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0), "cpu")
    x = torch.randint(0, 256, (4, 16))
    y = torch.roll(x, -1, dims=1)
    losses = [train_step(model, opt, [Batch(x, y)], grad_clip=1.0).loss for _ in range(150)]
    assert losses[0] > 5.0 and losses[-1] < 0.1


def test_grad_clip_caps_the_update_norm(tiny_cfg):
    model = GPT(tiny_cfg)
    opt = build_optimizer(model, OptimConfig(lr=0.0), "cpu")
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    norm = train_step(model, opt, [Batch(x, y)], grad_clip=1e-3).grad_norm
    assert norm > 1e-3  # the reported norm is the pre-clip norm


def test_bf16_autocast_and_fp16_scaler_paths_train_on_cpu(tiny_cfg):
    """CPU twins of the CUDA mixed-precision paths: weights stay fp32, the loss falls."""
    from gptforge.train.step import autocast_context

    x = torch.randint(0, 256, (4, 16))
    y = torch.roll(x, -1, dims=1)
    for dtype in ("bfloat16", "float16"):
        torch.manual_seed(0)
        model = GPT(tiny_cfg)
        opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0), "cpu")
        scaler = torch.amp.GradScaler("cpu") if dtype == "float16" else None
        autocast = lambda d=dtype: autocast_context(torch.device("cpu"), d)  # noqa: E731
        stats = [train_step(model, opt, [Batch(x, y)], grad_clip=1.0, autocast=autocast, scaler=scaler) for _ in range(40)]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        finite = [s.loss for s in stats if s.skipped is None]
        assert finite[0] > 5.0 and finite[-1] < 3.0, (dtype, finite[::10])
