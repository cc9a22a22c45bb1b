"""Pretraining windows from prepared token files: random windows for training, fixed windows for validation.

Legend: B sequences per micro-batch, T context_length, W world_size. Token files are flat uint16/uint32 memmaps
written by `gptforge prepare` (read as one array, or as a `data.shards.TokenStream` over shards); documents are
already separated by the end-of-text token, so any window is valid training data. Training windows start at
random offsets drawn from a torch.Generator whose state is part of a checkpoint; with a mixture, `MixtureSource`
also chooses each window's source by weight. Validation scores a fixed list of non-overlapping windows, so its
value does not depend on the micro-batch size or the world size.
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


class MixtureSource:
    """Training windows from several sources, each source drawn with its mixture weight (a `BatchSource`).

    Brown et al. 2020 (section 2.2, Table 2.2) sample datasets by weight, not by size. Here each micro-step's
    B x W global rows get their sources by quota: row after row, the source furthest below its share
    (max over s of weight_s x (rows + 1) - rows_s, ties to the first) gets the row, so after any number of rows
    every source has its weight's share to within one row. The rows are then shuffled and each gets a uniformly
    random window of its source's training split, both with one torch.Generator. Rank r takes the r-th slice
    of B, so the global batch is the same at any world size. The generator state and the per-source row counts
    are the checkpointed state: a resumed run draws exactly the same windows.

    Args:
        streams: each source's training tokens (anything with len() and contiguous slicing).
        weights: the sources' weights (positive, summing to 1).
        names: the sources' names, for `log_stats`.

    Raises:
        GptforgeError: a source holds fewer than T + 1 training tokens.
    """

    def __init__(self, streams: list, weights: list[float], names: list[str], *, context_length: int,
                 micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        for stream, name in zip(streams, names):
            if len(stream) < context_length + 1:
                raise GptforgeError(f"source {name!r} has {len(stream)} training tokens; context_length "
                                    f"{context_length} needs at least {context_length + 1}")
        self.streams, self.weights, self.names = streams, list(weights), list(names)
        self.T, self.B, self.rank, self.world_size = context_length, micro_batch_size, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.rows = [0] * len(streams)  # rows drawn so far from each source, over all ranks

    def _assign(self, n_rows: int) -> list[int]:
        out = []
        for _ in range(n_rows):
            total = sum(self.rows) + 1
            i = max(range(len(self.rows)), key=lambda s: (self.weights[s] * total - self.rows[s], -s))
            self.rows[i] += 1
            out.append(i)
        return out

    def next_batch(self) -> Batch:
        """(B, T) inputs and targets, int64 on CPU; `source_ids` (B,) gives each row's source index."""
        n = self.B * self.world_size
        assigned = self._assign(n)
        order = torch.randperm(n, generator=self.generator).tolist()
        draws = torch.randint(0, 1 << 62, (n,), generator=self.generator).tolist()
        rows = [(assigned[order[j]], draws[j]) for j in range(n)][self.rank * self.B:(self.rank + 1) * self.B]
        offsets = [d % (len(self.streams[s]) - self.T) for s, d in rows]
        windows = np.stack([self.streams[s][o:o + self.T + 1] for (s, _), o in zip(rows, offsets)])
        tokens = torch.from_numpy(windows.astype(np.int64))
        return Batch(tokens[:, :-1], tokens[:, 1:], source_ids=torch.tensor([s for s, _ in rows], dtype=torch.long))

    def log_stats(self) -> dict:
        """Per source: `tokens_seen/<name>` (input tokens of its windows, all ranks) and `epochs/<name>`
        (those tokens over the source's training tokens), the last columns of the paper's Table 2.2."""
        out: dict = {}
        for name, rows, stream in zip(self.names, self.rows, self.streams):
            out[f"tokens_seen/{name}"] = rows * self.T
            out[f"epochs/{name}"] = round(rows * self.T / len(stream), 6)
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "rows": list(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("rows", [])) != len(self.rows):
            raise GptforgeError(f"cannot resume: the checkpoint's data had {len(state.get('rows', []))} sources, "
                                f"this data has {len(self.rows)} (resume with the data the run was started on)")
        self.generator.set_state(state["generator"])
        self.rows = [int(r) for r in state["rows"]]


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
