"""TensorBoard scalars beside metrics.jsonl: RUN_DIR/tensorboard/events.out.tfevents.*.

`TensorBoardWriter.write(record)` takes the same dict the training loop writes to metrics.jsonl and logs its
known keys as scalars at `record["step"]`. `torch.utils.tensorboard` is imported lazily, on the first
record; if the `tensorboard` package is missing, one warning is printed per process and logging is skipped,
so training never fails for want of it. Only rank 0 creates a MetricsWriter, so only rank 0 writes events.
Depends on `gptforge.utils.logging` only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gptforge.utils.logging import print0

# metrics.jsonl key -> TensorBoard scalar tag
SCALAR_TAGS = {
    "train_loss": "train/loss",
    "val_loss": "val/loss",
    "lr": "lr",
    "grad_norm": "grad_norm",
    "tokens_per_s": "tokens_per_s",
    "mfu": "mfu",
}

_warned_missing = False


def _summary_writer_class():
    """`torch.utils.tensorboard.SummaryWriter`, or None (after one warning) without the tensorboard package."""
    global _warned_missing
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if not _warned_missing:
            print0(f"warning: TensorBoard logging skipped ({exc}); `pip install tensorboard` to enable it")
            _warned_missing = True
        return None
    return SummaryWriter


class TensorBoardWriter:
    """Scalars of metrics records into `log_dir` (created on the first record that has any). After a resume,
    `purge_step` (the first step after the checkpoint) hides events an interrupted run logged from that step on."""

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step = Path(log_dir), purge_step
        self._writer: Any = None
        self._disabled = False

    def write(self, record: dict[str, Any]) -> None:
        """Log the finite numbers under `SCALAR_TAGS` keys of `record` at step `record["step"]`, then flush.

        Flushing every record (every `log_interval` steps) costs little and means a crash or a kill loses
        nothing that metrics.jsonl has.
        """
        step = record.get("step")
        scalars = {tag: float(record[key]) for key, tag in SCALAR_TAGS.items()
                   if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool)
                   and math.isfinite(record[key])}
        if self._disabled or not isinstance(step, int) or not scalars:
            return
        if self._writer is None:
            writer_class = _summary_writer_class()
            if writer_class is None:
                self._disabled = True
                return
            self._writer = writer_class(log_dir=str(self.log_dir), purge_step=self.purge_step)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
