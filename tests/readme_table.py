"""The "Hardening, measured" table (docs/faults.md), kept current by the tests that produce its figures.

A test that produces a row's figure calls ``assert_readme_figure(row, figure)``: the row whose first cell
starts with ``row`` must state ``figure`` (built from what the test ran) in its last cell, so a test that
changes what it tries fails until the page says so; tests/test_readme.py checks that every row has a test.
The table lived in the README until the README became a front door; the name of the check stayed.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"  # the repository's README (tests find the repository root through it)
TABLE_PAGE = ROOT / "docs" / "faults.md"
TABLE_TITLE = "## Hardening, measured"


def hardening_rows() -> list[list[str]]:
    """The table's body rows, as lists of cells."""
    lines = TABLE_PAGE.read_text().split(TABLE_TITLE, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def assert_readme_figure(row: str, figure: str) -> None:
    """The hardening row of docs/faults.md starting with `row` states `figure` in its last cell."""
    where = TABLE_PAGE.relative_to(ROOT)
    matches = [r for r in hardening_rows() if r[0].startswith(row)]
    assert len(matches) == 1, f"{where}'s hardening table has {len(matches)} rows starting with {row!r}"
    assert figure in matches[0][-1], f"{where}'s hardening row {row!r} should state {figure!r}: it says {matches[0][-1]!r}"
