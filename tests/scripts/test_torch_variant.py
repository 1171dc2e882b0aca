"""scripts/torch_variant.sh and the Makefile's install: the CUDA build of torch where an NVIDIA
driver is, chosen from its CUDA version; nothing new where there is none. A fake ``nvidia-smi``
on PATH stands in for a driver, and the Makefile runs with ``PIP=echo pip``: nothing installs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "torch_variant.sh"
SH = shutil.which("sh")
HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
"""


@pytest.fixture
def bin_dir(tmp_path) -> Path:
    """A PATH of its own: the tools the script and make use, and no nvidia-smi (even on a
    machine that has one)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("sed", "head", "make", "sh", "touch", "test", "echo"):
        found = shutil.which(tool)
        if found:
            (folder / tool).symlink_to(found)
    return folder


def fake_nvidia_smi(bin_dir: Path, output: str, code: int = 0) -> None:
    (bin_dir / "output.txt").write_text(output)
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!{SH}\ncat '{bin_dir / 'output.txt'}'\nexit {code}\n")
    script.chmod(0o755)
    (bin_dir / "cat").symlink_to(shutil.which("cat"))


def environment(bin_dir: Path, **extra: str) -> dict[str, str]:
    """PATH = bin_dir only; no TORCH_CUDA and no make state from an enclosing `make test`."""
    drop = {"TORCH_CUDA", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PATH": str(bin_dir), **extra}


def variant(bin_dir: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([SH, str(SCRIPT)], env=environment(bin_dir, **extra),
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_no_nvidia_smi_is_cpu(bin_dir):
    result = variant(bin_dir)
    assert (result.returncode, result.stdout) == (0, "cpu\n")
    assert "no working nvidia-smi" in result.stderr


def test_a_failing_nvidia_smi_is_cpu(bin_dir):
    fake_nvidia_smi(bin_dir, "NVIDIA-SMI has failed: couldn't communicate with the driver\n", 9)
    assert variant(bin_dir).stdout == "cpu\n"


@pytest.mark.parametrize(
    ("cuda", "chosen"),
    [("13.2", "cu132"), ("13.1", "cu130"), ("13.0", "cu130"), ("12.9", "cu129"),
     ("12.8", "cu126"), ("12.6", "cu126")],
)  # fmt: skip
def test_the_newest_build_the_driver_runs(bin_dir, cuda, chosen):
    fake_nvidia_smi(bin_dir, HEADER.format(cuda=cuda))
    result = variant(bin_dir)
    assert (result.returncode, result.stdout) == (0, f"{chosen}\n"), result.stderr
    assert f"CUDA {cuda}" in result.stderr


def test_a_driver_older_than_every_build_is_refused(bin_dir):
    fake_nvidia_smi(bin_dir, HEADER.format(cuda="12.4"))
    result = variant(bin_dir)
    assert result.returncode == 1 and result.stdout == ""
    assert "older than every CUDA build" in result.stderr and "TORCH_CUDA=cpu" in result.stderr


def test_no_cuda_version_shown_is_refused(bin_dir):
    fake_nvidia_smi(bin_dir, "GPU 0: NVIDIA H200\n")
    result = variant(bin_dir)
    assert result.returncode == 1 and "no CUDA version" in result.stderr


def test_torch_cuda_chooses(bin_dir):
    fake_nvidia_smi(bin_dir, HEADER.format(cuda="13.0"))
    assert variant(bin_dir, TORCH_CUDA="cu126").stdout == "cu126\n"
    assert variant(bin_dir, TORCH_CUDA="cpu").stdout == "cpu\n"
    refused = variant(bin_dir, TORCH_CUDA="cu128")
    assert refused.returncode == 1 and "none of: cpu cu132 cu130 cu129 cu126" in refused.stderr


def install_commands(bin_dir: Path, tmp_path: Path, *make_args: str) -> list[str]:
    """The pip commands `make install` runs, echoed instead (its stamp in tmp_path)."""
    result = subprocess.run(
        ["make", "--always-make", "--no-print-directory", "install", "PIP=echo pip",
         f"STAMP={tmp_path / 'installed'}", *make_args],
        cwd=ROOT, env=environment(bin_dir), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith("pip install")]


CPU_COMMANDS = [
    "pip install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt",
    "pip install -q -c constraints.txt --no-build-isolation -r requirements-deepspeed.txt",
    "pip install -q -c constraints.txt --no-build-isolation --no-deps -e .",
]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_install_on_cpu_is_unchanged(bin_dir, tmp_path):
    assert install_commands(bin_dir, tmp_path) == CPU_COMMANDS


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_install_with_a_driver_takes_torch_from_pytorch_first(bin_dir, tmp_path):
    fake_nvidia_smi(bin_dir, HEADER.format(cuda="13.0"))
    torch_first = ("pip install -q -c constraints.txt torch "
                   "--index-url https://download.pytorch.org/whl/cu130")  # fmt: skip
    assert install_commands(bin_dir, tmp_path) == [torch_first, *CPU_COMMANDS]
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_install_torch_cuda_chooses(bin_dir, tmp_path):
    commands = install_commands(bin_dir, tmp_path, "TORCH_CUDA=cu126")
    assert commands[0].endswith("--index-url https://download.pytorch.org/whl/cu126")
    assert commands[1:] == CPU_COMMANDS
