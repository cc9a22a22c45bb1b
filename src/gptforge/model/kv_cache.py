"""Key/value cache for incremental decoding, with a length of its own for every row.

Legend: B rows (sequences), H heads, S slots per row (the cache's `capacity`), Dh head size, T new tokens,
L slots read by attention. Row b's slot i holds the keys and values of its token at position i, so position
ids are slot indices and no row is ever padded on the left. A forward pass covers a *selection* of rows
(all of them unless `select` names some): each selected row appends `takes[b]` real tokens (<= T, the rest
of its T inputs are right padding, and `takes[b]` may be 0 for a row that only rides along); padding writes
go to a scratch slot past the last one and are never read by a real token. The mask hides from each real
query every slot after its own and, for banded layers, every slot more than `window` back. Every slot starts
at zero, so a masked slot is always finite (a NaN there would leak through attention's zero weights).
Knows nothing about sampling or scheduling.
"""

from __future__ import annotations

import torch

from gptforge.errors import GptforgeError


class KVCache:
    """Preallocated keys and values for every layer, with per-row lengths.

    Attributes:
        k, v: (n_layer, B, H, S + 1, Dh) buffers, `dtype` on `device`; slot S is the scratch slot.
        capacity: S, the slots a row can hold (tokens).
        row_lengths: slots filled in each row (B ints, 0 <= length <= S).
    """

    def __init__(self, *, n_layer: int, batch_size: int, n_head: int, d_head: int, capacity: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layer, batch_size, n_head, capacity + 1, d_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity, self.device = capacity, self.k.device
        self.row_lengths = [0] * batch_size
        self.select()

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        """The longest selected row's filled slots (for a single row or equal rows: their length)."""
        return max(self._sel_lengths)

    def select(self, rows: list[int] | None = None, takes: list[int] | None = None) -> None:
        """Choose the rows the next forward pass covers (in that order; None: all rows) and how many of its
        T new tokens are real in each (None: all T). Reset to all rows by `advance`."""
        self._rows = list(range(self.batch_size)) if rows is None else list(rows)
        self._takes = takes
        self._sel_lengths = [self.row_lengths[r] for r in self._rows]
        first = self._rows[0] if self._rows else 0
        self._contiguous = self._rows == list(range(first, first + len(self._rows)))
        self._plans: dict[int, tuple[list[int], bool, int, torch.Tensor]] = {}

    def reset_rows(self, rows: list[int]) -> None:
        """Empty the given rows (their old slots stay finite and are overwritten before being read)."""
        for r in rows:
            self.row_lengths[r] = 0
        self.select()

    def copy_rows(self, src: KVCache, src_rows: list[int], dst_rows: list[int]) -> None:
        """Copy rows of `src` (this cache or another) into rows `dst_rows` of this one, with their lengths
        (the engine moves rows to keep them contiguous, and copies them into a grown cache)."""
        for a, b in zip(src_rows, dst_rows):
            n = src.row_lengths[a]
            self.k[:, b, :, :n].copy_(src.k[:, a, :, :n])
            self.v[:, b, :, :n].copy_(src.v[:, a, :, :n])
            self.row_lengths[b] = n
        self.select()

    def _plan(self, n_new: int) -> tuple[list[int], bool, int, torch.Tensor]:
        """(takes, uniform, L, start (B_sel, 1) int64) for a forward of n_new tokens, computed once: `uniform`
        when all selected rows append all n_new tokens at the same length (no padding, no per-row offsets)."""
        if n_new not in self._plans:
            takes = [n_new] * len(self._rows) if self._takes is None else list(self._takes)
            uniform = all(t == n_new for t in takes) and min(self._sel_lengths) == max(self._sel_lengths)
            n_read = max(1, max(have + take for have, take in zip(self._sel_lengths, takes)))
            start = torch.tensor(self._sel_lengths, device=self.device)[:, None]
            self._plans[n_new] = (takes, uniform, n_read, start)
        return self._plans[n_new]

    def positions(self, n_new: int) -> torch.Tensor:
        """Position ids (B_sel, n_new) int64 of the next tokens of the selected rows (padding clamps to S - 1).

        Raises:
            GptforgeError: a row's real new tokens do not fit in its free slots.
        """
        takes, _, _, start = self._plan(n_new)
        for r, have, take in zip(self._rows, self._sel_lengths, takes):
            if have + take > self.capacity:
                raise GptforgeError(f"KV cache row {r} has {self.capacity - have} free slots, got {take} tokens")
        return (start + torch.arange(n_new, device=self.device)[None, :]).clamp_max(self.capacity - 1)

    def attn_mask(self, n_new: int, window: int | None) -> torch.Tensor | None:
        """Boolean mask (B_sel, 1, n_new, L), True where a query may attend, or None when plain causal
        attention is exact (uniform rows, no band, and one new token or an empty cache).

        Query t of row b (slot length_b + t) sees slots j <= that slot, and for a banded layer only
        j > slot - window. Padding queries act as the row's last real one, so no query row is ever empty.
        """
        takes, uniform, n_read, start = self._plan(n_new)
        banded = window is not None and window < n_read
        if uniform and not banded and (n_new == 1 or self._sel_lengths[0] == 0):
            return None
        last = start + torch.tensor(takes, device=self.device)[:, None] - 1
        q_slot = torch.minimum(start + torch.arange(n_new, device=self.device)[None, :], last).clamp_min(0)
        k_slot = torch.arange(n_read, device=self.device)
        allowed = k_slot[None, None, :] <= q_slot[:, :, None]  # (B_sel, T, L)
        if banded:
            allowed &= k_slot[None, None, :] > q_slot[:, :, None] - window
        return allowed[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (B_sel, H, n_new, Dh) for `layer`; return every selected row's keys and
        values so far, (B_sel, H, L, Dh) with L the longest selected row after this step."""
        n_new, first, B = k.shape[2], self._rows[0], len(self._rows)
        k_all, v_all = self.k[layer], self.v[layer]  # (B, H, S + 1, Dh)
        takes, uniform, n_read, start = self._plan(n_new)
        if self._contiguous and uniform:
            k_all.narrow(0, first, B).narrow(2, self._sel_lengths[0], n_new).copy_(k)
            v_all.narrow(0, first, B).narrow(2, self._sel_lengths[0], n_new).copy_(v)
        else:  # real tokens at length + t, padding into the scratch slot S
            steps = torch.arange(n_new, device=self.device)[None, :]
            real = steps < torch.tensor(takes, device=self.device)[:, None]
            slots = torch.where(real, start + steps, torch.full_like(start, self.capacity))  # (B_sel, T)
            rows = torch.tensor(self._rows, device=self.device)[:, None]
            k_all[rows, :, slots] = k.transpose(1, 2)  # value (B_sel, T, H, Dh)
            v_all[rows, :, slots] = v.transpose(1, 2)
        if self._contiguous:
            return k_all.narrow(0, first, B).narrow(2, 0, n_read), v_all.narrow(0, first, B).narrow(2, 0, n_read)
        rows = torch.tensor(self._rows, device=self.device)
        return k_all.narrow(2, 0, n_read).index_select(0, rows), v_all.narrow(2, 0, n_read).index_select(0, rows)

    def advance(self, n_new: int) -> None:
        """Mark each selected row's real new tokens as filled (called once per forward, after every layer
        has stored its keys), then select all rows again."""
        for r, take in zip(self._rows, self._plan(n_new)[0]):
            self.row_lengths[r] += take
        self.select()
