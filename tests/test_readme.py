"""The README is a front door and the docs/ pages hold the rest; both are checked against the repository.

- every row of the hardening table (docs/faults.md) is kept current by a test (tests/readme_table.py);
- the README opens with the two set-up commands, `make demo` and `make test`, and stays short;
- every relative link (and its #anchor) in the README and docs/ leads somewhere, and every repository path
  they quote exists, so a moved or renamed file fails here until the page that names it follows;
- no page states a test count by hand: counts change with every commit (docs/development.md says how to ask pytest).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.readme_table import README, ROOT, hardening_rows

pytestmark = pytest.mark.unit

PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150
# Top-level folders whose paths a page may quote; a quoted path under one of them must exist.
REPO_DIRS = ("api", "operator", "step_kernel", "trainer_image", "evaluator_image", "crds", "helm", "examples",
             "devcluster", "tests", "bench", "docs")  # fmt: skip


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_every_hardening_row_has_a_test_that_states_its_figure() -> None:
    calls = " ".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    keys = re.findall(r'assert_readme_figure\(\s*"([^"]+)"', calls)
    rows = [r[0] for r in hardening_rows()]
    assert len(rows) >= 10
    unclaimed = [r for r in rows if not any(r.startswith(k) for k in keys)]
    assert not unclaimed, f"hardening rows no test keeps current: {unclaimed}"


def test_the_readme_opens_with_make_demo_and_make_test_and_stays_a_front_door() -> None:
    lines = README.read_text().splitlines()
    first_block = lines[lines.index("```") + 1 : lines.index("```", lines.index("```") + 1)]
    commands = [line.split("#")[0].strip() for line in first_block if not line.startswith(" ")]
    assert commands == ["make demo", "make test"], first_block
    assert lines.index("```") < 5, "the two commands come first, before anything else"
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into a docs/ page"
    for page in PAGES[1:]:
        assert f"]({_name(page)})" in README.read_text(), f"the README's map does not link {_name(page)}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_leads_to_a_file_and_heading() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_name(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_name(page)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_repository_path_a_page_quotes_exists() -> None:
    missing = []
    for page in PAGES:
        for quoted in re.findall(r"`([^`\s]+)`", page.read_text()):
            path = quoted.rstrip(".,:;")
            if path.split("/")[0] not in REPO_DIRS or "/" not in path or re.search(r"[*<>{}\[\]|]|[A-Z]{3,}", path):
                continue  # not a path in this repository, or a pattern (`NAME-UID8/`, `models/MODEL/`, `*.md`)
            if not (ROOT / path).exists():
                missing.append(f"{_name(page)}: {path}")
    assert not missing, "paths quoted by the docs that do not exist:\n" + "\n".join(missing)


def test_no_page_states_a_test_count_by_hand() -> None:
    counted = [
        f"{_name(page)}: {m.group(0)!r}"
        for page in PAGES
        for m in re.finditer(r"\b\d[\d,]* (?:`?(?:unit|ml|cluster)`? )?tests\b", page.read_text())
    ]
    assert not counted, "test counts change with every commit; ask pytest instead:\n" + "\n".join(counted)
