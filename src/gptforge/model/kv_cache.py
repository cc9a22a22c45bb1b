"""Key/value cache for incremental decoding, with per-row left padding.

Legend: B batch rows, H heads, S cache capacity (slots, = context_length), Dh head size, T new tokens.
Rows of different prompt lengths are left-padded so that every row's newest token sits in the same slot;
`key_valid` marks real (non-padding) slots and `next_position` is each row's next position id, so learned
position embeddings see the same positions as an unpadded forward pass. Knows nothing about sampling.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values for every layer.

    Attributes:
        k, v: (n_layer, B, H, S, Dh) buffers, `dtype` on `device`.
        length: slots filled so far (the same for all rows), 0 <= length <= S.
        key_valid: (B, S) bool, False for left-padding slots.
        next_position: (B,) int64, position id of each row's next token.
    """

    def __init__(self, *, n_layer: int, batch_size: int, n_head: int, d_head: int, capacity: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layer, batch_size, n_head, capacity, d_head)
        # Uninitialised: a slot is always written before attention reads it (reads stop at `length`).
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.key_valid = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.padded = False

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self, pad_lengths: torch.Tensor | None = None) -> None:
        """Empty the cache; `pad_lengths` (B,) int64 gives the left padding of the prompts about to be prefilled."""
        self.length = 0
        self.key_valid.fill_(True)
        self.next_position.zero_()
        self.padded = pad_lengths is not None and bool((pad_lengths > 0).any())
        if self.padded:
            slots = torch.arange(self.capacity, device=self.key_valid.device)
            self.key_valid = slots[None, :] >= pad_lengths.to(self.key_valid.device)[:, None]
            self.next_position = -pad_lengths.to(self.next_position.device)

    def positions(self, n_new: int) -> torch.Tensor:
        """Position ids (B, n_new) int64 of the next `n_new` tokens (padding slots clamp to 0)."""
        if self.length + n_new > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} slots; cannot append {n_new} to {self.length}")
        steps = torch.arange(n_new, device=self.next_position.device)
        return (self.next_position[:, None] + steps[None, :]).clamp_min(0)

    def attn_mask(self, n_new: int, window: int | None) -> torch.Tensor | None:
        """Boolean mask (B, 1, n_new, length + n_new), True where a query may attend, or None when plain
        causal attention is exact (no padding, no band, and either one new token or an empty cache).

        Causal over slots, padding keys hidden (but a slot always sees itself, so a padding query row is
        never empty and never yields NaN), and for banded layers only the last `window` slots.
        """
        total = self.length + n_new
        banded = window is not None and window < total
        if not self.padded and not banded and (n_new == 1 or self.length == 0):
            return None
        device = self.key_valid.device
        q_slot = torch.arange(self.length, total, device=device)[:, None]
        k_slot = torch.arange(total, device=device)[None, :]
        allowed = k_slot <= q_slot
        if banded:
            allowed = allowed & (k_slot > q_slot - window)
        mask = allowed[None] & (self.key_valid[:, None, :total] | (k_slot == q_slot)[None])
        return mask[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (B, H, n_new, Dh) for `layer`; return all of them (B, H, length + n_new, Dh)."""
        n_new = k.shape[2]
        k_all, v_all = self.k[layer], self.v[layer]  # (B, H, S, Dh)
        k_all.narrow(2, self.length, n_new).copy_(k)
        v_all.narrow(2, self.length, n_new).copy_(v)
        return k_all.narrow(2, 0, self.length + n_new), v_all.narrow(2, 0, self.length + n_new)

    def advance(self, n_new: int) -> None:
        """Mark `n_new` slots as filled (called once per forward, after every layer has stored its keys)."""
        self.length += n_new
        self.next_position += n_new
