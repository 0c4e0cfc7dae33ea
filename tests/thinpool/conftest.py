"""Shared fixtures for thin pool tests: pools on temp files, closed at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mortar.thinpool import ThinPool


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[Callable[..., ThinPool]]:
    pools: list[ThinPool] = []

    def make(size: int = 64 << 20, block_size: int = 64 << 10, **kw: Any) -> ThinPool:
        kw.setdefault("commit_interval", 0)
        pool = ThinPool.create(tmp_path / f"pool{len(pools)}.img", size=size, block_size=block_size, **kw)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
