"""Training guards: the loss-spike filter and the Ctrl-C-to-checkpoint handler used by the training loop."""

from __future__ import annotations

import math
import signal
import threading
from collections import deque

import torch

from gptforge.distributed.env import DistInfo, all_reduce_sum
from gptforge.utils.logging import print0


class SpikeFilter:
    """Flags a loss more than `zscore` standard deviations above the mean of the last `window` accepted losses."""

    def __init__(self, zscore: float, window: int) -> None:
        self.zscore, self.history = zscore, deque(maxlen=window)

    def __call__(self, loss: float) -> str | None:
        if self.zscore > 0 and len(self.history) == self.history.maxlen:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.history) / len(self.history))
            if std > 0 and (loss - mean) / std > self.zscore:
                return f"loss spike ({loss:.4f} is {(loss - mean) / std:.1f} std above the recent mean)"
        self.history.append(loss)
        return None


class Interrupt:
    """Turns the first Ctrl-C (SIGINT) into a request to stop after the current step, with a checkpoint; a second
    Ctrl-C interrupts at once. Under torchrun the request is agreed over all ranks (an all-reduce per step)."""

    def __init__(self, info: DistInfo) -> None:
        self.info, self.requested, self.previous = info, False, None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        print0("\ninterrupt: stopping after this step and writing a checkpoint (Ctrl-C again to stop at once)")
        signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def stop_now(self) -> bool:
        flag = torch.tensor(float(self.requested), device=self.info.device)
        return bool(all_reduce_sum(flag, self.info).item() > 0)
