"""Pretraining windows from prepared token files: random windows for training, fixed windows for validation.

Legend: B sequences per micro-batch, T context_length, W world_size. Token files are flat uint16/uint32 memmaps
written by `gptforge prepare`; documents are already separated by the end-of-text token, so any window is valid
training data. Training windows start at random offsets drawn from a torch.Generator whose state is part of a
checkpoint; validation scores a fixed list of non-overlapping windows, so its value does not depend on the
micro-batch size or the world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gptforge.data.batches import Batch, shard_for_rank
from gptforge.errors import GptforgeError
from gptforge.model.loss import IGNORE_INDEX


def open_split(data_dir: str | Path, split: str, dtype: str) -> np.memmap:
    """Memory-map `DATA_DIR/{split}.bin` read-only (no tokens are loaded until sampled)."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise GptforgeError(f"token file not found: {path} (run `gptforge prepare` first)")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


def _windows(tokens: np.ndarray, offsets: list[int], T: int) -> Batch:
    """Inputs tokens[o : o+T] and targets tokens[o+1 : o+T+1] for each offset, as a (len(offsets), T) Batch."""
    windows = torch.from_numpy(np.stack([tokens[i:i + T + 1] for i in offsets]).astype(np.int64))
    return Batch(windows[:, :-1], windows[:, 1:])


class WindowSource:
    """Training windows at uniformly random offsets (a `BatchSource`).

    Each micro-step draws `micro_batch_size * world_size` offsets from one shared generator and rank r takes the
    r-th slice, so ranks read disjoint samples and the global batch is identical at any world size.

    Raises:
        GptforgeError: the split holds fewer than T + 1 tokens.
    """

    def __init__(self, tokens: np.ndarray, *, context_length: int, micro_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, split: str = "train") -> None:
        if len(tokens) < context_length + 1:
            raise GptforgeError(f"the {split} split has {len(tokens)} tokens; context_length {context_length} "
                                f"needs at least {context_length + 1} (use more text or a shorter context)")
        self.tokens, self.T, self.B = tokens, context_length, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> Batch:
        """(B, T) inputs and targets (inputs shifted by one token), int64 on CPU."""
        offsets = torch.randint(0, len(self.tokens) - self.T, (self.B * self.world_size,), generator=self.generator)
        return _windows(self.tokens, offsets[self.rank * self.B:(self.rank + 1) * self.B].tolist(), self.T)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def validation_windows(tokens: np.ndarray, *, context_length: int, micro_batch_size: int, max_tokens: int,
                       rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """This rank's share of a fixed set of validation windows, as micro-batches (a `ValSet` body).

    The windows are the first `max_tokens // T` non-overlapping T-token windows of the split (all of them when
    `max_tokens` is 0 or exceeds the split), so every token scored is scored once, with the context its window
    gives. They are dealt out as in training (`shard_for_rank`); a rank whose last micro-batch is short gets it
    padded with rows whose targets are all IGNORE_INDEX, so every rank runs the same number of forwards (FSDP
    needs that) and the summed loss and target count are the same for any micro-batch size and world size.
    """
    T = context_length
    n = (len(tokens) - 1) // T
    if max_tokens > 0:
        n = min(n, max(1, max_tokens // T))
    for chunk in shard_for_rank(range(n), micro_batch_size=micro_batch_size, rank=rank, world_size=world_size):
        pad = micro_batch_size - len(chunk)
        batch = _windows(tokens, [i * T for i in chunk] + [0] * pad, T)
        if pad:  # targets are a view sharing memory with tokens: mask a copy
            batch.targets = batch.targets.clone()
            batch.targets[len(chunk):] = IGNORE_INDEX
        yield batch
