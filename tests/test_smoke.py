"""`make demo`'s entry point runs end to end and both models learn on the demo corpus, fed by the
data pipeline."""

from pathlib import Path

import pytest

from pali3_train.config import load_config
from pali3_train.smoke import main, run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke_tiny.yaml"


def test_both_models_learn_on_the_demo_corpus():
    cfg = load_config(CONFIG, ["train.steps=50"])
    losses = run(cfg)
    for name, curve in losses.items():
        recent = sum(curve[-5:]) / 5
        assert recent < 0.6 * curve[0], (name, curve[0], recent)


def test_main_prints_losses_and_writes_the_loss_plot(tmp_path, capsys):
    plot = tmp_path / "losses.png"
    assert main(["--config", str(CONFIG), "--set", "train.steps=3", "--plot", str(plot)]) == 0
    assert "pali3: loss" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_config_exits_with_a_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(bad)])
    assert exit_info.value.code == 2
    assert "train.lr" in capsys.readouterr().err
