"""The fault campaign: every case of ``tests.faults.cases`` against real 2-rank runs, and a
PASS/FAIL/SKIP table (Markdown) of what happened.

    python -m tests.faults.campaign            # every case (~15 min on 2 CPU cores)
    python -m tests.faults.campaign --short    # the short form, which `make test` also runs
    python -m tests.faults.campaign --repeat 3 --seed 7   # random kill points, three times

Exit code 1 if any case failed. docs/reliability.md's table comes from the full form.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.conftest import _tiny_corpus
from tests.faults.cases import CASES, Failed, Lab, Skipped


def run_case(case, lab: Lab) -> tuple[str, str, float]:
    """(PASS | FAIL | SKIP, note, seconds)."""
    started = time.monotonic()
    try:
        note = "PASS", case.run(lab)
    except Skipped as exc:
        note = "SKIP", str(exc)
    except Failed as exc:
        note = "FAIL", str(exc)
    except Exception as exc:  # a crash of the case itself is a failure too, with its cause
        where = traceback.extract_tb(exc.__traceback__)[-1]
        note = "FAIL", f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
    return (*note, time.monotonic() - started)


def table(rows: list[tuple[str, str, str, float]]) -> str:
    lines = ["| case | result | seconds | what happened |", "|---|---|---:|---|"]
    lines += [f"| {name} | {result} | {seconds:.0f} | {note.replace('|', '/')} |"
              for name, result, note, seconds in rows]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the short form only")
    parser.add_argument("--seed", type=int, default=0, help="for the random kill points")
    parser.add_argument("--repeat", type=int, default=1, help="run every case this many times")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if c.short or not args.short] * args.repeat
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    lab = Lab(_tiny_corpus(work / "corpus", 96), work, random.Random(args.seed))
    rows = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.name} ...", file=sys.stderr, flush=True)
        result, note, seconds = run_case(case, lab)
        print(f"[{i}/{len(cases)}] {case.name}: {result} ({seconds:.0f} s) {note}",
              file=sys.stderr, flush=True)  # fmt: skip
        rows.append((case.name, result, note, seconds))
    print(table(rows))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
