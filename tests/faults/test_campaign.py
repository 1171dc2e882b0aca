"""The fault campaign's short form (``python -m tests.faults.campaign --short``), one test per
case, on the session's demo corpus; the full form is ``python -m tests.faults.campaign``."""

from __future__ import annotations

import shutil

import pytest

from pali3_train.engine.checkpoint import UNIVERSAL_TAG
from tests.faults.cases import CASES, Lab, Skipped


@pytest.fixture(scope="module")
def lab(demo, reference, tmp_path_factory):
    """The uninterrupted run is the session's ``reference``: the very run ``Lab.reference`` would
    launch (``stage_config(demo, run_dir)`` on 2 ranks), copied as training wrote it (without the
    ``universal/`` folder a resume on another layout may have added to it since)."""
    root = tmp_path_factory.mktemp("faults")
    run_dir = root / "reference" / "run"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns(UNIVERSAL_TAG))
    return Lab(demo, root, _reference=run_dir)


@pytest.mark.parametrize("case", [c for c in CASES if c.short], ids=lambda c: c.name)
def test_case(case, lab):
    try:
        case.run(lab)
    except Skipped as exc:
        pytest.skip(str(exc))
