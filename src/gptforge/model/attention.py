"""Causal multi-head self-attention, dense or locally banded (GPT-3, Brown et al. 2020, section 2.1).

Legend: B batch, T query tokens, S key tokens, D d_model, H n_head, Dh d_head = D / H.
Attention runs through `torch.nn.functional.scaled_dot_product_attention`, which picks the flash or
memory-efficient kernel on GPU and a fused kernel on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.config import ModelConfig
from gptforge.model.kv_cache import KVCache
from gptforge.model.linear import linear


def band_mask(n_tokens: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool: query i sees keys j with i - window < j <= i (the last `window` tokens, itself included)."""
    i = torch.arange(n_tokens, device=device)[:, None]
    j = torch.arange(n_tokens, device=device)[None, :]
    return (j <= i) & (j > i - window)


class CausalSelfAttention(nn.Module):
    """Fused QKV projection, SDPA, output projection. The band width is a forward argument, so layers
    that share weights (`shared_layer_group > 1`) may still differ in dense/banded pattern."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, *, window: int | None = None, layer: int = 0,
                kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). With `kv_cache`, keys/values of earlier tokens come from the cache and
        `attn_mask` is the cache's mask for this layer's band (None: attend to every cached key)."""
        B, T, D = x.shape
        qkv = linear(x, self.qkv).view(B, T, 3, self.n_head, self.d_head)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh), views (few ops per decoded token)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, H, S, Dh)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=attn_mask is None and T > 1)
        elif window is not None and window < T:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(T, window, x.device),
                                               dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, D); D/n under tensor parallelism (its heads)
        return linear(y, self.proj)
