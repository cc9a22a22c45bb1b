"""Wrap a built GPT for training from the outside, in a fixed order: activation checkpointing, FSDP2 sharding
(both also on the meta device, before materialisation), then compile and DDP. The model code itself knows
nothing of any of this.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gptforge.distributed.env import DistInfo


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them (less memory,
    about one extra forward of compute). Parameter names are unchanged (the wrapper strips its prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_fsdp(model: nn.Module, info: DistInfo, param_dtype: torch.dtype = torch.float32, *, mesh=None) -> nn.Module:
    """Shard parameters, gradients and optimizer state over all ranks with FSDP2 (`fully_shard`): each block,
    then the root (embeddings, tied head, final norm). Modifies `model` in place and returns it.

    With a 16-bit `param_dtype`, FSDP gathers 16-bit copies for compute and reduces gradients in fp32
    (`MixedPrecisionPolicy`), keeping fp32 sharded master weights; this replaces autocast, which would keep a
    16-bit copy of every unsharded weight alive for the backward pass."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:  # all ranks; with tensor parallelism, the data-parallel dimension of a 2-D mesh instead
        mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def apply_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Replicate the model on every rank; gradients are averaged in the backward pass."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # gradient_as_bucket_view: gradients live in the all-reduce buckets, saving one gradient-sized copy
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def shard_model(model: nn.Module, info: DistInfo, *, data_parallel: str, activation_checkpointing: bool,
                param_dtype: torch.dtype = torch.float32) -> None:
    """The wrappers that change where parameters live, in place: tensor parallelism (`info.tensor_parallel` > 1,
    on the "tp" dimension of a (dp, tp) mesh), activation checkpointing, then FSDP2 sharding (under torchrun with
    data_parallel "fsdp"; over the "dp" dimension with tensor parallelism). Works on a model on the meta device,
    before materialisation."""
    mesh = None
    if info.tensor_parallel > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from gptforge.distributed.tensor_parallel import apply_tensor_parallel

        mesh = init_device_mesh(info.device.type, (info.dp_size, info.tensor_parallel), mesh_dim_names=("dp", "tp"))
        apply_tensor_parallel(model, mesh["tp"])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if info.dp_size > 1 and data_parallel == "fsdp":
        apply_fsdp(model, info, param_dtype, mesh=mesh["dp"] if mesh is not None else None)


def wrap_model(model: nn.Module, info: DistInfo, *, data_parallel: str, compile: bool) -> nn.Module:
    """The wrappers around a materialised model: torch.compile, then DDP (which broadcasts rank 0's weights).
    Returns the module to call in training steps."""
    train_model = torch.compile(model) if compile else model
    if info.distributed and data_parallel == "ddp" and info.tensor_parallel == 1:
        train_model = apply_ddp(train_model, info)
    return train_model


def parallelize(model: nn.Module, info: DistInfo, *, data_parallel: str, compile: bool,
                activation_checkpointing: bool, param_dtype: torch.dtype = torch.float32) -> nn.Module:
    """`shard_model` then `wrap_model` for a model that already has its weights. Returns the module to call in
    training steps; `model` stays the unwrapped one (for checkpoints)."""
    shard_model(model, info, data_parallel=data_parallel, activation_checkpointing=activation_checkpointing,
                param_dtype=param_dtype)
    return wrap_model(model, info, data_parallel=data_parallel, compile=compile)


def gradient_sync(model: nn.Module, enabled: bool):
    """Context for one micro-step: skip the gradient all-reduce unless `enabled` (the last micro-step), for
    DDP (`no_sync`) and FSDP2 (`set_requires_gradient_sync`); a no-op for a single process."""
    if hasattr(model, "no_sync"):
        return contextlib.nullcontext() if enabled else model.no_sync()
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
