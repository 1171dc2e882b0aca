"""Quiet by default: a 2-rank run prints its progress bar and a few lines of its own, not the
libraries' notices (megatron-core's missing TransformerEngine/Apex, DeepSpeed's INFO records and
consolidation prints); ``--verbose`` brings DeepSpeed's logs back."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from pali3_train.quiet import configure_logging, filter_warnings, library_chatter

NOISE = ("Transformer Engine and Apex", "DeepSpeed", "[INFO]", "FutureWarning", "megatron",
         "Processing zero checkpoint", "Loading checkpoint shards")  # fmt: skip


def _lines_besides_the_bar(output: str) -> list[str]:
    """Lines of the output, with tqdm's carriage-return redraws taken as the one bar."""
    lines = [part for line in output.splitlines() for part in line.split("\r")]
    return [line for line in lines if line.strip() and "step/s" not in line]


def test_a_two_rank_run_prints_its_progress_bar_and_at_most_a_dozen_lines(reference):
    output = (reference.parent / "output.txt").read_text()
    assert "step/s" in output, "the progress bar is there"
    others = _lines_besides_the_bar(output)
    assert len(others) <= 12, "\n".join(others)
    assert not [line for line in others if any(noise in line for noise in NOISE)], others


def test_the_filters_silence_only_the_listed_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_warnings()
        for message in (
            "Transformer Engine and Apex are not installed.",
            "something else is wrong",
        ):
            warnings.warn(message, UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is wrong"]


@pytest.mark.parametrize("verbose,level", [(False, "WARNING"), (True, "INFO")])
def test_mlflow_imported_after_the_set_up_keeps_its_level(verbose, level):
    """MLflow sets its logger's level at its first import, which the tracker makes lazily, after
    ``configure_logging``: its INFO lines (database set-up, the system-metrics sampler) stayed."""
    script = (
        "import logging; from pali3_train.quiet import configure_logging; "
        f"configure_logging(rank=0, is_main=True, verbose={verbose}); import mlflow; "
        "print(logging.getLevelName(logging.getLogger('mlflow').level))"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, check=True)  # fmt: skip
    assert result.stdout.split()[-1] == level


def test_verbose_keeps_deepspeeds_logs_and_its_prints(capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)  # configure_logging sets it
    root, deepspeed = logging.getLogger(), logging.getLogger("deepspeed")
    levels = root.level, deepspeed.level
    try:
        for verbose in (False, True):
            configure_logging(rank=0, is_main=True, verbose=verbose)
            with library_chatter():
                print("consolidating")
            assert deepspeed.isEnabledFor(logging.INFO) == verbose
            assert ("consolidating" in capsys.readouterr().out) == verbose
    finally:
        root.setLevel(levels[0])
        deepspeed.setLevel(levels[1])
