"""The registry is the one home of a stage: every objective has a spec, every curriculum stage an
objective and a recipe that says so, and no code outside ``pali3_train/stages`` branches on a
stage name or an objective."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pali3_train.config import ConfigError, load_config
from pali3_train.stages.curriculum import CURRICULUM, OBJECTIVE_NAMES
from pali3_train.stages.registry import OBJECTIVES, spec_for

ROOT = Path(__file__).resolve().parents[2]
# A comparison or lookup keyed by a stage name or an objective: what specs exist to replace.
BRANCH = re.compile(
    r"""(==|!=|\bin\b)\s*\(?["'](0|1|2|transfer|contrastive|generative)["']"""
    r"""|["'](0|1|2|transfer|contrastive|generative)["']\s*(==|!=)"""
    r"""|stage\.(name|objective)\s*(==|!=|\bin\b)"""
)


def test_every_objective_has_one_spec_under_its_name():
    assert tuple(OBJECTIVES) == OBJECTIVE_NAMES
    for name, spec in OBJECTIVES.items():
        assert spec.objective == name
    kinds = [spec.export_kind for spec in OBJECTIVES.values()]
    assert len(set(kinds)) == len(kinds)  # an exported file says which objective wrote it


@pytest.mark.parametrize("name", list(CURRICULUM))
def test_each_curriculum_stage_recipe_names_its_stage_and_objective(name):
    stage = CURRICULUM[name]
    cfg = load_config(ROOT / stage.recipe)
    assert (cfg.stage.name, cfg.stage.objective) == (name, stage.objective)
    assert spec_for(cfg) is OBJECTIVES[stage.objective]
    assert cfg.stage.freeze == stage.freeze


def test_no_code_outside_the_stages_package_branches_on_a_stage_or_objective():
    found = []
    for folder in ("pali3_train", "launcher", "cluster", "data_pipeline", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_relative_to(ROOT / "pali3_train" / "stages"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if BRANCH.search(line.split("#")[0]):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_grep_sees_a_branch_when_there_is_one():
    assert BRANCH.search('if stage == "0":')
    assert BRANCH.search("if cfg.stage.objective == spec:")
    assert BRANCH.search('model = SigLIP if "contrastive" == objective else PaLI3')
    assert not BRANCH.search('parser.add_argument("--stage", choices=tuple(CURRICULUM))')


def test_an_unknown_objective_or_a_stage_of_another_objective_is_refused_at_load(tmp_path):
    stage1 = ROOT / "configs/tiny/stage1.yaml"
    with pytest.raises(ConfigError, match="stage.objective: unknown objective 'captioning'; known"):
        load_config(stage1, ["stage.objective=captioning"])
    with pytest.raises(ConfigError, match="stage.objective: stage 1 trains the generative"):
        load_config(stage1, ["stage.objective=contrastive"])
    with pytest.raises(ConfigError, match="stage.name: unknown stage '3'"):
        load_config(stage1, ["stage.name='3'"])
