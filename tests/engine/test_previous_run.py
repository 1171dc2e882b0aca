"""What a run directory holds, and `--overwrite` moving it aside, the job's own files left."""

from __future__ import annotations

from pali3_train.config import load_config
from pali3_train.engine.previous_run import move_aside, previous_run
from tests.engine.conftest import ROOT


def _cfg(run_dir, *overrides):
    return load_config(ROOT / "configs/tiny/stage1.yaml", [f"run_dir={run_dir}", *overrides])


def test_an_empty_or_missing_run_dir_holds_no_run(tmp_path):
    assert previous_run(_cfg(tmp_path / "missing")) == []
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")  # a start that died before its step 1
    assert previous_run(_cfg(tmp_path / "run")) == []


def test_a_run_is_moved_aside_whole_and_the_jobs_files_stay(tmp_path):
    run_dir = tmp_path / "run"
    for step in (2, 4):
        (run_dir / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (run_dir / "mlflow.db").write_bytes(b"")
    (run_dir / "run.lock").write_text("{}")
    (run_dir / "slurm").mkdir()
    (run_dir / "mine.yaml").write_text("{}")  # the config being run
    cfg = _cfg(run_dir)
    assert previous_run(cfg) == [
        "2 checkpoints up to step_00000004",
        "metrics.jsonl (2 rows up to step 2)",
        "an MLflow store (mlflow.db)",
    ]
    (aside,) = move_aside(cfg, keep=(run_dir / "mine.yaml",))
    assert aside.parent == run_dir and aside.name.startswith("replaced-")
    left = sorted(p.name for p in run_dir.iterdir())
    assert left == sorted([aside.name, "mine.yaml", "run.lock", "slurm"])
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "metrics.jsonl", "mlflow.db"]
    assert previous_run(cfg) == []


def test_a_checkpoint_folder_outside_run_dir_moves_beside_itself(tmp_path):
    ckpts = tmp_path / "elsewhere" / "ckpts"
    (ckpts / "step_00000002").mkdir(parents=True)
    cfg = _cfg(tmp_path / "run", f"checkpoint.dir={ckpts}")
    assert previous_run(cfg) == ["1 checkpoint up to step_00000002"]
    (moved,) = move_aside(cfg)
    assert moved.parent == ckpts.parent and moved.name.startswith("ckpts.replaced-")
    assert (moved / "step_00000002").is_dir() and not ckpts.exists()
