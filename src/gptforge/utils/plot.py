"""`gptforge plot`: training curves from RUN_DIR/metrics.jsonl as one PNG.

Four panels against the optimizer step: train and validation loss (nats per token), learning rate, gradient
norm (before clipping) and throughput (tokens/s). matplotlib is imported lazily and driven through its
object API on the Agg backend, so no display, no pyplot global state and no GUI toolkit is needed.
Depends on `gptforge.errors` only (plus matplotlib at call time).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError

# (title, y label, [(record key, line label)])
PANELS = (
    ("loss", "nats / token", [("train_loss", "train"), ("val_loss", "val")]),
    ("learning rate", "lr", [("lr", "lr")]),
    ("gradient norm (before clipping)", "L2 norm", [("grad_norm", "grad norm")]),
    ("throughput", "tokens / s", [("tokens_per_s", "tokens/s")]),
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file, in file order.

    Raises:
        GptforgeError: missing file, a line that is not a JSON object with an integer "step", or no records.
    """
    path = Path(path)
    if not path.is_file():
        raise GptforgeError(f"no metrics file at {path} (is this a gptforge run directory?)")
    records = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise GptforgeError(f"{path}:{lineno} is not valid JSON (corrupt metrics file?)") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise GptforgeError(f"{path}:{lineno} is not a metrics record (a JSON object with an integer step)")
            records.append(record)
    if not records:
        raise GptforgeError(f"{path} has no records yet (training logs every train.log_interval steps)")
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold a finite number under `key` (null = non-finite is skipped)."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def plot_metrics(records: list[dict[str, Any]], out: str | Path, *, title: str = "") -> Path:
    """Write the 2 x 2 panel figure of `records` to the PNG `out` (parent directories created).

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (panel_title, ylabel, keys) in zip(axes, PANELS):
        drawn = False
        for key, label in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        if len(keys) > 1 and drawn:
            ax.legend()
        ax.set_title(panel_title)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot RUN_DIR/metrics.jsonl to `out` (default RUN_DIR/metrics.png); returns the PNG path.

    Raises:
        GptforgeError: `run_dir` is not a directory, or its metrics file is missing, empty or corrupt.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptforgeError(f"run directory not found: {run_dir}")
    records = read_metrics(run_dir / "metrics.jsonl")
    return plot_metrics(records, out if out is not None else run_dir / "metrics.png", title=str(run_dir))
