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
        lengths: (B,) int64 on `device`, slots filled in each row (0 <= length <= S); `row_lengths` mirrors
            it as a Python list.
    """

    def __init__(self, *, n_layer: int, batch_size: int, n_head: int, d_head: int, capacity: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layer, batch_size, n_head, capacity + 1, d_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
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
        self._rows_t: torch.Tensor | None = None
        self._plan_cache: tuple[int, tuple[list[int], bool, int]] | None = None
        self._slots_cache: tuple[int, torch.Tensor] | None = None

    def reset_rows(self, rows: list[int]) -> None:
        """Empty the given rows (their old slots stay finite and are overwritten before being read)."""
        for r in rows:
            self.row_lengths[r] = 0
        self.lengths[torch.tensor(rows, dtype=torch.long)] = 0
        self.select()

    def copy_row(self, src: int, dst: int) -> None:
        """Move row `src`'s filled slots into row `dst` (the engine keeps its running rows contiguous)."""
        n = self.row_lengths[src]
        self.k[:, dst, :, :n].copy_(self.k[:, src, :, :n])
        self.v[:, dst, :, :n].copy_(self.v[:, src, :, :n])
        self.row_lengths[dst] = n
        self.lengths[dst] = n
        self.select()

    def copy_from(self, other: KVCache, rows: int) -> None:
        """Copy the first `rows` rows of a smaller cache into this one (when the engine grows its cache)."""
        n = max(other.row_lengths[:rows], default=0)
        self.k[:, :rows, :, :n].copy_(other.k[:, :rows, :, :n])
        self.v[:, :rows, :, :n].copy_(other.v[:, :rows, :, :n])
        self.row_lengths[:rows] = other.row_lengths[:rows]
        self.lengths[:rows] = other.lengths[:rows]
        self.select()

    def _plan(self, n_new: int) -> tuple[list[int], bool, int]:
        """(takes, uniform, L) for a forward of n_new tokens, computed once per forward: `uniform` when all
        selected rows append all n_new tokens at the same length (no padding, no per-row offsets)."""
        if self._plan_cache is None or self._plan_cache[0] != n_new:
            takes = [n_new] * len(self._rows) if self._takes is None else list(self._takes)
            uniform = all(t == n_new for t in takes) and min(self._sel_lengths) == max(self._sel_lengths)
            n_read = max(1, max(have + take for have, take in zip(self._sel_lengths, takes)))
            self._plan_cache = (n_new, (takes, uniform, n_read))
        return self._plan_cache[1]

    def _index(self) -> torch.Tensor:
        if self._rows_t is None:
            self._rows_t = torch.tensor(self._rows, dtype=torch.long, device=self.lengths.device)
        return self._rows_t

    def positions(self, n_new: int) -> torch.Tensor:
        """Position ids (B_sel, n_new) int64 of the next tokens of the selected rows (padding clamps to S - 1).

        Raises:
            GptforgeError: a row's real new tokens do not fit in its free slots.
        """
        takes, _, _ = self._plan(n_new)
        for r, have, take in zip(self._rows, self._sel_lengths, takes):
            if have + take > self.capacity:
                raise GptforgeError(f"KV cache row {r} has {self.capacity - have} free slots, got {take} tokens")
        steps = torch.arange(n_new, device=self.lengths.device)
        if self._contiguous:
            start = self.lengths[self._rows[0]:self._rows[0] + len(self._rows)]
        else:
            start = self.lengths[self._index()]
        return (start[:, None] + steps[None, :]).clamp_max(self.capacity - 1)

    def attn_mask(self, n_new: int, window: int | None) -> torch.Tensor | None:
        """Boolean mask (B_sel, 1, n_new, L), True where a query may attend, or None when plain causal
        attention is exact (uniform rows, no band, and one new token or an empty cache).

        Query t of row b (slot length_b + t) sees slots j <= that slot, and for a banded layer only
        j > slot - window. Padding queries act as the row's last real one, so no query row is ever empty.
        """
        takes, uniform, n_read = self._plan(n_new)
        banded = window is not None and window < n_read
        if uniform and not banded and (n_new == 1 or self._sel_lengths[0] == 0):
            return None
        device = self.lengths.device
        lengths = torch.tensor(self._sel_lengths, device=device)[:, None]  # (B_sel, 1)
        last = lengths + torch.tensor(takes, device=device)[:, None] - 1
        q_slot = torch.minimum(lengths + torch.arange(n_new, device=device)[None, :], last).clamp_min(0)
        k_slot = torch.arange(n_read, device=device)
        allowed = k_slot[None, None, :] <= q_slot[:, :, None]  # (B_sel, T, L)
        if banded:
            allowed &= k_slot[None, None, :] > q_slot[:, :, None] - window
        return allowed[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (B_sel, H, n_new, Dh) for `layer`; return every selected row's keys and
        values so far, (B_sel, H, L, Dh) with L the longest selected row after this step."""
        n_new = k.shape[2]
        k_all, v_all = self.k[layer], self.v[layer]  # (B, H, S + 1, Dh)
        first = self._rows[0]
        _, uniform, n_read = self._plan(n_new)
        if self._contiguous and uniform:
            start = self._sel_lengths[0]
            k_all.narrow(0, first, len(self._rows)).narrow(2, start, n_new).copy_(k)
            v_all.narrow(0, first, len(self._rows)).narrow(2, start, n_new).copy_(v)
        else:
            slots = self._write_slots(n_new)  # (B_sel, T)
            rows = self._index()[:, None]
            k_all[rows, :, slots] = k.transpose(1, 2)  # value (B_sel, T, H, Dh)
            v_all[rows, :, slots] = v.transpose(1, 2)
        if self._contiguous:
            return (k_all.narrow(0, first, len(self._rows)).narrow(2, 0, n_read),
                    v_all.narrow(0, first, len(self._rows)).narrow(2, 0, n_read))
        return k_all.narrow(2, 0, n_read).index_select(0, self._index()), \
            v_all.narrow(2, 0, n_read).index_select(0, self._index())

    def _write_slots(self, n_new: int) -> torch.Tensor:
        """(B_sel, T) int64 slot of every new token: length + t for real ones, the scratch slot for padding."""
        if self._slots_cache is not None and self._slots_cache[0] == n_new:
            return self._slots_cache[1]
        device = self.lengths.device
        lengths = torch.tensor(self._sel_lengths, device=device)[:, None]
        steps = torch.arange(n_new, device=device)[None, :]
        real = steps < torch.tensor(self._plan(n_new)[0], device=device)[:, None]
        slots = torch.where(real, lengths + steps, torch.full_like(lengths, self.capacity))
        self._slots_cache = (n_new, slots)
        return slots

    def advance(self, n_new: int) -> None:
        """Mark each selected row's real new tokens as filled (called once per forward, after every layer
        has stored its keys), then select all rows again."""
        takes, _, _ = self._plan(n_new)
        for r, take in zip(self._rows, takes):
            self.row_lengths[r] += take
        if self._contiguous:
            first = self._rows[0] if self._rows else 0
            if self._takes is None:
                self.lengths[first:first + len(self._rows)] += n_new
            else:
                self.lengths[first:first + len(self._rows)] += torch.tensor(takes, device=self.lengths.device)
        else:
            self.lengths.index_add_(0, self._index(), torch.tensor(takes, device=self.lengths.device))
        self.select()
