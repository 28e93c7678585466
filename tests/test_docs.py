"""The documentation's promises a reader relies on: every recorded result is in the
results index, every relative link leads to a file, the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README_MAX_LINES = 250

# [text](target): the target up to a closing parenthesis, without a title.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def documents() -> list[Path]:
    pages = [ROOT / "README.md", ROOT / "bench" / "README.md", RESULTS / "README.md", RESULTS / "decisions.md"]
    return pages + sorted((ROOT / "docs").glob("*.md"))


def relative_links(page: Path) -> list[str]:
    """The page's link targets that name a file of this repository, anchors dropped."""
    targets = (target.split("#")[0] for target in LINK.findall(page.read_text()))
    return [target for target in targets if target and not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", documents(), ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_lead_to_files(page):
    assert page.exists(), f"{page.relative_to(ROOT)} is missing"
    missing = [target for target in relative_links(page) if not (page.parent / target).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_results_index_lists_every_result():
    index = RESULTS / "README.md"
    linked = {Path(target).parts[0] for target in relative_links(index)}
    recorded = {entry.name for entry in RESULTS.iterdir()} - {"README.md"}
    unlisted = sorted(recorded - linked)
    assert not unlisted, f"bench/results/README.md does not link to {unlisted}"


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, more than {README_MAX_LINES}"
