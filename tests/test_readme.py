"""Every row of the README's hardening table is kept current by a test (tests/readme_table.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.readme_table import hardening_rows

pytestmark = pytest.mark.unit


def test_every_hardening_row_has_a_test_that_states_its_figure() -> None:
    calls = " ".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    keys = re.findall(r'assert_readme_figure\(\s*"([^"]+)"', calls)
    rows = [r[0] for r in hardening_rows()]
    assert len(rows) >= 10
    unclaimed = [r for r in rows if not any(r.startswith(k) for k in keys)]
    assert not unclaimed, f"hardening rows no test keeps current: {unclaimed}"
