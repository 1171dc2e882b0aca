"""Every shell block of README.md and docs/*.md runs as written, page by page, in a scratch folder
that looks like a checkout, on the tiny preset: a command that breaks cannot stay in the docs.
A block that cannot run here (a GPU, a Slurm cluster, a download, a long run) is marked on the
line before it with the reason (``tests/docs/shell_blocks.py``); files a page names but a
checkout lacks are stand-ins (``stand_ins.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs import stand_ins
from tests.docs.shell_blocks import ROOT, follow, scratch_checkout, shell_blocks

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_ELSEWHERE = {"own_data.md": "test_own_data.py"}  # its end products are checked there too
STAND_INS = {"data.md": stand_ins.photos, "conversion.md": stand_ins.conversion_inputs}


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in RUN_ELSEWHERE],
                         ids=lambda p: p.name)  # fmt: skip
def test_every_unmarked_block_of_the_page_runs(page, tmp_path):
    folder = scratch_checkout(tmp_path)
    STAND_INS.get(page.name, lambda _: None)(folder)
    follow(page, folder)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_marker_says_why(page):
    for block in shell_blocks(page):  # refuses a marker without a reason or without a block
        assert block.skip is None or len(block.skip.split()) >= 3, f"{block.where}: {block.skip}"


def test_the_pages_run_elsewhere_have_their_test():
    for name in RUN_ELSEWHERE.values():
        assert (Path(__file__).parent / name).is_file()


def _page(tmp_path: Path, text: str) -> Path:
    (tmp_path / "page.md").write_text(text)
    return tmp_path / "page.md"


def test_markers_are_read_from_the_line_before_the_block(tmp_path):
    page = _page(tmp_path, "<!-- docs-test: skip: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n"
                           "<!-- docs-test: exit 2: refuses -->\n```bash\nexit 2\n```\n"
                           "```bash\ntrue\n```\n")  # fmt: skip
    first, second, third = shell_blocks(page)
    assert (first.skip, first.exit_status) == ("needs a GPU", 0)
    assert (second.skip, second.exit_status) == (None, 2)
    assert (third.skip, third.exit_status, third.where) == (None, 0, "page.md:10")


@pytest.mark.parametrize("text, message", [
    ("<!-- docs-test: skip -->\n```bash\ntrue\n```\n", "needs 'skip: <reason>'"),
    ("<!-- docs-test: skip:   -->\n```bash\ntrue\n```\n", "needs 'skip: <reason>'"),
    ("<!-- docs-test: skip: far away -->\n\ntext\n```bash\ntrue\n```\n", "not on the line"),
    ("```sh\ntrue\n```\n", "spell shell blocks ```bash"),
])  # fmt: skip
def test_a_marker_without_a_reason_or_a_block_is_refused(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        shell_blocks(_page(tmp_path, text))


def test_a_failing_block_fails_naming_its_page_and_line(tmp_path):
    page = _page(tmp_path, "intro\n\n```bash\ntrue\nfalse\ntrue\n```\n")
    with pytest.raises(AssertionError, match="page.md:3 exited 1, expected 0"):
        follow(page, tmp_path)
