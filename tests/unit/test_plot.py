"""`gptforge plot`: a PNG from a real metrics.jsonl, and one-line errors for missing/empty/corrupt files."""

import shutil
from pathlib import Path

import pytest

from gptforge.cli.main import main
from gptforge.errors import GptforgeError
from gptforge.utils import plot
from gptforge.utils.plot import read_metrics

# A real RUN_DIR/metrics.jsonl: shakespeare-char, 400 steps, log every 10, validation every 50.
ASSET = Path(__file__).resolve().parents[1] / "assets" / "metrics.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png_from_a_real_run(tmp_path, capsys):
    shutil.copy(ASSET, tmp_path / "metrics.jsonl")
    assert main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "metrics.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000  # four panels of lines, not an empty canvas


def test_plot_out_option(tmp_path, monkeypatch):
    shutil.copy(ASSET, tmp_path / "metrics.jsonl")
    written = []
    monkeypatch.setattr(plot, "plot_metrics", lambda records, out, title="": written.append((len(records), out)) or out)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "curves.png")]) == 0
    assert written == [(40, str(tmp_path / "curves.png"))]


def test_read_metrics_skips_nulls_but_keeps_records(tmp_path):
    lines = '{"step": 1, "train_loss": null, "lr": 0.1}\n\n{"step": 2, "train_loss": 2.0}\n'
    (tmp_path / "metrics.jsonl").write_text(lines)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]


@pytest.mark.parametrize("content, message", [
    (None, "no metrics file"), ("", "has no records"),
    ('{"step": 1}\n{"step": 2, "lr"\n', "metrics.jsonl:2 is not valid JSON"),
    ('[1, 2]\n', "is not a metrics record"), ('{"loss": 1.0}\n', "is not a metrics record"),
])
def test_plot_errors_are_one_line(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    with pytest.raises(GptforgeError):
        read_metrics(tmp_path / "metrics.jsonl")


def test_plot_missing_run_dir(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: run directory not found")
