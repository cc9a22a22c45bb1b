"""Tokenized fine-tuning examples as training micro-batches (an epoch-shuffled `BatchSource`) and validation sets.

Legend: B micro_batch_size (examples), T context_length, W world_size. An example is one row: input tokens, their
next-token targets (IGNORE_INDEX where nothing is scored) and, for classification, a label. Rows are never packed
together (each row holds one example, so no example can attend to another); a micro-batch is right-padded with
end-of-text ids to its longest row, padding targets IGNORE_INDEX. Every epoch visits the examples in a fresh
order, a permutation drawn from (seed, epoch) alone; global micro-step j takes the next B*W examples of that order
and rank r the r-th B of them, so the global batch is the same at any world size and the state needed to resume
exactly is two integers (epoch, position). Knows nothing of models or of the training loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gptforge.data.batches import Batch, pad_rows, shard_for_rank
from gptforge.model.loss import IGNORE_INDEX


@dataclass
class Row:
    """One example: `tokens` (the model's input), `targets` (same length; next-token ids or IGNORE_INDEX) and,
    for classification, `label` (class id)."""

    tokens: list[int]
    targets: list[int]
    label: int | None = None


def sft_row(ids: list[int], scored: list[bool], context_length: int) -> tuple[Row, bool]:
    """An SFT row from an example's ids and per-id scored flags (`formats.tokenize_sft`), at most T inputs long.

    An example longer than T + 1 ids loses the start of its prompt first (keeping the prompt's end and the
    completion's start), then the end of its completion. Returns (row, whether it was truncated).
    """
    overflow = len(ids) - (context_length + 1)
    truncated = overflow > 0
    if truncated:
        n_prompt = next((i for i, s in enumerate(scored) if s), len(ids))
        cut = min(overflow, max(n_prompt - 1, 0))  # keep one prompt token to predict the first completion token
        ids, scored = ids[cut:][:context_length + 1], scored[cut:][:context_length + 1]
    targets = [t if s else IGNORE_INDEX for t, s in zip(ids[1:], scored[1:])]
    return Row(ids[:-1], targets), truncated


def classification_row(ids: list[int], label: int, context_length: int, *, lm_targets: bool) -> tuple[Row, bool]:
    """A classification row: the text's first T tokens, its label and (with `lm_targets`) next-token targets
    for the auxiliary LM loss (IGNORE_INDEX otherwise). Returns (row, whether it was truncated)."""
    truncated = len(ids) > context_length
    ids = ids[:context_length]
    targets = (ids[1:] if lm_targets else [IGNORE_INDEX] * (len(ids) - 1)) + [IGNORE_INDEX]
    return Row(ids, targets, label), truncated


def collate(rows: list[Row], *, pad_id: int, n_rows: int | None = None, labeled: bool = False) -> Batch:
    """Right-pad rows to the longest into a Batch (with `labels` when `labeled`); with `n_rows`, add empty rows
    (one pad token, nothing scored, label IGNORE_INDEX) up to that many, so that every rank runs a forward."""
    rows = list(rows)
    while n_rows is not None and len(rows) < n_rows:
        rows.append(Row([pad_id], [IGNORE_INDEX], IGNORE_INDEX if labeled else None))
    width = max(len(r.tokens) for r in rows)
    batch = pad_rows([r.tokens for r in rows], [r.targets for r in rows], width, pad_id=pad_id)
    if labeled:
        batch.labels = torch.tensor([r.label for r in rows], dtype=torch.long)
    return batch


class ExampleSource:
    """Training micro-batches of fine-tuning rows, shuffled per epoch (a `BatchSource`; see the module docstring).

    Args:
        rows: every training example (the same list on every rank).
        micro_batch_size: B examples per micro-batch on this rank.
        seed: fixes every epoch's order.
        pad_id: the token id put in padding positions (end-of-text).
    """

    def __init__(self, rows: list[Row], *, micro_batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.rows, self.B, self.seed, self.pad_id = rows, micro_batch_size, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.rows), generator=g).tolist()
        return self._order

    def _take(self, n: int) -> list[int]:
        """The next n indices of the global order, crossing into the next epoch when one ends."""
        out = []
        while len(out) < n:
            order = self._epoch_order()
            k = min(n - len(out), len(order) - self.position)
            out += order[self.position:self.position + k]
            self.position += k
            if self.position == len(order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return out

    def next_batch(self) -> Batch:
        """This rank's B rows of the next global micro-step, right-padded; int64 on CPU."""
        indices = self._take(self.B * self.world_size)[self.rank * self.B:(self.rank + 1) * self.B]
        return collate([self.rows[i] for i in indices], pad_id=self.pad_id, labeled=self.rows[0].label is not None)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None

    def log_stats(self) -> dict:
        return {"epoch": round(self.epoch + self.position / max(len(self.rows), 1), 4)}


def validation_batches(rows: list[Row], *, micro_batch_size: int, pad_id: int, rank: int = 0,
                       world_size: int = 1) -> Iterator[Batch]:
    """This rank's micro-batches of the validation rows, in file order; every rank yields the same number of
    batches of B rows (short ones filled with empty rows that add nothing to any metric)."""
    for chunk in shard_for_rank(rows, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size):
        yield collate(chunk, pad_id=pad_id, n_rows=micro_batch_size, labeled=rows[0].label is not None)
