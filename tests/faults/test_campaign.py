"""The fault campaign's short form (``python -m tests.faults.campaign --short``), one test per
case, on the session's demo corpus; the full form is ``python -m tests.faults.campaign``."""

from __future__ import annotations

import pytest

from tests.faults.cases import CASES, Lab, Skipped


@pytest.fixture(scope="module")
def lab(demo, tmp_path_factory):
    return Lab(demo, tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("case", [c for c in CASES if c.short], ids=lambda c: c.name)
def test_case(case, lab):
    try:
        case.run(lab)
    except Skipped as exc:
        pytest.skip(str(exc))
