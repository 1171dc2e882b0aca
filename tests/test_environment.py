"""The pinned stack is what got installed: a wrong torch would silently be a multi-GB CUDA build."""

from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            package, pinned = line.split("==")
            pins[package.strip()] = pinned.strip()
    return pins


def test_installed_versions_match_the_pins():
    pins = {**_pins("requirements.txt"), **_pins("requirements-deepspeed.txt")}
    assert pins["torch"] == _pins("constraints.txt")["torch"]
    for package, pinned in pins.items():
        assert version(package).split("+")[0] == pinned, package


def test_the_heavy_dependencies_import():
    import deepspeed  # noqa: F401
    import megatron.core  # noqa: F401
    import mlflow  # noqa: F401
    import webdataset  # noqa: F401
