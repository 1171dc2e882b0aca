"""``launcher/run.py --stage S`` without ``--config``: stage S's tiny recipe on the demo corpus.

The recipe is ``pali3_train.stages.curriculum.CURRICULUM[S].recipe``. Like every path in a
config, its data and run directory are relative to the working directory: its run goes to
``runs/quickstart/<recipe>``, away from ``make demo``'s runs, and the demo corpora are built under
``runs/`` first where they are missing (seeded, about 10 s; local processes take turns). A
recipe that starts from an earlier stage's export that has not been trained yet starts from
random weights instead, and says so.
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.demo_corpus import build_demo_corpora
from pali3_train.config import load_config
from pali3_train.stages.curriculum import CURRICULUM

ROOT = Path(__file__).resolve().parents[1]


def quickstart(stage: str, overrides: list[str], announce: bool) -> tuple[str, list[str]]:
    """(config path, overrides) for stage ``stage``; the caller's ``overrides`` apply last.
    ``announce``: print what was chosen (one process of the job)."""
    recipe = ROOT / CURRICULUM[stage].recipe
    build_demo_corpora(Path.cwd(), only_missing=True)
    chosen = [f"run_dir=runs/quickstart/{recipe.stem}"]
    init = load_config(recipe).stage.init_from
    notes = []
    if init and not Path(init).is_file():
        chosen.append("stage.init_from=null")
        notes.append(f"{init} is not there yet (train the earlier stages first, or `make demo`):"
                     " starting from random weights")  # fmt: skip
    if announce:
        print(f"no --config: stage {stage}'s tiny recipe, {recipe}, with --set "
              f"{' '.join(chosen)}", flush=True)  # fmt: skip
        for note in notes:
            print(f"  {note}")
    return str(recipe), chosen + overrides
