"""The shell blocks of a Markdown page and how the docs tests run them: as a reader would, in
order, in one scratch folder that looks like a checkout (``configs/``, ``launcher/``, ``.venv``).

A block a test must not run carries a marker on the line just before its fence, with the reason:
``<!-- docs-test: skip: needs a GPU -->``. A block whose point is a refusal says which exit
status it ends with: ``<!-- docs-test: exit 2: the 5B data are not here -->``. A marker without
a reason, or one that no ```bash block follows, is an error, so a skip always says why."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = ("configs", "launcher", ".venv")  # what the commands name relative to the root
FENCE = re.compile(r"^```(\S*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"^<!-- docs-test:(.*?)-->$", re.M)  # a line of its own
KIND = re.compile(r"\s*(skip|exit (\d+)):\s*(\S.*?)\s*$")
SHELLS = ("sh", "shell", "console", "zsh")  # spelled otherwise, a block would dodge the test


@dataclass(frozen=True)
class Block:
    """One ```bash block: where it starts, its text, and what its marker says."""

    where: str  # page:line
    text: str
    skip: str | None = None  # the reason, for a skipped block
    exit_status: int = 0


def _marker(page: Path, line: int, before: str) -> dict:
    found = MARKER.fullmatch(before)
    if found is None:
        return {}
    kind = KIND.fullmatch(found.group(1))
    if kind is None:
        raise ValueError(f"{page.name}:{line}: a docs-test marker needs 'skip: <reason>' or "
                         f"'exit <N>: <reason>', got {found.group(0)!r}")  # fmt: skip
    if kind.group(1) == "skip":
        return {"skip": kind.group(3)}
    return {"exit_status": int(kind.group(2))}


def shell_blocks(page: Path) -> list[Block]:
    """Every ```bash block of ``page`` with its marker; refuses stray markers and shell blocks
    under another language name."""
    text = page.read_text()
    blocks, attached = [], 0
    for fence in FENCE.finditer(text):
        line = text.count("\n", 0, fence.start()) + 1
        if fence.group(1) in SHELLS:
            raise ValueError(f"{page.name}:{line}: spell shell blocks ```bash, so a test runs them")
        if fence.group(1) != "bash":
            continue
        before = text[: fence.start()].rstrip("\n").rpartition("\n")[2]
        marker = _marker(page, line, before)
        attached += bool(marker)
        blocks.append(Block(f"{page.name}:{line}", fence.group(2), **marker))
    if len(MARKER.findall(text)) != attached:
        raise ValueError(f"{page.name}: a docs-test marker is not on the line before a block")
    return blocks


def scratch_checkout(folder: Path) -> Path:
    """``folder`` with the checkout's configs, launcher and venv linked in; runs/ stays its own."""
    for name in CHECKOUT:
        (folder / name).symlink_to(ROOT / name)
    return folder


def run_block(block: Block, folder: Path, timeout_s: float = 600) -> None:
    """Runs ``block`` in ``folder`` under ``bash -euo pipefail`` (a failing line fails it) on the
    CPU, and asserts it ends with the exit status its marker names (0 unless marked)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    assert result.returncode == block.exit_status, (
        f"{block.where} exited {result.returncode}, expected {block.exit_status}:\n{block.text}\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def follow(page: Path, folder: Path) -> list[Block]:
    """Runs the page's blocks in order in ``folder``, leaving out the skipped; returns those run."""
    ran = [block for block in shell_blocks(page) if block.skip is None]
    for block in ran:
        run_block(block, folder)
    return ran
