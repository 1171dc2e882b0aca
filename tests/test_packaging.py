"""The package as a user installs it: ``pip wheel .`` gives one top-level name, ``pali3_train``
(the repository's data_pipeline/, cluster/ and launcher/ inside it), with the Slurm template and
the configs as package data, the pinned dependencies and a console script per entry point. The
wheel is installed into a fresh virtualenv (whose dependencies are this environment's, so
nothing is downloaded) and every console script answers ``--help`` from the installed copy."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _pins(*files: str) -> set[str]:
    lines = [line.strip() for f in files for line in (ROOT / f).read_text().splitlines()]
    return {line for line in lines if line and not line.startswith("#")}


def _python_says(python: Path, code: str, cwd: Path) -> str:
    done = subprocess.run([python, "-c", code], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the checkout's sources, so that setuptools' build/ folder (which
    would keep files deleted since) is never reused and nothing is written into the checkout."""
    source = tmp_path_factory.mktemp("source") / "pali3-train"
    local = (
        ".git",
        ".venv",
        ".cache",
        "runs",
        "build",
        "*.egg-info",
        "__pycache__",
        ".pytest_cache",
    )
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*local), symlinks=True)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-w", str(out), str(source)], check=True, capture_output=True)
    [built] = out.glob("pali3_train-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel; this environment's packages (not its editable pali3-train)
    on its path through a .pth file, so the dependencies need no download."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = _python_says(python, "import sysconfig; print(sysconfig.get_path('purelib'))", venv)
    Path(site, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    subprocess.run([*pip, "--no-index", str(wheel)], check=True, capture_output=True)
    return venv


def test_the_wheel_installs_one_name_with_its_data_and_pinned_dependencies(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert {n.split("/")[0] for n in names} == {
        "pali3_train",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    for path in (
        "pali3_train/data_pipeline/loader.py",
        "pali3_train/cluster/templates/train.sbatch",
        "pali3_train/launcher/run.py",
        "pali3_train/configs/tiny/stage1.yaml",
        "pali3_train/configs/base.yaml",
    ):
        assert path in names, path
    requires = {
        line.removeprefix("Requires-Dist: ")
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist: ") and "extra ==" not in line
    }
    assert requires == _pins("requirements.txt", "requirements-deepspeed.txt")
    assert "Provides-Extra: dev" in metadata and 'pytest==9.2.0; extra == "dev"' in metadata


def test_every_console_script_runs_help_from_the_installed_copy(installed, tmp_path):
    python = installed / "bin" / "python"
    where = _python_says(
        python, "import pali3_train.data_pipeline as d; print(d.__file__)", tmp_path
    )
    assert where.startswith(str(installed)), "the wheel's copy, not the checkout"
    for script in SCRIPTS:
        result = subprocess.run(
            [installed / "bin" / script, "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0 and result.stdout.startswith("usage: "), (script, result)
