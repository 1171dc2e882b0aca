"""Every relative link of the Markdown pages people read points at a file that exists and, with
a ``#fragment``, at a heading it has: pages move (the README's sections became docs/), links
must follow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.shell_blocks import ROOT

FOLDERS = [p for p in sorted(ROOT.glob("*/README.md")) if not p.parent.name.startswith(".")]
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md")),
         *FOLDERS]  # fmt: skip
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCED = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's fragment for each heading: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.*)$", FENCED.sub("", page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def relative_links(page: Path) -> list[str]:
    return [link for link in LINK.findall(FENCED.sub("", page.read_text()))
            if not re.match(r"[a-z]+:", link)]  # fmt: skip


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_a_heading(page):
    for link in relative_links(page):
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.relative_to(ROOT)}: {link}: no such file"
        if fragment:
            assert fragment in anchors(target), f"{page.relative_to(ROOT)}: {link}: no such heading"


def test_a_heading_becomes_githubs_fragment(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# On GPUs\n## The curriculum on CPU: `make demo`\n## Several nodes (Slurm)\n")
    assert anchors(page) == {"on-gpus", "the-curriculum-on-cpu-make-demo", "several-nodes-slurm"}
