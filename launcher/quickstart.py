"""``launcher/run.py --stage S`` without ``--config``: stage S's tiny recipe on the demo corpus.

The recipe is ``pali3_train.stages.curriculum.CURRICULUM[S].recipe``. Like every path in a
config, its data, run directory and tracking store are relative to the working directory: the
run goes to ``runs/quickstart/<recipe>``, away from ``make demo``'s runs and MLflow store, and
the demo corpora are built under ``runs/`` first where they are missing (seeded, about 10 s;
local processes take turns; a dry run builds nothing and reports what is missing). A recipe that
starts from an earlier stage's export that has not been trained yet starts from random weights
instead, and an objective that needs the whole batch in one micro-step gets the micro-batch that
keeps it whole on this world size; both are said.
"""

from __future__ import annotations

from pathlib import Path

from pali3_train.config import load_config
from pali3_train.data_pipeline.demo_corpus import build_demo_corpora
from pali3_train.stages.curriculum import CURRICULUM
from pali3_train.stages.registry import spec_for

ROOT = Path(__file__).resolve().parents[1]


def quickstart(
    stage: str, overrides: list[str], world_size: int, announce: bool, build_corpora: bool = True
) -> tuple[str, list[str]]:
    """(config path, overrides) for stage ``stage``; the caller's ``overrides`` apply last.
    ``announce``: print what was chosen (one process of the job)."""
    recipe = ROOT / CURRICULUM[stage].recipe
    if build_corpora:
        build_demo_corpora(Path.cwd(), only_missing=True)
    run_dir = f"runs/quickstart/{recipe.stem}"
    chosen = [f"run_dir={run_dir}"]
    cfg, notes = load_config(recipe), []
    if cfg.stage.init_from and not Path(cfg.stage.init_from).is_file():
        chosen.append("stage.init_from=null")
        notes.append(f"{cfg.stage.init_from} is not there yet (train the earlier stages first, "
                     "or `make demo`): starting from random weights")  # fmt: skip
    dp = max(world_size // cfg.parallel.tensor_parallel_size, 1)
    whole = cfg.train.global_batch_size // dp
    if not spec_for(cfg).accumulates and whole != cfg.train.micro_batch_size:
        chosen.append(f"train.micro_batch_size={whole}")
        notes.append(f"{dp} data-parallel rank(s): micro-batch {whole} keeps the global batch in "
                     "one micro-step")  # fmt: skip
    if announce:
        print(f"no --config: stage {stage}'s tiny recipe, {recipe}, with --set "
              f"{' '.join(chosen)}", flush=True)  # fmt: skip
        for note in notes:
            print(f"  {note}", flush=True)
    return str(recipe), chosen + overrides
