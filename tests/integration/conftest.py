"""Integration fixtures: a single-node mortard on loopback shared by a module; a replica-3 volume
of brick processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.brickproc import TestVolume
from tests.integration.harness import Mortard, kill_all_under


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mortard]:
    base = tmp_path_factory.mktemp("mortard")
    daemon = Mortard(base, "n1")
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        kill_all_under(base)


@pytest.fixture
def replica3(tmp_path: Path) -> Iterator[TestVolume]:
    """Three brick processes as one replica-3 volume, with a short ping-timeout."""
    tv = TestVolume(tmp_path, bricks=3, replica=3, **{"ping-timeout": "2"})
    try:
        yield tv
    finally:
        tv.stop()
