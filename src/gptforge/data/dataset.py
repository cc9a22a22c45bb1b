"""Random windows of packed documents from prepared token files, for training and evaluation.

Legend: B sequences per micro-batch, T context_length. Token files are flat uint16/uint32 memmaps written by
`gptforge prepare`; documents are already separated by the end-of-text token, so any window is valid
training data. The window offsets come from a torch.Generator whose state is part of a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gptforge.errors import GptforgeError


def open_split(data_dir: str | Path, split: str, dtype: str) -> np.memmap:
    """Memory-map `DATA_DIR/{split}.bin` read-only (no tokens are loaded until sampled)."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise GptforgeError(f"token file not found: {path} (run `gptforge prepare` first)")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


class WindowSampler:
    """Draws (B, T) input/target windows at uniformly random offsets.

    Each micro-step draws `micro_batch_size * world_size` offsets from one shared generator and rank r takes
    the r-th slice, so ranks read disjoint samples and the global batch is identical at any world size.

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

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns inputs and targets, both (B, T) int64 on CPU; targets are inputs shifted by one token."""
        offsets = torch.randint(0, len(self.tokens) - self.T, (self.B * self.world_size,), generator=self.generator)
        offsets = offsets[self.rank * self.B:(self.rank + 1) * self.B].tolist()
        windows = np.stack([self.tokens[i:i + self.T + 1] for i in offsets]).astype(np.int64)
        batch = torch.from_numpy(windows)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
