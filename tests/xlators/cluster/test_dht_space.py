"""Placement by free space: min-free-disk sends new files away from a full brick behind a link
file, and weighted-rebalance sizes ranges by brick size. Bricks live on small tmpfs mounts so the
free space is known exactly."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mortar.core.fops import Loc
from mortar.xlators.cluster.dht_layout import HASH_SPACE

from .conftest import ROOT, MakeBricks, MakeDht, create, disk_layout, mkdir, read_all, where

Mount = Callable[[int], Path]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """`tmpfs(mib)`: a fresh tmpfs of that size (skips the test where mounting is not allowed)."""
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        where_ = tmp_path / f"fs{len(mounted)}"
        where_.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where_)],
            capture_output=True,
            timeout=30,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount tmpfs: {res.stderr.decode().strip()}")
        mounted.append(where_)
        return where_

    yield mount
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], capture_output=True, timeout=30)


async def test_min_free_disk_places_new_files_on_the_emptier_brick(
    tmpfs: Mount, make_bricks: MakeBricks, make_dht: MakeDht
) -> None:
    full, empty = tmpfs(16), tmpfs(16)
    with open(full / "ballast", "wb") as f:  # 14 of 16 MiB used: 12 % free
        f.write(b"\1" * (14 << 20))
    bricks = await make_bricks(2, under=[full, empty])
    dht = await make_dht(bricks, min_free_disk="20")
    d = await mkdir(dht, ROOT, "d")
    names = [f"vm{i}" for i in range(30)]
    for n in names:
        await create(dht, d.gfid, n, b"payload")
    placed = [where(bricks, f"d/{n}") for n in names]
    # nothing new lands on the full brick; names hashing there got a link file on it
    assert all(p.get(bricks[1].name) == "data" for p in placed)
    linked = [p for p in placed if bricks[0].name in p]
    assert linked and all(p[bricks[0].name] == f"link->{bricks[1].name}" for p in linked)
    fresh = await make_dht(bricks)
    for n in names:
        assert await read_all(fresh, d.gfid, n) == b"payload"
    # with room again, the hashed brick takes its files itself
    os.unlink(full / "ballast")
    roomy = await make_dht(bricks, min_free_disk="20")
    for i in range(30):
        await create(roomy, d.gfid, f"later{i}")
    later = [where(bricks, f"d/later{i}") for i in range(30)]
    assert {bricks[0].name: "data"} in later


async def test_weighted_rebalance_sizes_ranges_by_brick_size(
    tmpfs: Mount, make_bricks: MakeBricks, make_dht: MakeDht
) -> None:
    small, big = tmpfs(8), tmpfs(24)
    bricks = await make_bricks(2, under=[small, big])
    dht = await make_dht(bricks, weighted_rebalance="on")
    await mkdir(dht, ROOT, "w")
    spans = {b.name: (lay[2] - lay[1] + 1) for b in bricks if (lay := disk_layout(b, "w"))}
    assert sum(spans.values()) == HASH_SPACE
    assert abs(spans[bricks[1].name] / spans[bricks[0].name] - 3) < 0.05
    total = (await dht.statfs(Loc("/", ROOT))).statvfs
    assert total.blocks * total.frsize == 32 << 20
