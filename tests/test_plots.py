"""Loss-curve plots from metrics.jsonl files: one panel per run, resumed runs read once."""

from __future__ import annotations

import json

from pali3_train.plots import plot_loss_curves, read_metrics


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_resumed_runs_last_line_of_a_step_wins(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    assert {s: r["loss"] for s, r in read_metrics(metrics).items()} == {1: 3.0, 2: 1.5}
    assert read_metrics(tmp_path / "absent.jsonl") == {}


def test_runs_without_metrics_are_left_out_and_none_draws_nothing(tmp_path):
    _write(tmp_path / "a.jsonl", [{"step": s, "loss": 1 / s} for s in range(1, 5)])
    out = tmp_path / "curves.png"
    assert plot_loss_curves({"a": tmp_path / "a.jsonl", "b": tmp_path / "none.jsonl"}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nothing = tmp_path / "nothing.png"
    assert not plot_loss_curves({"b": tmp_path / "none.jsonl"}, nothing)
    assert not nothing.exists()
