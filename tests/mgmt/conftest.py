"""Fixtures of the management tests: the single-node mortard of `tests.integration`, brick dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import node  # noqa: F401  (a fixture, used by name)


@pytest.fixture
def bricks(tmp_path: Path) -> Path:
    """A directory for this test's bricks (on the root file system: volume create needs force)."""
    return tmp_path
