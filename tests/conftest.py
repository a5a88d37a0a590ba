"""Shared pytest configuration: fixtures live in tests/fixtures/ and tests/cluster/ and are loaded as plugins."""
