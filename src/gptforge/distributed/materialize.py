"""Give a model built on the meta device real storage on this rank's device, sharded or not, and fill it.

The model is built without storage (`torch.device("meta")`), wrapped (activation checkpointing, FSDP2 sharding),
then `materialize` allocates each rank's part (`to_empty`) and writes into it the values that part would hold
in an unsharded model: `GPT.init_weights`'s values for the model's own parameters (`init_rows`, a function of
(seed, parameter name, row) alone), and for modules a task added on the meta device (LoRA adapters, a head) the
values their `reset_parameters()` gives on a CPU replica under a seed derived from the module's name. So the same
seed gives bitwise the same weights at any world size, with or without FSDP. Weight files are read the same way,
row range by row range (`assign_rows`), so no rank ever holds more than its shard plus one block of rows.

Memory: filling draws at most one block of rows beyond this rank's shard per parameter (`INIT_BLOCK_ELEMENTS`,
4 MiB); a task-added module is built whole on the CPU once (adapters and heads are small). The alternative,
initialising the whole model on one rank and scattering it, needs 4 bytes per parameter on that rank (5.3 GB
for GPT-3 XL, 700 GB for 175B). Knows nothing of checkpoints or training.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from gptforge.errors import GptforgeError

WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")  # also in model/lora.py


def clean_name(name: str) -> str:
    """A parameter name without the segments wrappers insert (activation checkpointing, compile, DDP), i.e. the
    name in an unwrapped model and in checkpoints."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def clean_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """`named_parameters` (tied parameters once) under their clean names."""
    for name, p in model.named_parameters():
        yield clean_name(name), p


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_region(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(offset, shape) of this rank's part of `t` within the whole tensor: all of it for a plain tensor; None
    when the part is not one box of the whole (a placement other than plain Shard / Replicate)."""
    if not _is_dtensor(t):
        return (0,) * t.dim(), tuple(t.shape)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(type(p) not in (Shard, Replicate) for p in t.placements):
        return None  # e.g. FSDP2's strided sharding over tensor-parallel shards: no single box
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(offset), tuple(shape)


@torch.no_grad()
def assign_rows(t: torch.Tensor, rows: Callable[[int, int], torch.Tensor]) -> None:
    """Write into this rank's part of `t` (plain or DTensor) from `rows(start, stop)`, which returns rows
    [start, stop) along dim 0 of the whole tensor (all columns, any device, any float dtype)."""
    region = local_region(t)
    local = t.to_local() if _is_dtensor(t) else t
    if local.numel() == 0:
        return
    if region is None:  # take this rank's part out of the whole tensor (costs one whole tensor, transiently)
        from torch.distributed.tensor import distribute_tensor

        whole = rows(0, t.shape[0]).to(local.device, local.dtype).reshape(t.shape)
        local.copy_(distribute_tensor(whole, t.device_mesh, t.placements, src_data_rank=None).to_local())
        return
    offset, shape = region
    if t.dim() == 0:
        local.copy_(rows(0, 1).reshape(()))
        return
    block = rows(offset[0], offset[0] + shape[0])
    index = (slice(None), *(slice(o, o + s) for o, s in zip(offset[1:], shape[1:])))
    local.copy_(block[index])


def snapshot_added(model: nn.Module, before: set[str]) -> dict[str, tuple[nn.Module, list[str]]]:
    """Meta copies of the modules owning parameters that are not in `before` (added by a task's `setup_model`),
    taken before wrapping: {module name: (copy, [parameter names within it])}.

    Raises:
        GptforgeError: an owning module defines no `reset_parameters()` to initialise them with.
    """
    added: dict[str, tuple[nn.Module, list[str]]] = {}
    for name, _ in clean_named_parameters(model):
        if name in before:
            continue
        owner, _, local = name.rpartition(".")
        module = model.get_submodule(owner)
        if not callable(getattr(module, "reset_parameters", None)):
            raise GptforgeError(f"parameter {name} added by the task's setup_model cannot be initialised: its "
                                f"module ({type(module).__name__}) defines no reset_parameters()")
        added.setdefault(owner, (copy.deepcopy(module), []))[1].append(local)
    return added


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, *, seed: int | None,
                added: dict[str, tuple[nn.Module, list[str]]] | None = None) -> None:
    """Allocate `model`'s storage (this rank's shards) on `device` and, unless `seed` is None (weights will be
    loaded instead), initialise it: the model's own parameters by `model.init_std` / `init_rows`, parameters in
    `added` (from `snapshot_added`) by their module's `reset_parameters()` on a CPU replica seeded from (seed,
    module name).
    """
    from gptforge.model.gpt import _block_seed, init_rows

    model.to_empty(device=device)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    if seed is None:
        return
    added = added or {}
    added_names = {f"{owner}.{local}": (owner, local) for owner, (_, names) in added.items() for local in names}
    replicas: dict[str, nn.Module] = {}
    for owner, (replica, _) in added.items():
        replica.to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_block_seed(seed, owner, 0))
            replica.reset_parameters()
        replicas[owner] = replica
    for name, p in clean_named_parameters(model):
        if name in added_names:
            owner, local = added_names[name]
            value = replicas[owner].get_parameter(local).detach()
            assign_rows(p, lambda a, b, v=value: v[a:b])
        else:
            std, shape = model.init_std(name), tuple(p.shape)
            assign_rows(p, lambda a, b, s=std, sh=shape, n=name: init_rows(s, sh, seed=seed, name=n, start=a, stop=b))
