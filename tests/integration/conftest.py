"""Integration fixtures: a single-node mortard on loopback shared by a module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
