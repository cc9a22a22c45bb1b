"""Batched log-likelihood scoring of continuations, the context of an item shared by all its choices.

Legend: B rows in a batch, T packed positions, D d_model, H n_head, Dh d_head, V vocab_size.
A `Group` is one context and the continuations scored after it (the choices of one item). Its row packs the
context once, then each continuation's tokens but the last, with position ids restarting after the context
for every continuation, and an attention mask letting a continuation token see the context and the earlier
tokens of its own continuation only (and, for banded layers, only keys within the band by position id). So
each continuation is scored exactly as in its own `context + continuation` forward pass, while the context is
computed once instead of once per choice. Only the positions that predict a continuation token go through
the output head (the one scoring function is `model.loss.continuation_scores`).

Rows are sorted by packed length (longest first) and right-padded; padding positions attend only to
themselves, and nothing about a row depends on its batch neighbours beyond floating-point summation order
(tested: scores agree within 1e-5 whatever the batch size). `packed_hidden` re-runs the blocks of
`model.gpt.GPT` with that mask: it reads the model's modules (wte, wpe, blocks' ln_1/attn/ln_2/mlp, ln_f) and
must follow `GPT.hidden` (a parity test compares them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptforge.model.loss import continuation_scores


@dataclass(frozen=True)
class Group:
    """One context (>= 1 token ids) and the continuations (each >= 1 token ids) scored after it. The caller
    makes `len(context) + len(c) - 1 <= context_length` hold for every continuation c."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def packed_length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def packed_hidden(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                  allowed: torch.Tensor) -> torch.Tensor:
    """The GPT trunk with explicit position ids and attention mask (eval mode: no dropout).

    Args:
        model: a `gptforge.model.gpt.GPT`.
        tokens: (B, T) int64 token ids.
        positions: (B, T) int64 position ids (< context_length).
        allowed: (B, T, T) bool, True where query t may attend to key s (causality included); banded layers
            further restrict it to keys within their window by position id.

    Returns:
        hidden (B, T, D) after the final LayerNorm, as `GPT.hidden` would give for each unpacked sequence.
    """
    B, T = tokens.shape
    x = model.wte(tokens) + model.wpe(positions)  # (B, T, D)
    masks: dict[int | None, torch.Tensor] = {}
    for window in set(model.windows):
        band = allowed
        if window is not None:
            band = allowed & (positions[:, None, :] > positions[:, :, None] - window)
        masks[window] = band[:, None]  # (B, 1, T, T)
    group = model.cfg.shared_layer_group
    for i, window in enumerate(model.windows):
        block = model.blocks[i // group]
        attn = block.attn
        qkv = attn.qkv(block.ln_1(x)).view(B, T, 3, attn.n_head, attn.d_head)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[window])  # (B, H, T, Dh)
        x = x + attn.proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)
        x = x + block.mlp(block.ln_2(x))
    return model.ln_f(x)


def _batch_tensors(groups: Sequence[Group], device: torch.device):
    """Pack groups into padded (B, T) tokens/positions, the (B, T, T) attention mask and the flat scored
    positions with their targets and continuation index."""
    T = max(g.packed_length for g in groups)
    tokens, positions, segments = [], [], []  # segments: -1 padding, 0 context, i+1 choice i
    gather, targets, owner = [], [], []
    n_conts = 0
    for b, g in enumerate(groups):
        n_ctx = len(g.context)
        row, pos, seg = list(g.context), list(range(n_ctx)), [0] * n_ctx
        for i, cont in enumerate(g.continuations):
            body = cont[:-1]
            gather += [b * T + n_ctx - 1] + [b * T + p for p in range(len(row), len(row) + len(body))]
            row += body
            pos += range(n_ctx, n_ctx + len(body))
            seg += [i + 1] * len(body)
            targets += cont
            owner += [n_conts] * len(cont)
            n_conts += 1
        pad = T - len(row)
        tokens.append(row + [0] * pad)
        positions.append(pos + [0] * pad)
        segments.append(seg + [-1] * pad)
    positions_t, segments_t = torch.tensor(positions), torch.tensor(segments)
    seg_q, seg_k = segments_t[:, :, None], segments_t[:, None, :]
    allowed = (positions_t[:, None, :] <= positions_t[:, :, None]) & ((seg_k == 0) | (seg_k == seg_q)) & (seg_k >= 0)
    allowed |= torch.eye(T, dtype=torch.bool)[None]  # padding rows see themselves (no empty softmax)
    to = {"device": device}
    return (torch.tensor(tokens, **to), positions_t.to(**to), allowed.to(**to), torch.tensor(gather, **to),
            torch.tensor(targets, **to), torch.tensor(owner, **to), n_conts)


def batches(groups: Sequence[Group], batch_size: int) -> list[list[int]]:
    """Group indices, longest packed row first, cut into batches of about `batch_size` continuations (a batch
    holds whole groups, at least one)."""
    order = sorted(range(len(groups)), key=lambda i: (-groups[i].packed_length, i))
    out, current, count = [], [], 0
    for i in order:
        if current and count + len(groups[i].continuations) > batch_size:
            out.append(current)
            current, count = [], 0
        current.append(i)
        count += len(groups[i].continuations)
    if current:
        out.append(current)
    return out


@torch.no_grad()
def score_groups(model: torch.nn.Module, groups: Sequence[Group], *, batch_size: int = 32,
                 progress: Callable[[int], None] | None = None) -> list[list[tuple[float, bool]]]:
    """Log-likelihood of every continuation of every group.

    Args:
        model: a GPT in eval mode.
        groups: the groups; contexts and continuations non-empty, each `context + continuation` (minus its
            last token) within the model's context_length.
        batch_size: continuations per forward pass (whole groups are kept together).
        progress: called with the number of groups finished after each batch.

    Returns:
        For each group, per continuation: (log-likelihood in nats (float), whether every token is the greedy
        arg-max choice).
    """
    device = next(model.parameters()).device
    results: list[list[tuple[float, bool]]] = [[] for _ in groups]
    for idx in batches(groups, batch_size):
        batch = [groups[i] for i in idx]
        tokens, positions, allowed, gather, targets, owner, n_conts = _batch_tensors(batch, device)
        hidden = packed_hidden(model, tokens, positions, allowed)  # (B, T, D)
        picked = hidden.reshape(-1, hidden.shape[-1])[gather]  # (N, D)
        totals, greedy = continuation_scores(model.lm_head(picked), targets, owner, n_conts)
        flat = list(zip(totals.tolist(), greedy.tolist()))
        k = 0
        for i, g in zip(idx, batch):
            results[i] = flat[k:k + len(g.continuations)]
            k += len(g.continuations)
        if progress is not None:
            progress(len(batch))
    return results
