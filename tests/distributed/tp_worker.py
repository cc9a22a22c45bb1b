"""Run under torchrun: tensor parallelism (2 ranks: tp 2; 4 ranks: FSDP2 over dp 2 x tp 2 on a 2-D mesh) against
one process. Rank 0 saves the losses of 3 AdamW steps and the first step's full gradients."""

import sys

import torch

from gptforge.config import load_config
from gptforge.data.batches import Batch
from gptforge.distributed.env import DistInfo, init_distributed, teardown
from gptforge.distributed.materialize import materialize
from gptforge.distributed.parallelize import apply_fsdp
from gptforge.distributed.tensor_parallel import apply_tensor_parallel
from gptforge.model.gpt import GPT
from gptforge.train.optim import build_optimizer
from gptforge.train.step import train_step


def config():
    return load_config(preset="debug", overrides=[("n_head", 4), ("d_model", 64), ("attention_pattern", "dense,local"),
                                                  ("local_window", 8), ("lr", 3e-3)])


def build(info: DistInfo, cfg) -> tuple[GPT, int, int]:
    """The model (meta device, tp over 2 ranks, FSDP2 over the rest), this rank's data-parallel rank and size."""
    if not info.distributed:
        model = GPT(cfg.model)
        model.init_weights(seed=7)
        return model, 0, 1
    from torch.distributed.device_mesh import init_device_mesh

    dp = info.world_size // 2
    mesh = init_device_mesh("cpu", (dp, 2), mesh_dim_names=("dp", "tp"))
    with torch.device("meta"):
        model = GPT(cfg.model)
    apply_tensor_parallel(model, mesh["tp"])
    if dp > 1:
        apply_fsdp(model, info, mesh=mesh["dp"])
    materialize(model, info.device, seed=7)
    return model, mesh["dp"].get_local_rank(), dp


def main(out: str) -> None:
    info = init_distributed(torch.device("cpu"))
    cfg = config()
    model, dp_rank, dp = build(info, cfg)
    grads: dict = {}
    def keep(p: torch.Tensor, name: str) -> None:  # each parameter's first gradient, before train_step drops it
        if name not in grads:
            grads[name] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()  # before clipping

    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: keep(p, name))
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    x = torch.randint(0, 256, (3, 4, 17), generator=torch.Generator().manual_seed(3))
    rows = slice(dp_rank * 4 // dp, (dp_rank + 1) * 4 // dp)  # tp ranks of one dp rank see the same rows
    losses = []
    for i in range(3):
        batch = Batch(x[i, rows, :-1], x[i, rows, 1:])
        # counts and sums are added over all ranks, tp replicas included, and scaled by the whole world size:
        # the replicas' factor 2 cancels, and FSDP's average over dp ranks gives the full batch's gradient
        losses.append(train_step(model, optimizer, [batch], grad_clip=1.0, dist_info=info).loss)
    if info.is_main_process:
        torch.save({"losses": losses, "grads": grads}, out)
    teardown(info)


if __name__ == "__main__":
    main(sys.argv[1])
