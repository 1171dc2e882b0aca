"""``python -m benchmarks.gpu_smoke --device cpu``, the smoke test's CI-sized form, run whole
once (~75 s on 2 cores): every section ran or says why not, the launched runs trained, every
attention call names its backend. On CPU nothing may be skipped: everything is installed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What the report promises (run as a subprocess: ``benchmarks`` is not an installed package).
SECTIONS = ["versions", "matmul", "copy", "sdpa", "corpus", "stage0", "stage1", "full_width_step"]
BACKENDS = {"flash", "flash (CPU kernel)", "memory-efficient", "cuDNN", "math",
            "fused (device plug-in)"}  # fmt: skip
STEPS = 3


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    """(the JSON report, stdout) of one CPU run."""
    out = tmp_path_factory.mktemp("gpu_smoke")
    command = [sys.executable, "-m", "benchmarks.gpu_smoke", "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return json.loads((out / "gpu_smoke.json").read_text()), result.stdout


def test_every_section_ran(smoke):
    found, _ = smoke
    assert list(found["sections"]) == list(SECTIONS)
    assert found["ran"] == list(SECTIONS), (found["skipped"], found["failed"])
    assert found["skipped"] == {} and found["failed"] == {}
    for name, section in found["sections"].items():
        assert section["summary"] and section["seconds"] >= 0, name


def test_versions_and_ceilings(smoke):
    found, _ = smoke
    sections = found["sections"]
    versions = sections["versions"]["versions"]
    assert versions["torch"] and versions["python"] and versions["device"]
    assert versions["deepspeed"] and versions["megatron-core"]
    assert sections["matmul"]["tflops"] > 0
    assert sections["copy"]["gb_per_s"] > 0


@pytest.mark.parametrize("stage", ["stage0", "stage1"])
def test_tiny_stages_train_in_bf16(smoke, stage):
    run = smoke[0]["sections"][stage]
    assert run["exit_code"] == 0
    assert len(run["losses"]) == STEPS and all(map(math.isfinite, run["losses"]))
    assert "train.precision" not in run["command"]  # bf16 comes from the written config
    assert "precision: bf16" in Path(run["config"]).read_text()


def test_each_attention_call_names_its_backend(smoke):
    calls = smoke[0]["sections"]["sdpa"]["calls"]
    px = smoke[0]["sizes"]["attention_px"]
    assert {(c["tower"], c["px"]) for c in calls} == {
        (t, p) for t in ("vit", "ul2_encoder") for p in px
    }
    for call in calls:
        assert len(call["forward"]) == 1 and len(call["backward"]) == 1, call  # one layer each
        assert set(call["forward"]) | set(call["backward"]) <= BACKENDS, call
        assert call["ops"], call  # on CPU the kernels are the aten ops themselves


def test_full_width_step_reports_throughput_and_memory(smoke):
    step = smoke[0]["sections"]["full_width_step"]
    assert step["exit_code"] == 0 and len(step["losses"]) == STEPS
    assert step["tokens_per_s"] > 0
    assert step["utilisation"]["model_tflops_per_s"] > 0
    assert step["utilisation"]["mfu"] is None  # no listed peak for a CPU
    assert step["utilisation"]["of_matmul_ceiling"] > 0
    assert step["memory_gib"]["memory_gib"] > 0 and step["memory_gib"]["planned"]["total"] > 0


def test_progress_and_summary_are_printed(smoke):
    found, stdout = smoke
    for name in SECTIONS:
        assert f"[{name}] started" in stdout and f"[{name}] ran in " in stdout
    assert "| section | status | s | result |" in stdout
    assert "| attention | px | tokens | forward | backward | kernels |" in stdout
