"""Work that rank 0 does alone, on 2 real gloo ranks whose collectives time out after 2 s: a
plain barrier behind 5 s of work times out (what NCCL's watchdog would do to a real run), while
``on_main_rank`` waits it out, returns rank 0's result and carries rank 0's failure to every
rank; a checkpoint's conversion to the universal format, made artificially slow, goes through."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from pali3_train.engine import checkpoint
from pali3_train.engine.distributed import DistEnv, free_port, init_distributed, on_main_rank

TIMEOUT_S, SLOW_S = 2.0, 5.0


def _slow(result: str = "done") -> str:
    time.sleep(SLOW_S)
    return result


def _failing() -> None:
    raise OSError("disk full")


def _barrier_behind_slow_work() -> str:
    if dist.get_rank() == 0:
        _slow()
    dist.barrier()
    return "done"


def _slow_conversion(path: Path) -> str:
    def convert(folder: Path, trusted: bool) -> None:
        _slow()
        (folder / checkpoint.UNIVERSAL_TAG).mkdir()

    checkpoint._convert = convert  # the real one needs a DeepSpeed checkpoint
    checkpoint.convert_to_universal(path)
    return "converted" if (path / checkpoint.UNIVERSAL_TAG).is_dir() else "missing"


SCENARIOS = {
    "barrier": _barrier_behind_slow_work,
    "slow": lambda: on_main_rank(_slow, "do slow work"),
    "failing": lambda: on_main_rank(_failing, "write the export"),
}


def _rank(rank: int, port: int, out: str, scenario: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(DistEnv(rank, 2, rank), timeout_s=TIMEOUT_S)
    work = SCENARIOS.get(scenario) or (lambda: _slow_conversion(Path(out)))
    try:
        outcome = repr(work())
    except Exception as exc:  # what each rank saw is the result
        outcome = f"{type(exc).__name__}: {exc}"
    Path(out, f"rank{rank}.txt").write_text(outcome)
    os._exit(0)  # a timed-out gloo group cannot be torn down cleanly


def _outcomes(scenario: str, tmp_path: Path) -> list[str]:
    mp.start_processes(_rank, (free_port(), str(tmp_path), scenario), nprocs=2,
                       start_method="spawn")  # fmt: skip
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


def test_a_barrier_behind_slow_rank0_work_times_out(tmp_path):
    rank0, rank1 = _outcomes("barrier", tmp_path)
    assert "RuntimeError" in rank1 and "imed out" in rank1, rank1


def test_slow_rank0_work_is_waited_for_without_a_collective_timeout(tmp_path):
    assert _outcomes("slow", tmp_path) == ["'done'", "None"]


def test_a_failure_on_rank0_stops_every_rank(tmp_path):
    rank0, rank1 = _outcomes("failing", tmp_path)
    assert rank0 == "OSError: disk full"
    assert rank1 == "MainRankFailed: rank 0 failed to write the export: OSError: disk full"


def test_a_slow_universal_conversion_does_not_trip_the_collective_timeout(tmp_path):
    assert _outcomes("convert", tmp_path) == ["'converted'", "'converted'"]
