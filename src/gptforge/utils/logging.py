"""Rank-zero printing and the metrics.jsonl writer."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only (to stderr unless a file is given), so logs are not repeated per process."""
    if is_main_process():
        kwargs.setdefault("file", sys.stderr)
        print(*args, **kwargs, flush=True)


class MetricsWriter:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl (non-finite numbers written as null) and, with
    `tensorboard=True`, forwards each record to TensorBoard event files in RUN_DIR/tensorboard/."""

    def __init__(self, path: Path, *, tensorboard: bool = True, purge_step: int | None = None) -> None:
        # Imported here: gptforge.utils.tensorboard imports print0 from this module.
        from gptforge.utils.tensorboard import TensorBoardWriter

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard = (TensorBoardWriter(self.path.parent / "tensorboard", purge_step=purge_step)
                            if tensorboard else None)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(clean)

    def close(self) -> None:
        """Flush and close the TensorBoard event file (metrics.jsonl is closed after every record)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
