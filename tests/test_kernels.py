"""``resolve_kernels``' choices and refusals, one platform and layout at a time (the fast paths
themselves are tested against the plain ones beside their modules), and the YAML spelling of
the compile switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pali3_train.config import KernelsConfig, ParallelConfig, load_config
from pali3_train.config.schema import FieldError
from pali3_train.kernels import resolve_kernels

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
WHOLE = ParallelConfig(zero_stage=2)


def test_auto_fuses_the_cross_entropy_where_the_whole_head_is_on_one_rank():
    """liger on CUDA, the PyTorch walk elsewhere; chunks where TP or ZeRO-3 split the head."""
    auto = KernelsConfig()
    assert resolve_kernels(auto, CUDA, WHOLE).cross_entropy == "liger"
    assert resolve_kernels(auto, CPU, WHOLE).cross_entropy == "fused"
    for split in (ParallelConfig(tensor_parallel_size=2), ParallelConfig(zero_stage=3)):
        for device in (CPU, CUDA):
            assert resolve_kernels(auto, device, split).cross_entropy == "chunked"


@pytest.mark.parametrize(
    "path, device, parallel, says",
    [
        ("liger", CPU, WHOLE, "need CUDA"),
        ("liger", CUDA, ParallelConfig(tensor_parallel_size=2), "whole LM head"),
        ("fused", CPU, ParallelConfig(tensor_parallel_size=2), "whole LM head"),
        ("fused", CUDA, ParallelConfig(zero_stage=3), "whole LM head"),
    ],
    ids=["liger-cpu", "liger-tp2", "fused-tp2", "fused-zero3"],
)
def test_a_fused_cross_entropy_is_refused_where_it_cannot_run(
    monkeypatch, path, device, parallel, says
):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(FieldError, match=says) as refusal:
        resolve_kernels(KernelsConfig(cross_entropy=path), device, parallel)
    assert refusal.value.field_path == "kernels.cross_entropy"


def test_liger_runs_on_cpu_under_tritons_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    chosen = resolve_kernels(KernelsConfig(cross_entropy="liger"), CPU, WHOLE)
    assert chosen.cross_entropy == "liger"


@pytest.mark.parametrize("spelling, compiled", [("on", True), ("off", False), ("'on'", True)])
def test_compile_on_and_off_read_as_written_in_yaml(spelling, compiled):
    """YAML 1.1 reads a bare on / off as a boolean; the switch takes it as the word."""
    cfg = load_config(ROOT / "configs/tiny/stage1.yaml", [f"kernels.compile={spelling}"])
    assert cfg.kernels.compile == ("on" if compiled else "off")
    assert resolve_kernels(cfg.kernels, CPU, cfg.parallel).compile is compiled


def test_a_yaml_file_may_write_compile_off_bare(tmp_path):
    path = tmp_path / "stage1.yaml"
    path.write_text(f"include: [{ROOT / 'configs/tiny/stage1.yaml'}]\nkernels:\n  compile: off\n")
    assert load_config(path).kernels.compile == "off"
