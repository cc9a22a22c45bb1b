"""AdamW with GPT-3's settings (Appendix B) and the weight-decay parameter groups."""

from __future__ import annotations

import torch
from torch import nn

from gptforge.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on every parameter with 2+ dims (weight matrices and embeddings), none on
    biases and LayerNorm gains/biases (1-dim). GPT-3 gives only "weight decay of 0.1" (Appendix B); sparing
    biases and norms follows GPT-2/nanoGPT practice, since decaying a LayerNorm gain towards 0 fights the
    normalisation rather than regularising."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW(betas=(beta1, beta2), eps, weight-decay groups) with the fused kernel on CPU and CUDA (one kernel
    per parameter instead of a dozen; about 5% faster steps on a 2-core CPU), foreach elsewhere (e.g. MPS)."""
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None, foreach=None if fused else True)
