"""Run under `torchrun --nproc_per_node 2`: DDP gradients for a global batch split over ranks (saved by rank 0)."""

import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from gptforge.config import ModelConfig
from gptforge.data.batches import Batch
from gptforge.distributed.env import init_distributed, teardown
from gptforge.model.gpt import GPT
from gptforge.train.step import compute_gradients


def global_batch(micro_steps: int):
    """Micro-batches of 4 sequences x 16 tokens per rank-slot: (2 ranks * micro_steps) of them, some targets ignored."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2 * micro_steps * 4, 16), generator=g)
    y = torch.randint(0, 256, (2 * micro_steps * 4, 16), generator=g)
    y[1, :9] = -100
    y[5, :] = -100
    return x, y


def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, vocab_size=256, context_length=16))


def main(out: str, micro_steps: int) -> None:
    info = init_distributed(torch.device("cpu"))
    x, y = global_batch(micro_steps)
    per_rank = x.shape[0] // info.world_size
    xs, ys = x[info.rank * per_rank:(info.rank + 1) * per_rank], y[info.rank * per_rank:(info.rank + 1) * per_rank]
    m = model()
    ddp = DistributedDataParallel(m)
    batches = [Batch(xs[i * 4:(i + 1) * 4], ys[i * 4:(i + 1) * 4]) for i in range(micro_steps)]
    loss = compute_gradients(ddp, batches, dist_info=info).loss
    if info.rank == 0:
        torch.save({"loss": loss, "grads": {k: p.grad for k, p in m.named_parameters()}}, out)
    teardown(info)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    # As gptforge's CLI does under torchrun: skip interpreter finalization, where gloo's threads can abort
    # a finished process (see gptforge.cli.main.main).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
