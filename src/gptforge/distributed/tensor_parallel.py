"""Tensor parallelism for gptforge's blocks (Megatron-LM style, Shoeybi et al. 2019) over a 1-D `tp` mesh.

Legend: B batch, T tokens, D d_model, H n_head, Dh d_head, n tp ranks, r this rank.
Every tp rank sees the same tokens; each block's attention heads and MLP hidden units are split over the ranks:
  attn.qkv   weight Shard(1) (input features), bias Replicate. The fused weight's rows are [Q; K; V], so a row
             split (Megatron's column-parallel layer) would cut across q, k and v; instead every rank multiplies
             its slice of the input features, the (B, T, 3D) partial sums are all-reduced, and each rank keeps q,
             k and v of its own H/n heads (whole heads). This costs one (B, T, 3D) all-reduce per layer more than
             a head-interleaved layout would (docs/scale.md), but keeps checkpoints and names unchanged.
  attn.proj  weight Shard(1) (this rank's heads), bias Replicate: partial outputs all-reduced.
  mlp.fc     weight Shard(0), bias Shard(0): this rank's 4D/n hidden units (column-parallel).
  mlp.proj   weight Shard(1), bias Replicate: partial outputs all-reduced (row-parallel).
Embeddings, the tied head and the LayerNorms are replicated (Replicate DTensors), so every parameter is a
DTensor on the same mesh (gradient clipping, FSDP2 over a data-parallel mesh dimension and DCP checkpoints
then see one kind of parameter). Parameters are placed with `distribute_tensor(src_data_rank=None)`, so this
works on the meta device before materialisation. Forwards compute on local tensors through two autograd
functions: copy-to-tp (identity, gradient all-reduced) and reduce-from-tp (all-reduce, gradient identity).
Dropout must be 0 (replicated regions would draw different masks per rank). The model code is untouched
except that attention reshapes to (B, T, -1).
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gptforge.errors import GptforgeError


class _CopyToTP(torch.autograd.Function):
    """Identity forward; the gradient is summed over the tp ranks (each held one part of it)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Sum of the tp ranks' partial results forward; the (replicated) gradient passes through."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _local(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.to_local()


def _distribute(module: nn.Module, mesh, placements: dict[str, object]) -> None:
    from torch.distributed.tensor import distribute_tensor

    for name, placement in placements.items():
        p = getattr(module, name, None)
        if p is None:
            continue
        value = distribute_tensor(p.data, mesh, [placement], src_data_rank=None)
        module.register_parameter(name, nn.Parameter(value, requires_grad=p.requires_grad))


def _qkv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) replicated -> (B, T, 3 D/n): q, k, v of this rank's heads."""
    B, T, D = x.shape
    r, n, group = self.tp_rank, self.tp_size, self.tp_group
    cols = slice(r * D // n, (r + 1) * D // n)
    partial = F.linear(_CopyToTP.apply(x, group)[..., cols], self.weight.to_local())  # (B, T, 3D)
    full = _ReduceFromTP.apply(partial, group)
    if self.bias is not None:
        full = full + self.bias.to_local()
    full = _CopyToTP.apply(full, group)  # each rank's gradient covers its heads only: sum them
    heads = self.n_head // n
    mine = full.view(B, T, 3, self.n_head, D // self.n_head)[:, :, :, r * heads:(r + 1) * heads]  # (B, T, 3, H/n, Dh)
    return mine.reshape(B, T, 3 * D // n)


def _row_forward(self, x: torch.Tensor) -> torch.Tensor:
    """x (..., in/n) this rank's slice -> (..., out) replicated."""
    y = _ReduceFromTP.apply(F.linear(x, self.weight.to_local()), self.tp_group)
    return y if self.bias is None else y + self.bias.to_local()


def _column_forward(self, x: torch.Tensor) -> torch.Tensor:
    """x (..., in) replicated -> (..., out/n) this rank's slice."""
    return F.linear(_CopyToTP.apply(x, self.tp_group), self.weight.to_local(), _local(self.bias))


def _replicated_forward(self, x: torch.Tensor) -> torch.Tensor:
    if isinstance(self, nn.Embedding):
        return F.embedding(x, self.weight.to_local())
    if isinstance(self, nn.LayerNorm):
        return F.layer_norm(x, self.normalized_shape, _local(self.weight), _local(self.bias), self.eps)
    return F.linear(x, self.weight.to_local(), _local(self.bias))


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Split every block of a GPT over `tp_mesh` (a 1-D DeviceMesh) in place, as described above; call before
    activation checkpointing and FSDP2 (works on the meta device).

    Raises:
        GptforgeError: n_head not divisible by the tp size, or dropout > 0.
    """
    from torch.distributed.tensor import Replicate, Shard

    n, r, group = tp_mesh.size(), tp_mesh.get_local_rank(), tp_mesh.get_group()
    cfg = model.cfg
    if cfg.n_head % n:
        raise GptforgeError(f"tensor parallelism over {n} ranks needs n_head ({cfg.n_head}) divisible by {n}")
    if cfg.dropout > 0:
        raise GptforgeError(f"tensor parallelism needs model.dropout = 0 (got {cfg.dropout})")

    def split(module: nn.Module, placements: dict, forward) -> None:
        _distribute(module, tp_mesh, placements)
        module.tp_rank, module.tp_size, module.tp_group = r, n, group
        module.forward = types.MethodType(forward, module)

    for block in model.blocks:
        split(block.attn.qkv, {"weight": Shard(1), "bias": Replicate()}, _qkv_forward)
        block.attn.qkv.n_head = cfg.n_head
        block.attn.n_head = cfg.n_head // n  # the attention module now sees this rank's heads only
        split(block.attn.proj, {"weight": Shard(1), "bias": Replicate()}, _row_forward)
        split(block.mlp.fc, {"weight": Shard(0), "bias": Shard(0)}, _column_forward)
        split(block.mlp.proj, {"weight": Shard(1), "bias": Replicate()}, _row_forward)
        for norm in (block.ln_1, block.ln_2):
            split(norm, {"weight": Replicate(), "bias": Replicate()}, _replicated_forward)
    for module in (model.wte, model.wpe, model.ln_f):
        split(module, {"weight": Replicate(), "bias": Replicate()}, _replicated_forward)
    model.tie_weights()  # the head shares the (now distributed) embedding matrix
    split(model.lm_head, {}, _replicated_forward)
