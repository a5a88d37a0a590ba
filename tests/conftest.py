"""Shared pytest configuration: fixtures live in tests/fixtures/ and tests/cluster/ and are loaded as plugins."""

from __future__ import annotations

import pytest

pytest_plugins: list[str] = ["tests.cluster.fixtures", "tests.fixtures.s3", "tests.fixtures.tiny", "tests.fixtures.openai_server"]

LEVELS = ("unit", "ml", "cluster")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to exactly one level, so `make test` (-m "unit or ml or cluster") runs them all."""
    for item in items:
        levels = [m.name for m in item.iter_markers() if m.name in LEVELS]
        if len(set(levels)) != 1:
            raise pytest.UsageError(f"{item.nodeid}: mark it with exactly one of {', '.join(LEVELS)} (has {levels or 'none'})")
