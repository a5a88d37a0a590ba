"""Shared pytest configuration: fixtures live in tests/fixtures/ and devcluster/ and are loaded as plugins."""

from __future__ import annotations

import pytest

pytest_plugins: list[str] = [
    "tests.fixtures.cluster",
    "tests.fixtures.s3",
    "tests.fixtures.tiny",
    "tests.fixtures.smollm2",
    "tests.fixtures.openai_server",
    "tests.fixtures.hub_server",
]

LEVELS = ("unit", "ml", "cluster")


FIRST = "tests/test_cluster_lifecycle.py"  # brings up its own cluster: before the session's cluster starts


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to exactly one level, so `make test` (-m "unit or ml or cluster") runs them all;
    the cluster lifecycle test runs first."""
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))
    for item in items:
        levels = [m.name for m in item.iter_markers() if m.name in LEVELS]
        if len(set(levels)) != 1:
            raise pytest.UsageError(f"{item.nodeid}: mark it with exactly one of {', '.join(LEVELS)} (has {levels or 'none'})")
