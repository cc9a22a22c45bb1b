"""TensorBoard events written beside metrics.jsonl by MetricsWriter, and a clean skip without tensorboard."""

import json
import sys

import pytest

from gptforge.utils import tensorboard as tb
from gptforge.utils.logging import MetricsWriter

RECORDS = [
    {"step": 10, "train_loss": 3.5, "lr": 1e-4, "grad_norm": 2.0, "tokens_per_s": 1000.0, "mfu": 0.3,
     "tokens_seen": 7680},
    {"step": 20, "train_loss": 3.0, "lr": 2e-4, "grad_norm": float("nan"), "tokens_per_s": 1200.0, "mfu": 0.35,
     "val_loss": 3.1},
]


def test_metrics_writer_forwards_scalars_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for record in RECORDS:
        writer.write(record)
    writer.tensorboard.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert set(scalars) == {"train/loss", "val/loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
    assert scalars["train/loss"] == [(10, 3.5), (20, 3.0)]
    assert scalars["val/loss"] == [(20, pytest.approx(3.1))]
    assert scalars["grad_norm"] == [(10, 2.0)]  # NaN (null in metrics.jsonl) is skipped


def test_missing_tensorboard_warns_once_and_keeps_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import raise ImportError
    monkeypatch.setattr(tb, "_warned_missing", False)
    for run in ("a", "b"):
        writer = MetricsWriter(tmp_path / run / "metrics.jsonl")
        for record in RECORDS:
            writer.write(record)
        assert len((tmp_path / run / "metrics.jsonl").read_text().splitlines()) == 2
        assert not (tmp_path / run / "tensorboard").exists()
    assert capsys.readouterr().err.count("warning: TensorBoard logging skipped") == 1


def test_tensorboard_can_be_turned_off(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=False)
    writer.write(RECORDS[0])
    assert writer.tensorboard is None and not (tmp_path / "tensorboard").exists()
