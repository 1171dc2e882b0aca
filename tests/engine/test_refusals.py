"""Refusals of `launcher/run.py` under torchrun with 2 real ranks: each is one `error:` line naming
the file (or `--set` item) and the field, printed once, before DeepSpeed or any process group
starts; and `--resume none` over a previous run needs `--overwrite`, which moves that run aside."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.conftest import ROOT, launch, launch_env, stage_config

TORCHRUN_FAILED = 1  # torchrun's own code for any failed rank (its summary shows the rank's 2)


def _refused(result: subprocess.CompletedProcess, source: str, field: str) -> str:
    """The one `error:` line, checked to name ``source`` then ``field``, with nothing started."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: {source}: {field}"), errors[0]
    # Nothing started: no DeepSpeed (not even imported: its accelerator line), no rank's log.
    assert "real_accelerator" not in result.stderr and "DeepSpeed" not in result.stderr
    assert "[rank " not in result.stderr, result.stderr[-3000:]
    return errors[0]


def _torchrun(config: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = launch(config, 2, *args, timeout=120)
    took = time.perf_counter() - start
    print(f"refused in {took:.1f} s (torchrun, 2 ranks)")
    assert result.returncode == TORCHRUN_FAILED, result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    return result, took


def test_a_missing_tokenizer_is_one_line_naming_the_field(demo, tmp_path):
    config = stage_config(demo, tmp_path / "run")
    result, _ = _torchrun(config, "--set", f"data.tokenizer_path={tmp_path}/none.model")
    line = _refused(
        result, f"--set data.tokenizer_path={tmp_path}/none.model", "data.tokenizer_path"
    )
    assert "no SentencePiece model file" in line
    assert "FileNotFoundError" not in result.stderr  # no rank traceback (torchrun has its own)


def test_a_freeze_typo_is_refused_before_deepspeed_with_the_closest_name(demo, tmp_path):
    config = stage_config(demo, tmp_path / "run", stage={"freeze": ["vitt"]})
    result, _ = _torchrun(config)
    line = _refused(result, str(config), "stage.freeze")
    assert "has no 'vitt'; did you mean 'vit'?" in line
    assert not (tmp_path / "run").exists()


def test_a_yaml_syntax_error_names_line_and_column(demo, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  steps: 6\n  lr: [1e-3\nparallel: {}\n")
    result, _ = _torchrun(config)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: {config}:4:9: invalid YAML: "), errors[0]


@pytest.mark.parametrize(
    "args, option",
    [
        (["--stage", "9"], "argument --stage"),
        (["--bogus", "none"], "unrecognized arguments: --bogus"),
    ],
)
def test_an_argparse_error_is_one_line_without_usage(demo, tmp_path, args, option):
    config = stage_config(demo, tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(ROOT / "launcher/run.py"), "--config", str(config),
               *args]  # fmt: skip
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True,
                            timeout=120, cwd=ROOT)  # fmt: skip
    assert result.returncode == TORCHRUN_FAILED and "exitcode  : 2" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {option}"), result.stderr[-3000:]
    assert "usage:" not in result.stderr


@pytest.mark.parametrize(
    "item, field",
    [
        ("train.global_batch_size=6", "train.micro_batch_size"),  # micro 4 does not divide it
        ("train.steps=0", "train.steps"),
        ("parallel.tensor_parallel_size=3", "model.ul2.num_heads"),  # heads 4, not by 3
    ],
)
def test_a_set_item_is_named_as_the_origin_of_what_it_broke(demo, tmp_path, item, field):
    config = stage_config(demo, tmp_path / "run")
    result, _ = _torchrun(config, "--set", item)
    _refused(result, f"--set {item}", field)


def test_resume_from_a_missing_folder_says_it_does_not_exist(demo, tmp_path):
    config = stage_config(demo, tmp_path / "run")
    result, _ = _torchrun(config, "--resume", str(tmp_path / "nonexistent"))
    line = _refused(result, f"--resume {tmp_path / 'nonexistent'}", "no such checkpoint folder")
    assert "incomplete" not in line


def test_the_deepspeed_launcher_exits_2_on_a_refusal(demo, tmp_path):
    config = stage_config(demo, tmp_path / "run", stage={"freeze": ["vitt"]})
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
               str(ROOT / "launcher/run.py"), "--stage", "1", "--config", str(config)]  # fmt: skip
    result = subprocess.run(command, env=launch_env(), capture_output=True, text=True,
                            timeout=120, cwd=ROOT)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{config}: stage.freeze" in errors[0], result.stderr[-3000:]


def test_a_fresh_start_over_a_previous_run_needs_overwrite(demo, reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    config = stage_config(demo, run_dir)
    result, _ = _torchrun(config, "--resume", "none")
    line = _refused(result, str(config), "run_dir")
    assert "already holds a run (3 checkpoints up to step_00000006" in line
    assert "metrics.jsonl (6 rows up to step 6)" in line and "--overwrite" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))[-1] == "step_00000006"


def test_overwrite_moves_the_previous_run_aside_and_starts_clean(demo, reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    config = stage_config(demo, run_dir, train={"steps": 2}, checkpoint={"every_steps": 2})
    result = launch(config, 2, "--resume", "none", "--overwrite")
    assert result.returncode == 0, result.stderr[-5000:]
    warnings = [line for line in result.stderr.splitlines() if "--overwrite" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --overwrite: "), warnings
    (aside,) = run_dir.glob("replaced-*")
    assert (aside / "checkpoints" / "step_00000006").is_dir()
    assert len((aside / "metrics.jsonl").read_text().splitlines()) == 6
    # The new run alone: its own metrics from step 1, its own checkpoint, nothing appended.
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"step": 1' in rows[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002"]


def test_overwrite_without_resume_none_is_a_usage_error(demo, tmp_path):
    config = stage_config(demo, tmp_path / "run")
    result = subprocess.run(
        [sys.executable, str(ROOT / "launcher/run.py"), "--stage", "1", "--config", str(config),
         "--overwrite"],
        capture_output=True, text=True, env=launch_env(), timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --overwrite goes with --resume none (a training run that starts over)"
    ]
