"""What the training loop consumes: a `Batch` of token rows, and the `BatchSource` protocol that yields them.

Legend: B rows (sequences) in a micro-batch, T positions. Every task (pretraining windows, SFT rows,
classification examples) produces the same `Batch`, so one training loop serves all of them; what differs is
the source and the objective (`train/objectives.py`). A source's state round-trips through
`state_dict`/`load_state_dict` (plain tensors, numbers, lists and dicts: `torch.load(weights_only=True)`
reads them), which is what makes a resumed run bitwise identical to one left alone.
This module knows nothing of models or of the training loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from gptforge.model.loss import IGNORE_INDEX


@dataclass
class Batch:
    """One micro-batch for one rank.

    Attributes:
        tokens: (B, T) int64 input ids. Rows shorter than T are right-padded (any id; `lengths` says where the real
            tokens end).
        targets: (B, T) int64 next-token ids, IGNORE_INDEX (-100) where no next-token loss is taken (padding, masked
            prompt tokens, a classification example without the auxiliary LM loss).
        lengths: (B,) int64 real tokens per row, or None when every row is T long (pretraining windows).
        labels: (B,) int64 class ids for classification, else None.
        source_ids: (B,) int64 index of the corpus each row came from (weighted mixtures), else None.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    source_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on `device` (non-blocking copies)."""
        return Batch(**{f.name: None if (v := getattr(self, f.name)) is None else v.to(device, non_blocking=True)
                        for f in dataclasses.fields(self)})

    @property
    def n_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) input tokens in the batch."""
        return self.tokens.numel() if self.lengths is None else int(self.lengths.sum())

    @property
    def n_targets(self) -> int:
        """Targets that are scored by the next-token loss (not IGNORE_INDEX)."""
        return int((self.targets != IGNORE_INDEX).sum())


class BatchSource(Protocol):
    """An endless, resumable stream of training micro-batches for this rank.

    Implementations: `data.dataset.WindowSource` (pretraining windows); the fine-tuning sources in `finetune/`.
    `log_stats()` may return numbers to add to each logged metrics record (e.g. tokens seen per mixture source).
    """

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# A validation set: called once per evaluation, it yields this rank's micro-batches. Every rank must yield the
# same number of batches (FSDP's forward is a collective); a rank with nothing left yields batches whose targets
# are all IGNORE_INDEX, which add nothing to the sums.
ValSet = Callable[[], Iterable[Batch]]


def pad_rows(rows: list[list[int]], targets: list[list[int]], width: int, *, pad_id: int = 0) -> Batch:
    """Right-pad token rows and their target rows to `width` (targets with IGNORE_INDEX) into a Batch.

    Args:
        rows: input ids per row, each at most `width` long.
        targets: target ids per row, the same lengths as `rows`.
        width: T of the batch.
        pad_id: the id put in padding positions (never scored, and causal attention never lets a real token see it).
    """
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        tgt[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    return Batch(tokens, tgt, lengths=torch.tensor([len(r) for r in rows], dtype=torch.long))


def shard_for_rank(items: Iterable, *, micro_batch_size: int, rank: int, world_size: int) -> list[list]:
    """Split an ordered, finite collection of examples into this rank's micro-batches, evenly over ranks.

    Global micro-step j covers examples [j*B*W, (j+1)*B*W); rank r takes the r-th slice of B of them (the layout
    training uses, so any world size sees the same examples). Every rank gets the same number of micro-batches;
    the last ones may be short or empty (the caller pads them).
    """
    items = list(items)
    per_step = micro_batch_size * world_size
    n_steps = -(-len(items) // per_step) if items else 0
    return [items[j * per_step + rank * micro_batch_size: j * per_step + (rank + 1) * micro_batch_size]
            for j in range(n_steps)]
