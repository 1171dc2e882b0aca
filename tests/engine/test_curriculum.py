"""`launcher/curriculum.py` end to end, shortened: an untrained baseline, then stage 0 -> 1 -> 2
-> transfer, each 2 steps on 2 processes through the DeepSpeed launcher, each starting from the
previous stage's export; frozen towers stay bit-identical across stages, stage 2's ViT takes the
higher resolution, the stage runs nest under one MLflow parent run and the table covers them all."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pali3_train.config import ConfigError, load_config
from pali3_train.config.curriculum import Curriculum
from pali3_train.convert.safetensors_io import load_weights
from tests.engine.conftest import ROOT, launch_env, stage_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _eval(held_out, names: tuple[str, ...]) -> dict:
    sources = [dataclasses.asdict(s) for s in held_out.sources() if s.name in names]
    return {"sources": sources, "max_samples": 4, "batch_size": 2, "max_decode_tokens": 4}


@pytest.fixture(scope="module")
def curriculum(demo, demo_held_out, tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum")
    tracking = {"backend": "mlflow", "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "curriculum-test"}  # fmt: skip
    common = {"tracking": tracking, "train": {"steps": 2}, "checkpoint": {"every_steps": 2}}
    evaluation = _eval(demo_held_out, ("scenes_caption", "scenes_vqa", "text_ocr"))
    high_res = {"vit": {"image_size_px": 48}}
    vqa = [dataclasses.asdict(s) for s in demo.sources() if s.name == "scenes_vqa"]
    digits = "zero one two three four five six seven eight nine".split()
    zero_shot = {**_eval(demo_held_out, ("digits_caption",)),
                 "zero_shot": [{"source": "digits_caption", "classes": digits}]}  # fmt: skip
    configs = {
        "stage0": stage_config(demo, root / "stage0", eval=zero_shot,
                               stage={"freeze": [], "objective": "contrastive"},
                               **common),
        "stage1": stage_config(demo, root / "stage1", eval=evaluation,
                               stage={"freeze": ["vit"],
                                      "init_from": str(root / "stage0/model.safetensors")},
                               **common),
        "stage2": stage_config(demo, root / "stage2", eval=evaluation, model=high_res,
                               stage={"freeze": [],
                                      "init_from": str(root / "stage1/model.safetensors")},
                               **common),
        "transfer_vqa": stage_config(demo, root / "transfer_vqa", model=high_res,
                                     eval=_eval(demo_held_out, ("scenes_vqa",)),
                                     data={"sources": vqa},
                                     stage={"freeze": ["vit"],
                                            "init_from": str(root / "stage2/model.safetensors")},
                                     **common),
    }  # fmt: skip
    stages = [("stage0", "0"), ("stage1", "1"), ("stage2", "2"), ("transfer_vqa", "transfer")]
    plan = {
        "run_dir": str(root),
        "nproc_per_node": 2,
        "launcher": "deepspeed",
        "baselines": [{"name": "untrained", "stage": "1", "config": str(configs["stage1"])}],
        "stages": [{"name": n, "stage": s, "config": str(configs[n])} for n, s in stages],
    }
    path = root / "curriculum.yaml"
    path.write_text(yaml.safe_dump(plan))
    result = subprocess.run(
        [sys.executable, str(ROOT / "launcher" / "curriculum.py"), str(path)],
        capture_output=True, text=True, env=launch_env(), cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return {"root": root, "stdout": result.stdout}


def test_each_stage_starts_from_the_last_and_frozen_towers_stay_identical(curriculum):
    root = curriculum["root"]
    stage0, stage1, stage2, transfer = (
        load_weights(root / name / "model.safetensors")
        for name in ("stage0", "stage1", "stage2", "transfer_vqa")
    )
    vit1 = {k: v for k, v in stage1.items() if k.startswith("vit.")}
    assert vit1 and all(torch.equal(v, stage0["image." + k[4:]]) for k, v in vit1.items())
    assert (stage1["vit.pos_embed"].shape[0], stage2["vit.pos_embed"].shape[0]) == (16, 36)
    assert not torch.equal(stage2["vit.patch_embed.weight"], stage1["vit.patch_embed.weight"])
    assert all(torch.equal(transfer[k], stage2[k]) for k in stage2 if k.startswith("vit."))
    assert not torch.equal(transfer["projection.weight"], stage2["projection.weight"])


def test_the_table_has_the_baseline_and_every_stage(curriculum):
    table = (curriculum["root"] / "results.md").read_text()
    header = table.splitlines()[0]
    for name in ("untrained", "stage0", "stage1", "stage2", "transfer_vqa"):
        assert f" {name} " in header
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert {"scenes_caption/cider", "scenes_vqa/vqa_accuracy", "text_ocr/anls",
            "digits_caption/zero_shot_accuracy"} <= set(rows)  # fmt: skip
    assert table in curriculum["stdout"] and "mlflow ui --backend-store-uri" in curriculum["stdout"]


def test_stage_runs_nest_under_one_mlflow_parent_run(curriculum):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{curriculum['root']}/mlflow.db")
    experiment = client.get_experiment_by_name("curriculum-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "pali3.curriculum" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert set(children) == {"untrained", "stage0", "stage1", "stage2", "transfer_vqa"}
    for run in children.values():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert children["stage2"].data.tags["stage"] == "2"
    assert "stage2/scenes_vqa/vqa_accuracy" in parent.data.metrics


def test_the_demo_curriculum_and_every_stage_config_in_it_validate():
    from pali3_train.launcher.curriculum import check_all

    path = ROOT / "configs" / "tiny" / "curriculum.yaml"
    plan = load_config(path, schema=Curriculum)
    configs = check_all(path, plan, [])
    assert list(configs) == [s.name for s in (*plan.baselines, *plan.stages)]
    assert configs["untrained_pali3"].stage.init_from is None
    assert configs["untrained_pali3"].run_dir == "runs/demo/untrained_pali3"
    for step in plan.stages[1:]:  # each stage starts from an earlier stage's export
        earlier = {configs[s.name].run_dir for s in plan.stages[: plan.stages.index(step)]}
        assert str(Path(configs[step.name].stage.init_from).parent) in earlier, step.name


def test_the_command_lines_set_applies_to_every_step_and_is_named_when_bad():
    from pali3_train.launcher.curriculum import check_all

    path = ROOT / "configs" / "tiny" / "curriculum.yaml"
    plan = load_config(path, schema=Curriculum)
    configs = check_all(path, plan, ["train.seed=5"])
    assert {name: cfg.train.seed for name, cfg in configs.items()} == dict.fromkeys(configs, 5)
    with pytest.raises(ConfigError, match=r"--set train\.seeds=5"):
        check_all(path, plan, ["train.seeds=5"])


def test_a_bad_stage_config_is_refused_before_any_stage_starts(demo, tmp_path):
    good = stage_config(demo, tmp_path / "good")
    bad = stage_config(demo, tmp_path / "bad", train={"stpes": 2})
    plan = {"run_dir": str(tmp_path), "stages": [
        {"name": "first", "stage": "1", "config": str(good)},
        {"name": "second", "stage": "1", "config": str(bad)},
    ]}  # fmt: skip
    path = tmp_path / "curriculum.yaml"
    path.write_text(yaml.safe_dump(plan))
    result = subprocess.run([sys.executable, str(ROOT / "launcher" / "curriculum.py"), str(path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "train.stpes: unknown key; did you mean 'steps'?" in result.stderr
    assert not (tmp_path / "good").exists()  # the first stage never ran
